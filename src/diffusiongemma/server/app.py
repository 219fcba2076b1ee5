"""The OpenAI-compatible HTTP server and the browser view of the canvas.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, and the page
at / (static files under /static). Streaming is server-sent events in the OpenAI chunk format; with
`stream_options.include_draft` the stream also carries draft frames, chunks with empty `choices` and
a `draft` object per denoising step (canvas text per position, accepted flags, entropies, step).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.middleware.base import BaseHTTPMiddleware

from ..engine import DraftEvent, RequestError
from ..generation import Generator, Result
from ..text.chat import ChatError
from ..text.media import MediaPolicy
from ..text.parser import Delta
from ..vision.preprocess import ImageError
from .protocol import APIError, new_id, now, parse_request, usage
from .runner import EngineFailure, EngineRunner

log = logging.getLogger("diffusiongemma.server")


@dataclass
class ServerSettings:
    max_concurrent: int = 16  # requests in flight (running or queued); more get 429
    max_batch: int = 8  # requests denoising together
    max_prompt_tokens: int = 8192
    max_tokens: int = 4096
    max_body_bytes: int = 16 * 1024 * 1024
    api_key: str | None = None
    allow_local_images: bool = False  # image parts may name local files (never network URLs)
    compile: bool = False  # the compiled step runner (Engine(runner="compiled")), warmed up before serving


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class _Guard(BaseHTTPMiddleware):
    """API key (when configured) and body size limit, before any handler runs."""

    def __init__(self, app, settings: ServerSettings):
        super().__init__(app)
        self.s = settings

    async def dispatch(self, request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if self.s.api_key and request.headers.get("authorization") != f"Bearer {self.s.api_key}":
                return _error(APIError(401, "missing or wrong API key", code="invalid_api_key",
                                       type_="authentication_error"))
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.s.max_body_bytes:
                return _error(APIError(413, f"request body of {length} bytes exceeds the limit of "
                                            f"{self.s.max_body_bytes}", code="request_too_large"))
        return await call_next(request)


def create_app(checkpoint, settings: ServerSettings | None = None, model_name: str | None = None) -> FastAPI:
    """The app serving a `load()`ed checkpoint (with its tokenizer)."""
    settings = settings or ServerSettings()
    name = model_name or checkpoint.name
    gen = Generator(checkpoint, max_batch=settings.max_batch,
                    max_context=checkpoint.config.text.max_position_embeddings,
                    runner="compiled" if settings.compile else "eager")
    engine, tokenizer = gen.engine, gen.tokenizer
    media_policy = MediaPolicy(allow_local_paths=settings.allow_local_images)
    runner = EngineRunner(gen, settings.max_concurrent)
    app = FastAPI(title="diffusiongemma", docs_url=None, redoc_url=None)
    app.add_middleware(_Guard, settings=settings)
    app.state.runner, app.state.settings, app.state.model_name = runner, settings, name

    @app.on_event("startup")
    async def _start():
        if settings.compile:  # compile before the first request, not during it
            say = logging.getLogger("uvicorn.error")  # shown at uvicorn's log level, beside its own startup lines
            say.info("compiling the engine step (once, before serving) ...")
            say.info("compiled and warmed up in %.0f s", engine.warm_up())
        runner.start()

    @app.on_event("shutdown")
    async def _stop():
        runner.stop()

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("internal error")
        return _error(APIError(500, f"internal error: {type(e).__name__}", type_="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "in_flight": runner.in_flight}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "diffusiongemma"}]}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(_static("index.html"))

    @app.get("/static/{path}")
    async def static(path: str):
        kinds = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".png": "image/png"}
        suffix = path[path.rfind("."):] if "." in path else ""
        if "/" in path or suffix not in kinds:
            raise APIError(404, "not found", type_="not_found_error")
        try:
            data = resources.files("diffusiongemma.server").joinpath("static", path).read_bytes()
        except (FileNotFoundError, OSError):
            raise APIError(404, "not found", type_="not_found_error") from None
        return Response(data, media_type=kinds[suffix])

    async def _body(request: Request):
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise APIError(413, "request body too large", code="request_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"invalid JSON body: {e}") from None

    def _submit(prompt, parsed):
        if len(prompt.ids) > settings.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt.ids)} tokens, more than this server's limit of "
                                f"{settings.max_prompt_tokens}", param="messages", code="context_length_exceeded")
        if runner.in_flight >= settings.max_concurrent:
            raise APIError(429, f"too many requests in flight ({settings.max_concurrent}); retry later",
                           code="rate_limit_exceeded", type_="rate_limit_error")
        try:
            return runner.submit(prompt, parsed.params, parsed.options)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param,
                           code="context_length_exceeded" if "context" in str(e) else None) from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _body(request)
        parsed = parse_request(body, "chat", checkpoint.generation_config, name, settings.max_tokens)
        try:
            prompt = gen.chat(body.get("messages"), parsed.tools, parsed.thinking, media_policy, parsed.tool_choice)
        except ChatError as e:
            msg = str(e)
            param = "tool_choice" if msg.startswith("tool_choice") else "tools" if "tools" in msg else "messages"
            raise APIError(400, msg, param=param) from None
        except ImageError as e:
            raise APIError(400, f"invalid image: {e}", param="messages", code="invalid_image") from None
        rid, queue = _submit(prompt, parsed)
        return await _respond(request, rid, queue, parsed, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        parsed = parse_request(body, "completion", checkpoint.generation_config, name, settings.max_tokens)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string (one prompt per request)", param="prompt")
        rid, queue = _submit(gen.text(prompt), parsed)
        return await _respond(request, rid, queue, parsed, "completion")

    async def _respond(request, rid, queue, parsed, kind):
        cid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        created = now()
        if parsed.stream:
            return StreamingResponse(_sse(request, rid, queue, parsed, kind, cid, created),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        try:
            result = await _drain(queue)
        except BaseException:
            runner.cancel(rid)
            raise
        return _final(result, kind, cid, created)

    async def _drain(queue) -> Result:
        while True:
            out = await queue.get()
            if isinstance(out, Exception):
                raise APIError(500, str(out), type_="server_error")
            if isinstance(out, Result):
                return out

    def _finish_reason(result: Result, kind: str) -> str:
        return result.chat_finish_reason if kind == "chat" else result.finish_reason

    def _final(result: Result, kind, cid, created):
        if kind == "completion":
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": result.content, "finish_reason": result.finish_reason,
                                 "logprobs": None}], "usage": usage(result.stats)}
        msg = {"role": "assistant", "content": result.content or (None if result.tool_calls else "")}
        if result.reasoning:
            msg["reasoning_content"] = result.reasoning
        if result.tool_calls:
            msg["tool_calls"] = [_call_json(c, i) for i, c in enumerate(result.tool_calls)]
        choice = {"index": 0, "message": msg, "finish_reason": result.chat_finish_reason, "logprobs": None}
        if result.tool_call_errors:
            choice["tool_call_errors"] = result.tool_call_errors
        return {"id": cid, "object": "chat.completion", "created": created, "model": name, "choices": [choice],
                "usage": usage(result.stats)}

    async def _sse(request, rid, queue, parsed, kind, cid, created):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        n_calls = 0

        def chunk(delta=None, finish=None, **extra):
            if kind == "chat":
                choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                     "logprobs": None}]
            else:
                choices = [] if delta is None else [{"index": 0, "text": delta.get("content", ""),
                                                     "finish_reason": finish, "logprobs": None}]
            return "data: " + json.dumps({"id": cid, "object": obj, "created": created, "model": name,
                                          "choices": choices, **extra}, ensure_ascii=False) + "\n\n"

        def delta_chunk(d: Delta):
            nonlocal n_calls
            if d.kind == "content":
                return chunk({"content": d.text})
            if d.kind == "reasoning" and kind == "chat":
                return chunk({"reasoning_content": d.text})
            if d.kind == "tool_call" and kind == "chat":
                n_calls += 1
                return chunk({"tool_calls": [_call_json(d.call, n_calls - 1, delta=True)]})
            return None

        finished = False
        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    out = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if isinstance(out, Exception):
                    finished = True
                    yield "data: " + json.dumps(APIError(500, str(out), type_="server_error").body()) + "\n\n"
                    return
                if isinstance(out, DraftEvent):
                    yield chunk(draft=_draft(out))
                elif isinstance(out, Delta):
                    c = delta_chunk(out)
                    if c is not None:
                        yield c
                elif isinstance(out, Result):
                    finished = True
                    yield chunk({}, finish=_finish_reason(out, kind))
                    if parsed.include_usage:
                        yield chunk(usage=usage(out.stats))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:  # the client went away: stop generating and free the cache
                runner.cancel(rid)

    def _draft(ev: DraftEvent) -> dict:
        ids = ev.argmax.tolist()
        return {"request": ev.request_id, "canvas": ev.canvas, "step": ev.step, "temperature": round(ev.temperature, 4),
                "tokens": [tokenizer.decode([i]) for i in ids], "ids": ids,
                "accepted": ev.accepted.tolist(), "entropy": [round(h, 3) for h in ev.entropy.tolist()],
                "finished": ev.finished_denoising, "committed_tokens": ev.committed_tokens}

    return app


def _call_json(call, index: int, delta: bool = False) -> dict:
    d = {"id": new_id("call"), "type": "function",
         "function": {"name": call.name, "arguments": call.arguments_json()}}
    if delta:
        d["index"] = index
    return d


def _static(name: str) -> str:
    return resources.files("diffusiongemma.server").joinpath("static", name).read_text()


__all__ = ["EngineFailure", "ServerSettings", "create_app"]
