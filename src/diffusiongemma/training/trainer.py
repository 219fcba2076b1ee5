"""The trainer: AdamW, linear warm-up then cosine decay, gradient clipping, optional gradient
checkpointing, fp32 or bf16 (autocast) compute, save/resume in the release directory format, a
progress line with loss and tokens/s, and the loss curve written as JSON lines.

Determinism: the batch and the noise of step k are functions of (seed, k) only, so resuming from a
checkpoint saved at step k continues the uninterrupted run's curve.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import GenerationConfig, ModelConfig
from ..loader import load, save
from ..loader.host import warn_if_slow_bf16
from ..model import DiffusionGemmaText
from ..sampling.draws import key_seed
from .distributed import DataParallel
from .lora import load_adapters, save_adapters
from .objective import ObjectiveConfig, compute_loss, make_batch, micro_batches, padded_length

STATE = "trainer_state.pt"
CURVE = "loss_curve.jsonl"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    clip: float = 1.0
    dtype: str = "float32"  # compute dtype: float32, or bfloat16 autocast over fp32 master weights
    grad_checkpoint: bool = False
    micro_batching: bool = True  # split each batch by length (same gradient, less padding)
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    stop_after: int | None = None  # end this run early at that step (resumable; the schedule keeps `steps`)
    log_every: int = 10
    progress: bool = True


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


class Trainer:
    def __init__(self, model: DiffusionGemmaText, config: ModelConfig, generation_config: GenerationConfig,
                 data, objective: ObjectiveConfig, cfg: TrainConfig, out_dir: str | Path,
                 end_id: int, pad_id: int, save_extra=None, vision=None, soft_ids: tuple[int, ...] = (),
                 save_base: bool = True, dp: DataParallel | None = None):
        """dp: this rank's place in data-parallel (FSDP2) training (`training.distributed`; default one process)."""
        self.model, self.config, self.gen = model, config, generation_config
        self.vision, self.soft_ids = vision, tuple(soft_ids)
        self.data, self.obj, self.cfg = data, objective, cfg
        self.out = Path(out_dir)
        self.end_id, self.pad_id = end_id, pad_id
        self.save_extra = save_extra  # called with the output directory after each save (tokenizer files)
        # False over a frozen quantized base: saves (and resumes) the adapters and optimizer only; the base is
        # re-made from its source (`cli.train --base-quant`), and the merged model is saved at the end
        self.save_base = save_base
        self.dp = dp or DataParallel()
        if cfg.dtype == "bfloat16" and model.device.type == "cpu":  # 10x slower per step on a CPU without bf16 kernels
            warn_if_slow_bf16("training with bfloat16 autocast")
        if self.dp.active and not save_base:
            raise ValueError("FSDP training saves the whole model: it does not train adapters over a quantized base")
        if self.dp.active and cfg.batch_size < self.dp.size:
            raise ValueError(f"a batch of {cfg.batch_size} examples cannot be split over {self.dp.size} ranks")
        self.dp.shard(model, vision)  # before the optimizer: it holds the sharded parameters
        self.modules = torch.nn.ModuleList([model] + ([vision] if vision is not None else []))
        self.opt = make_optimizer(self.modules, cfg)
        self.step = 0

    def resume(self) -> bool:
        state_file = self.out / STATE
        if not state_file.is_file():
            return False
        state = torch.load(state_file, weights_only=False)
        if bool(state.get("by_name")) != self.dp.active:
            raise ValueError(f"{state_file} was saved by {'an FSDP' if state.get('by_name') else 'a one-process'} "
                             f"run; resume it the same way (--fsdp under torchrun, or one process)")
        if self.save_base:
            ck = load(self.out, dtype="float32", vision=self.vision is not None)
            if self.dp.active:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(self.model, ck.model.state_dict(), options=StateDictOptions(full_state_dict=True))
            else:
                self.model.load_state_dict(ck.model.state_dict(), strict=False)
            if self.vision is not None:
                self.vision.load_state_dict(ck.vision.state_dict())
        load_adapters(self.model, self.out)
        if self.dp.active:
            self.dp.load_optimizer_state(self.modules, self.opt, state["optimizer"])
        else:
            self.opt.load_state_dict(state["optimizer"])
        self.step = state["step"]
        return True

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step. The batch is split into micro-batches of similar length (less padding in the
        encoder); every random draw is per example, so the split does not change the loss or its gradient."""
        cfg = self.cfg
        items = self.data.batch(step, cfg.batch_size)
        mine = self.dp.indices(len(items))  # all of them in one process
        gens = {i: torch.Generator().manual_seed(key_seed(cfg.seed, step, i, 9)) for i in mine}
        L = self.obj.canvas_length
        if cfg.micro_batching and not self.dp.active:  # FSDP: one per rank (the ranks' forwards must pair up)
            groups = [[mine[j] for j in g] for g in micro_batches([padded_length(items[i], L) for i in mine])]
        else:
            groups = [mine]
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        autocast = torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
        parts: dict[str, float] = {"tokens": 0}
        for group in groups:
            batch = make_batch([items[i] for i in group], self.obj, self.model.config.vocab_size, self.end_id,
                               self.pad_id, [gens[i] for i in group])
            share = len(group) / len(items)
            with autocast:
                loss, sub = compute_loss(self.model, batch, self.obj, cfg.grad_checkpoint, self.vision, self.soft_ids,
                                         any_rank=self.dp.any if self.dp.active else None)
            (loss * share).backward()
            for k, v in sub.items():
                parts[k] = parts.get(k, 0.0) + v * share
            parts["tokens"] += batch.num_tokens
        self.dp.sync_replicated_grads()
        parts = self.dp.sum_parts(parts)
        parts["micro_batches"] = len(groups)
        params = list(self.model.parameters()) + (list(self.vision.parameters()) if self.vision is not None else [])
        if self.dp.active:
            parts["grad_norm"] = self.dp.clip_grad_norm(params, cfg.clip)
        else:
            parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
        lr = lr_at(step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        parts["lr"] = lr
        return parts

    def save(self) -> None:
        self.model.eval()
        if self.dp.active:  # every rank joins the gathers; rank 0 writes
            model, optimizer = self.dp.whole_model(self.model, self.config), self.dp.full_optimizer_state(
                self.modules, self.opt)
        else:
            model, optimizer = self.model, self.opt.state_dict()
        if self.dp.leader:
            if self.save_base:
                save(model, self.config, self.gen, self.out, vision=self.vision)
            save_adapters(self.model, self.out)
            torch.save({"optimizer": optimizer, "step": self.step, "train_config": asdict(self.cfg),
                        "objective": asdict(self.obj), "by_name": self.dp.active}, self.out / STATE)
            if self.save_extra:
                self.save_extra(self.out)
        self.dp.barrier()

    def run(self) -> list[dict]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        curve_path = self.out / CURVE
        leader = self.dp.leader  # rank 0 writes the curve and shows progress
        if leader and self.step == 0 and curve_path.exists():
            curve_path.unlink()
        rows, t0, tokens = [], time.perf_counter(), 0
        end = min(cfg.steps, cfg.stop_after or cfg.steps)
        bar = _progress(cfg.progress and leader, self.step, cfg.steps)
        with curve_path.open("a") if leader else open(os.devnull, "w") as curve:
            while self.step < end:
                parts = self.train_step(self.step)
                self.step += 1
                tokens += parts["tokens"]
                rows.append({"step": self.step, **parts})
                curve.write(json.dumps(rows[-1]) + "\n")
                curve.flush()
                if bar is not None:
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == end:
                        bar.set_postfix(loss=f"{parts['loss']:.3f}", diff=f"{parts['diffusion']:.3f}",
                                        ar=f"{parts.get('ar', 0):.3f}", lr=f"{parts['lr']:.1e}",
                                        tok_s=f"{tokens / (time.perf_counter() - t0):,.0f}", refresh=False)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                    self.save()
        if bar is not None:
            bar.close()
        self.save()
        if leader:
            plot_loss_curve(curve_path)
        return rows


def _progress(enabled: bool, start: int, total: int):
    """A tqdm bar on a terminal (None otherwise, or without tqdm: the curve file has every step)."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def plot_loss_curve(curve_path: Path) -> Path | None:
    """loss_curve.png beside loss_curve.jsonl (the total, diffusion and next-token losses by step), when
    matplotlib is installed (the `plot` extra); returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in curve_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in rows]
    w = max(1, len(rows) // 60)  # a moving average over ~1/60 of the run, over the raw values drawn faint
    for key, label, color in (("loss", "total", "C0"), ("diffusion", "diffusion", "C1"),
                              ("ar", "next-token (encoder)", "C2")):
        if key in rows[0]:
            ys = [r.get(key, math.nan) for r in rows]
            ax.plot(steps, ys, color=color, alpha=0.25 if w > 1 else 1, linewidth=0.7)
            if w > 1:
                avg = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
                ax.plot(steps, avg, color=color, linewidth=1.4, label=f"{label} (mean of {w})")
            else:
                ax.lines[-1].set_label(label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss ({curve_path.parent.name})")
    ax.grid(alpha=0.3)
    ax.legend()
    out = curve_path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
