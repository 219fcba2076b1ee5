"""What a running server tells its operator: Prometheus metrics at `/metrics` (prometheus-client) and one
structured log line per API request.

Metrics (each with its own registry, so several apps in one process do not collide): requests by route
and status; requests in flight, waiting and denoising; tokens generated; decoder and commit forwards;
histograms of tokens per forward, steps per canvas, time to the first committed token and the engine's
step time; the bytes held by active KV caches. The gauges are read when scraped, so `/health` and the
engine pay nothing for them.

The request log (logger `diffusiongemma.requests`, INFO): one JSON line per `/v1` request when its response
ends: method, path, status, seconds, and for generations the request id, decoding mode, finish reason,
prompt and completion tokens, time to first token, tokens per pass.
"""

from __future__ import annotations

import json
import logging
import time

requests_log = logging.getLogger("diffusiongemma.requests")


class Metrics:
    def __init__(self, runner):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        engine = runner.engine
        self.requests = Counter("diffusiongemma_requests", "API requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.tokens = Counter("diffusiongemma_generated_tokens", "tokens generated", registry=r)
        self.decoder = Counter("diffusiongemma_decoder_forwards", "denoising steps (decoder forwards)", registry=r)
        self.commits = Counter("diffusiongemma_commit_forwards", "encoder passes: prefills, commits, verifications",
                               registry=r)
        self.tpf = Histogram("diffusiongemma_tokens_per_forward", "tokens per denoising step, per request",
                             buckets=(0.5, 1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.spc = Histogram("diffusiongemma_steps_per_canvas", "denoising steps of each committed canvas",
                             buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256), registry=r)
        self.ttft = Histogram("diffusiongemma_time_to_first_token_seconds", "time to the first committed token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.step = Histogram("diffusiongemma_engine_step_seconds", "one engine step (all active requests)",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10), registry=r)
        Gauge("diffusiongemma_in_flight", "requests in flight (queued or running)",
              registry=r).set_function(lambda: runner.in_flight)
        Gauge("diffusiongemma_waiting", "requests queued for the engine", registry=r).set_function(
            lambda: engine.num_waiting)
        Gauge("diffusiongemma_active", "requests the engine is working on", registry=r).set_function(
            lambda: engine.num_active)
        Gauge("diffusiongemma_kv_cache_bytes", "bytes held by the active requests' KV caches",
              registry=r).set_function(engine.cache_bytes)
        if engine.prefix is not None:
            stats = engine.prefix_stats
            Gauge("diffusiongemma_prefix_cache_bytes", "bytes held by the prefix cache's blocks",
                  registry=r).set_function(lambda: stats()["bytes"])
            Gauge("diffusiongemma_prefix_cache_reused_tokens", "prompt tokens copied from the prefix cache (total)",
                  registry=r).set_function(lambda: stats()["reused_tokens"])
            Gauge("diffusiongemma_prefix_cache_prompt_tokens", "prompt tokens looked up in the prefix cache (total)",
                  registry=r).set_function(lambda: stats()["prompt_tokens"])

    def finished(self, stats) -> None:
        """A request's final statistics (called on the engine thread)."""
        self.tokens.inc(stats.completion_tokens)
        self.decoder.inc(stats.decoder_forwards)
        self.commits.inc(stats.commit_forwards)
        if stats.decoder_forwards:
            self.tpf.observe(stats.tokens_per_forward)
        for s in stats.steps_per_canvas:
            self.spc.observe(s)
        if stats.ttft_s is not None:
            self.ttft.observe(stats.ttft_s)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Observe:
    """ASGI middleware: counts each `/v1` response by route and status and writes its log line (the handler
    adds the generation's details to `scope["state"]["log"]`)."""

    def __init__(self, app, metrics: Metrics | None):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]
        scope.setdefault("state", {})

        async def watch(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models") else "other"
            if self.metrics is not None:
                self.metrics.requests.labels(route, str(status[0] or 499)).inc()
            if requests_log.isEnabledFor(logging.INFO):
                line = {"method": scope.get("method"), "path": path, "status": status[0] or 499,
                        "seconds": round(time.perf_counter() - t0, 4), **scope["state"].get("log", {})}
                requests_log.info(json.dumps(line))


def generation_log(rid: str, result) -> dict:
    st = result.stats
    return {"id": rid, "decoding": st.decoding, "finish_reason": result.chat_finish_reason,
            "prompt_tokens": st.prompt_tokens, "completion_tokens": st.completion_tokens,
            "ttft_s": round(st.ttft_s or 0.0, 4), "tokens_per_pass": round(st.tokens_per_pass, 3)}
