"""`diffusiongemma bench --curve context|concurrency|canvases`: how cost grows with the work, ours beside the
reference (transformers 5.23.0) in one process, each curve a table, a JSON line and a PNG chart.

- context: ms per denoising step and per commit against the committed context (our cache is filled with
  random keys and values of the right shapes, which costs what real ones cost; the reference prefills real
  prompts, up to `--ref-max-context`), and KV-cache bytes per committed token on both sides (ours: what is
  stored; the JSON also gives what is allocated, up to twice that, as storage grows by doubling).
- concurrency: tokens/s and p50/p95 request latency against concurrent requests, through our engine (each
  request its own forward, the CPU default, and packed into one forward), through the server when the
  checkpoint has a tokenizer, and the reference's lock-step batch (up to `--ref-max-batch`).
- canvases: tokens/s against answer length in canvases.

Through the server a request stops at the model's end of turn (the API has no switch for stop ids), so its
tokens/s counts the tokens it returned, while the engine's requests run their whole canvas.

Every request runs `--steps` denoising steps per canvas (`fixed`: the stopping rule never fires) with stop ids
off, so both sides do the same work and each point's cost is its shape's, not the sampler's luck.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .chart import environment, median_spread, percentile, report


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _cache_bytes(cache) -> int:
    """Bytes of a transformers cache (its layers' keys and values)."""
    return sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))


class Reference:
    """The reference model with its denoising steps and encoder passes timed."""

    def __init__(self, model_dir: Path, dtype):
        from transformers import DiffusionGemmaForBlockDiffusion
        from transformers.models.diffusion_gemma import generation_diffusion_gemma as gen_mod

        self.model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(model_dir), dtype=dtype).eval()
        self.L = self.model.config.canvas_length
        self.clock: dict[str, list[float]] = {"step": [], "encoder": []}
        mixin = gen_mod.DiffusionGemmaGenerationMixin
        step, enc = mixin._denoising_step, self.model.model.encoder.forward

        def timed(fn, key):
            def wrapper(*x, **k):
                t0 = time.perf_counter()
                out = fn(*x, **k)
                self.clock[key].append(time.perf_counter() - t0)
                return out
            return wrapper

        mixin._denoising_step = timed(step, "step")
        self.model.model.encoder.forward = timed(enc, "encoder")
        self.generate([[10] * 8], self.L, 1)  # first-use costs are not a point's

    def generate(self, batch: list[list[int]], max_tokens: int, steps: int):
        for v in self.clock.values():
            v.clear()
        with torch.no_grad():
            return self.model.generate(torch.tensor(batch), max_new_tokens=max_tokens, max_denoising_steps=steps,
                                       confidence_threshold=1e-30, eos_token_id=None)


def _ours(model_dir: Path, dtype, **engine_kw):
    import diffusiongemma as dg

    from ..engine import Engine

    ck = dg.load(model_dir, dtype=dtype, vision=False)
    engine = Engine.from_checkpoint(ck, **engine_kw)
    engine.timings.enabled = True
    return ck, engine


def _params(steps: int, max_tokens: int, seed: int = 0):
    from ..engine import SamplingParams

    return SamplingParams(max_tokens=max_tokens, max_denoising_steps=steps, confidence_threshold=1e-30,
                          stop_token_ids=(), seed=seed)


# -- context -----------------------------------------------------------------------------------------------
def _filled_cache(model, n: int, spare: int):
    cfg, cache = model.config, model.new_cache(spare=spare)
    g = torch.Generator().manual_seed(n)
    for i in range(cfg.num_hidden_layers):
        h, d = cfg.layer_kv_heads(i), cfg.layer_head_dim(i)
        keep = min(n, cfg.sliding_window - 1 + spare) if cfg.is_sliding(i) else n
        cache.append(i, torch.randn(h, keep, d, generator=g).to(model.dtype),
                     torch.randn(h, keep, d, generator=g).to(model.dtype))
    cache.advance(torch.arange(n))
    return cache


def context(a, model_dir: Path, out: Path) -> dict:
    dtype = getattr(torch, a.dtype)
    ck, engine = _ours(model_dir, dtype)
    runner, model, L = engine.runner, ck.model, ck.config.canvas_length
    vocab = ck.config.text.vocab_size
    ours = []
    for n in a.contexts:
        cache = _filled_cache(model, n, spare=L)
        r = SimpleNamespace(canvas=torch.tensor(_ids(L, vocab, n)), soft=None, cache=cache, wants_soft=True,
                            to_encode=_ids(L, vocab, n + 1), images=None, needs_hidden=False,
                            stats=SimpleNamespace(commit_forwards=1))
        temps = torch.full((L,), 0.8)
        step_ms, commit_ms = [], []
        with torch.inference_mode():
            for s in range(a.steps + 1):  # the first is a warm-up
                uniforms = torch.rand(L, generator=torch.Generator().manual_seed(s))
                t0 = time.perf_counter()
                res = runner.denoise([r], [0.8], temps, uniforms)[0]
                if s:
                    step_ms.append(1000 * (time.perf_counter() - t0))
                r.soft = res.soft
            for s in range(max(2, a.steps // 2) + 1):
                t0 = time.perf_counter()
                runner.encode([r])
                if s:
                    commit_ms.append(1000 * (time.perf_counter() - t0))
                cache.truncate(L)
        plain = _filled_cache(model, n, spare=0)  # a diffusion request's cache (the commit's spare rows aside)
        ours.append({"context": n, "ms_step": median_spread(step_ms), "ms_commit": median_spread(commit_ms),
                     "kv_bytes_per_token": plain.stored_bytes() / n if n else None,
                     "kv_allocated_bytes_per_token": plain.nbytes() / n if n else None})
        print(f"  ours at {n}: {ours[-1]['ms_step']['median']:.0f} ms per step", flush=True)
    ref = []
    if "reference" in a.sides:
        reference = Reference(model_dir, dtype)
        for n in [c for c in a.contexts if c <= a.ref_max_context]:
            t0 = time.perf_counter()
            o = reference.generate([_ids(max(n, 1), vocab, n)], 2 * L, a.steps)
            ck_, held = reference.clock, o.past_key_values.get_seq_length()  # its prompt and committed canvases
            ref.append({"context": n, "ms_step": median_spread([1000 * x for x in ck_["step"]]),
                        "ms_commit": median_spread([1000 * x for x in ck_["encoder"][1:]] or [0.0]),
                        "kv_tokens": held, "kv_bytes_per_token": _cache_bytes(o.past_key_values) / held,
                        "ours_kv_bytes_per_token_at_its_length": _filled_cache(model, held, 0).stored_bytes() / held})
            print(f"  reference at {n}: {ref[-1]['ms_step']['median']:.0f} ms per step "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    by_ref = {x["context"]: x for x in ref}
    rows = []
    for x in ours:
        y = by_ref.get(x["context"])
        rows.append([x["context"], x["ms_step"]["median"], y and y["ms_step"]["median"],
                     y and y["ms_step"]["median"] / x["ms_step"]["median"], x["ms_commit"]["median"],
                     y and y["ms_commit"]["median"], x["kv_bytes_per_token"], y and y["kv_tokens"],
                     y and y["ours_kv_bytes_per_token_at_its_length"], y and y["kv_bytes_per_token"]])
    xs = [x["context"] for x in ours]
    rx = [x["context"] for x in ref]
    panels = [("ms per denoising step", {"ours": (xs, [x["ms_step"]["median"] for x in ours]),
                                         "reference": (rx, [x["ms_step"]["median"] for x in ref])}),
              ("ms per commit", {"ours": (xs, [x["ms_commit"]["median"] for x in ours]),
                                 "reference": (rx, [x["ms_commit"]["median"] for x in ref])}),
              ("KV-cache bytes per token", {"ours": (xs[1:], [x["kv_bytes_per_token"] for x in ours[1:]]),
                                            "reference": ([x["kv_tokens"] for x in ref],
                                                          [x["kv_bytes_per_token"] for x in ref])})]
    return report("context", out, f"cost against committed context | {model_dir} | {a.dtype} | {a.steps} steps",
                  ["context", "ms/step ours", "ms/step ref", "ratio", "ms/commit ours", "ms/commit ref",
                   "KV B/token ours", "ref holds", "ours at that", "ref at that"], rows,
                  {"env": environment(model=str(model_dir), dtype=a.dtype, steps=a.steps), "ours": ours,
                   "reference": ref}, "committed context (tokens)", panels, logx=True)


# -- concurrency -------------------------------------------------------------------------------------------
def _latencies(done: list[float]) -> dict:
    return {"p50_s": percentile(done, 0.5), "p95_s": percentile(done, 0.95)}


def _engine_point(engine, prompts, params) -> dict:
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for c in out)
    return {"tokens_per_s": tokens / wall, "requests_per_s": len(prompts) / wall,
            **_latencies([c.stats.total_s for c in out]), "wall_s": wall}


def _server_point(url: str, prompts_text: list[str], steps: int, max_tokens: int) -> dict:
    import httpx

    lat, tokens, errors = [], [], []
    # one client for all threads: `httpx.post` builds a client (and an SSL context) per call, client-side work
    # that would be counted in the server's latency and compete with it for the cores
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=len(prompts_text)))

    def one(i):
        t0 = time.perf_counter()
        r = client.post(url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": prompts_text[i]}], "max_tokens": max_tokens, "seed": i,
            "max_denoising_steps": steps, "confidence_threshold": 1e-30})
        lat.append(time.perf_counter() - t0)
        if r.status_code != 200:
            errors.append(r.text[:200])
            return
        tokens.append(r.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts_text))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    client.close()
    if errors:
        raise SystemExit(f"the server refused a request: {errors[0]}")
    return {"tokens_per_s": sum(tokens) / wall, "requests_per_s": len(prompts_text) / wall, **_latencies(lat),
            "wall_s": wall}


def concurrency(a, model_dir: Path, out: Path) -> dict:
    dtype = getattr(torch, a.dtype)
    ck, engine = _ours(model_dir, dtype, max_batch=max(a.concurrency))
    _, packed = _ours(model_dir, dtype, max_batch=max(a.concurrency), batch_invariant=False)
    L, vocab = ck.config.canvas_length, ck.config.text.vocab_size
    prompts = [_ids(a.prompt_tokens, vocab, 100 + i) for i in range(max(a.concurrency))]
    params = _params(a.steps, L)
    engine.warm_up()
    packed.warm_up()
    series: dict[str, list[dict]] = {"engine": [], "engine packed": []}
    for n in a.concurrency:
        series["engine"].append({"n": n, **_engine_point(engine, prompts[:n], params)})
        series["engine packed"].append({"n": n, **_engine_point(packed, prompts[:n], params)})
        print(f"  ours at {n}: {series['engine'][-1]['tokens_per_s']:.1f} / "
              f"{series['engine packed'][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    if ck.tokenizer is not None:  # the server needs a tokenizer
        series["server"] = _server_series(a, model_dir, ck, L)
    if "reference" in a.sides:
        reference, series["reference lock-step"] = Reference(model_dir, dtype), []
        for n in [c for c in a.concurrency if c <= a.ref_max_batch]:
            t0 = time.perf_counter()
            o = reference.generate(prompts[:n], L, a.steps)
            wall = time.perf_counter() - t0
            series["reference lock-step"].append({"n": n, "tokens_per_s": o.sequences[:, a.prompt_tokens:].numel() / wall,
                                                  "requests_per_s": n / wall, "p50_s": wall, "p95_s": wall,
                                                  "wall_s": wall})
            print(f"  reference at {n}: {series['reference lock-step'][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    rows = [[name, x["n"], x["tokens_per_s"], x["requests_per_s"], x["p50_s"], x["p95_s"]]
            for name, pts in series.items() for x in pts]
    panels = [("tokens/s", {k: ([x["n"] for x in v], [x["tokens_per_s"] for x in v]) for k, v in series.items()}),
              ("requests/s", {k: ([x["n"] for x in v], [x["requests_per_s"] for x in v]) for k, v in series.items()}),
              ("p95 latency (s)", {k: ([x["n"] for x in v], [x["p95_s"] for x in v]) for k, v in series.items()})]
    return report("concurrency", out, f"throughput against concurrent requests | {model_dir} | {a.dtype} | "
                  f"{a.prompt_tokens}-token prompts, one canvas of {a.steps} steps each",
                  ["path", "requests", "tokens/s", "requests/s", "p50 s", "p95 s"], rows,
                  {"env": environment(model=str(model_dir), dtype=a.dtype, steps=a.steps), "series": series},
                  "concurrent requests", panels)


def _server_series(a, model_dir: Path, ck, L: int) -> list[dict]:
    """The same requests through `diffusiongemma serve`, run as a user runs it: in its own process."""
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    n = max(a.concurrency)
    proc = subprocess.Popen([sys.executable, "-m", "diffusiongemma", "serve", "--model", str(model_dir), "--port",
                             str(port), "--dtype", a.dtype, "--max-batch", str(n), "--max-concurrent", str(2 * n),
                             "--prefix-cache-mib", "0", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
        texts = [f"Sort the numbers: {' '.join(str((7 * i + j) % 50) for j in range(6))}" for i in range(n)]
        out = []
        _server_point(url, texts[:1], a.steps, L)  # warm-up
        for k in a.concurrency:
            out.append({"n": k, **_server_point(url, texts[:k], a.steps, L)})
            print(f"  server at {k}: {out[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- canvases ----------------------------------------------------------------------------------------------
def canvases(a, model_dir: Path, out: Path) -> dict:
    dtype = getattr(torch, a.dtype)
    ck, engine = _ours(model_dir, dtype)
    L, vocab = ck.config.canvas_length, ck.config.text.vocab_size
    prompt = _ids(a.prompt_tokens, vocab, 5)
    engine.warm_up()
    reference = Reference(model_dir, dtype) if "reference" in a.sides else None
    rows, ours, ref = [], [], []
    for k in a.canvases:
        runs = []
        for rep in range(a.repeats):
            runs.append(_engine_point(engine, [prompt], _params(a.steps, k * L, rep))["tokens_per_s"])
        ours.append({"canvases": k, "tokens_per_s": median_spread(runs)})
        y = None
        if reference is not None and k <= a.ref_max_canvases:
            t0 = time.perf_counter()
            o = reference.generate([prompt], k * L, a.steps)
            y = o.sequences[0, len(prompt):].numel() / (time.perf_counter() - t0)
            ref.append({"canvases": k, "tokens_per_s": y})
        rows.append([k, k * L, ours[-1]["tokens_per_s"]["median"], y, y and ours[-1]["tokens_per_s"]["median"] / y])
        print(f"  {k} canvases: ours {ours[-1]['tokens_per_s']['median']:.1f} tokens/s", flush=True)
    panels = [("tokens/s", {"ours": ([x["canvases"] for x in ours], [x["tokens_per_s"]["median"] for x in ours]),
                            "reference": ([x["canvases"] for x in ref], [x["tokens_per_s"] for x in ref])})]
    return report("canvases", out, f"throughput against answer length | {model_dir} | {a.dtype} | {a.steps} steps "
                  "per canvas", ["canvases", "tokens", "tokens/s ours", "tokens/s ref", "ratio"], rows,
                  {"env": environment(model=str(model_dir), dtype=a.dtype, steps=a.steps), "ours": ours,
                   "reference": ref}, "canvases per answer", panels, logx=True)


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {s!r}") from None


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """`bench`'s curve options."""
    c = ap.add_argument_group("curves (--curve): how cost grows; each a table, a JSON line and a PNG under --out")
    c.add_argument("--curve", choices=["prefix", "context", "concurrency", "canvases"],
                   help="prefix: TTFT per chat turn with and without the prefix cache; context: step and commit cost "
                        "against committed context; concurrency: tokens/s and latency against concurrent requests; "
                        "canvases: tokens/s against answer length")
    c.add_argument("--out", default="bench-curves", help="where curves write their JSON and PNG")
    c.add_argument("--turns", type=int, default=3, help="prefix: chat turns")
    c.add_argument("--system-tokens", type=int, default=2048, help="prefix, without a tokenizer: system prompt ids")
    c.add_argument("--turn-tokens", type=int, default=64, help="prefix, without a tokenizer: ids per user turn")
    c.add_argument("--prefix-cache-mib", type=int, default=1024, help="prefix: the cache's size")
    c.add_argument("--contexts", type=_int_list, default=[0, 1024, 4096, 16384, 32768], help="context: lengths")
    c.add_argument("--ref-max-context", type=int, default=4096, help="context: the reference's longest")
    c.add_argument("--concurrency", type=_int_list, default=[1, 2, 4, 8, 16], help="concurrency: request counts")
    c.add_argument("--ref-max-batch", type=int, default=16, help="concurrency: the reference's largest batch")
    c.add_argument("--canvases", type=_int_list, default=[1, 4, 16], help="canvases: answer lengths")
    c.add_argument("--ref-max-canvases", type=int, default=16, help="canvases: the reference's longest")
    c.add_argument("--prompt-tokens", type=int, default=32, help="concurrency, canvases: prompt length")


def run(a, model_dir: Path, out: Path) -> int:
    fn = {"context": context, "concurrency": concurrency, "canvases": canvases}[a.curve]
    fn(a, model_dir, out)
    return 0

