"""`torchrun --nproc-per-node N -m diffusiongemma bench --tensor-parallel N [--expert-parallel]`: one denoising
step and one commit, sharded over N processes, against one process, in one run.

Every rank loads its shard (memory-mapped slices), commits a prompt of `--context` tokens, then runs `--steps`
denoising steps of one canvas (after one warm-up step) and `--steps` commits of it. Reported: ms per step and
per commit (median and range), the bytes each rank puts into collectives per step by kind (attention,
mlp = dense MLP + MoE, embedding, self_conditioning, vocabulary) and per commit, each rank's weight memory, and
how far the sharded first step's outputs are from the one process's (max |hidden| difference, argmax agreement). Then
rank 0 alone loads the whole model and runs the same steps with all the machine's cores (the baseline).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from .. import parallel


def _measure(model_dir: Path, dtype: torch.dtype, tp, context: int, steps: int) -> dict:
    import diffusiongemma as dg

    from ..sampling.vocab import vocab_pass

    t0 = time.perf_counter()
    ck = dg.load(model_dir, dtype=dtype, vision=False, tp=tp)
    load_s = time.perf_counter() - t0
    model, L = ck.model, ck.config.canvas_length
    cap, vocab = model.config.final_logit_softcapping, model.config.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (context,), generator=g)
    canvas = torch.randint(0, vocab, (L,), generator=g)
    temps = torch.full((L,), 0.8)
    step_ms, commit_ms, sent, soft, hidden, res = [], [], {}, None, None, None
    with torch.inference_mode():
        cache = model.new_cache()
        model.encode(prompt, [cache], hidden=False)
        for s in range(steps + 1):  # the first is a warm-up
            uniforms = torch.rand(L, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            tp.reset_counts()
            t0 = time.perf_counter()
            hidden = model.decode(canvas, [cache], soft)
            res = vocab_pass(hidden, model.head_weight, cap, temps, uniforms, True, model.embed_scale())
            if s:
                step_ms.append(1000 * (time.perf_counter() - t0))
            else:  # the first step's outputs are compared (later steps feed back their own soft embedding)
                first_hidden, first_argmax = hidden, res.argmax
            soft = res.soft
        sent = dict(tp.sent)
        commit_sent = {}
        for s in range(steps + 1):
            c = model.new_cache()
            model.encode(prompt[:L], [c], hidden=False)
            tp.reset_counts()
            t0 = time.perf_counter()
            model.encode(canvas, [c], hidden=False)
            if s:
                commit_ms.append(1000 * (time.perf_counter() - t0))
            commit_sent = dict(tp.sent)
    return {"load_s": load_s, "weight_bytes": weight_bytes, "step_ms": step_ms, "commit_ms": commit_ms,
            "sent_per_step": sent, "sent_per_commit": commit_sent, "hidden": first_hidden, "argmax": first_argmax}


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.1f} ({min(xs):,.1f}-{max(xs):,.1f})"


def run(a, model_dir: Path) -> int:
    dtype = getattr(torch, a.dtype)
    tp = parallel.init(a.tensor_parallel, a.expert_parallel, timeout_s=600)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.size))
    mine = _measure(model_dir, dtype, tp, a.context_tokens, a.steps)
    weights = tp.all_gather(torch.tensor([mine["weight_bytes"]], dtype=torch.float64), "bench")[:, 0].tolist()
    parallel.shutdown()
    if tp.rank:
        return 0
    torch.set_num_threads(os.cpu_count() or 1)
    one = _measure(model_dir, dtype, parallel.SINGLE, a.context_tokens, a.steps)
    err = mine["hidden"].float() - one["hidden"].float()
    diff = (err.abs().max() / one["hidden"].float().abs().max()).item()
    rms = (err.pow(2).mean().sqrt() / one["hidden"].float().pow(2).mean().sqrt()).item()
    agree = (mine["argmax"] == one["argmax"]).float().mean().item()
    mib = 1 << 20
    print(f"checkpoint {model_dir} | {a.dtype} | tensor parallel {tp.size}"
          f"{' + expert parallel' if tp.expert_parallel else ''} | context {a.context_tokens} | {a.steps} steps | "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs ({torch.get_num_threads()} threads for one process, "
          f"{max(1, (os.cpu_count() or 1) // tp.size)} per rank)")
    print(f"{'':34} {'sharded':>24} {'one process':>24}")
    print(f"{'ms per denoising step':34} {_spread(mine['step_ms']):>24} {_spread(one['step_ms']):>24}")
    print(f"{'ms per commit':34} {_spread(mine['commit_ms']):>24} {_spread(one['commit_ms']):>24}")
    print(f"{'load s':34} {mine['load_s']:>24.1f} {one['load_s']:>24.1f}")
    print(f"{'weight MiB per rank':34} {' / '.join(f'{w / mib:,.0f}' for w in weights):>24} "
          f"{one['weight_bytes'] / mib:>24,.0f}")
    print("collective bytes per rank per step: " + ", ".join(
        f"{k} {v / 1024:,.0f} KiB" for k, v in sorted(mine["sent_per_step"].items())) +
        f" (total {sum(mine['sent_per_step'].values()) / mib:,.2f} MiB)")
    print("collective bytes per rank per commit: " + ", ".join(
        f"{k} {v / 1024:,.0f} KiB" for k, v in sorted(mine["sent_per_commit"].items())))
    print(f"sharded vs one process, first step: final hidden max |diff| / max |hidden| {diff:.3g}, RMS error / RMS {rms:.3g}, argmax agreement {agree:.1%}")
    out = {k: v for k, v in mine.items() if k not in ("hidden", "argmax")}
    print(json.dumps({"bench_parallel": {"tensor_parallel": tp.size, "expert_parallel": tp.expert_parallel,
                                         "dtype": a.dtype, "context": a.context_tokens, "model": str(model_dir),
                                         "sharded": out, "weight_bytes_per_rank": weights,
                                         "one_process": {k: v for k, v in one.items() if k not in ("hidden", "argmax")},
                                         "hidden_max_rel_diff": diff, "hidden_rms_rel_diff": rms, "argmax_agreement": agree}}))
    return 0
