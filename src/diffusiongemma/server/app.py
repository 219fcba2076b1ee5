"""The OpenAI-compatible HTTP server and the browser view of the canvas.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, and the page
at / (static files under /static). Streaming is server-sent events in the OpenAI chunk format; with
`stream_options.include_draft` the stream also carries draft frames, chunks with empty `choices` and
a `draft` object per denoising step (canvas text per position, accepted flags, entropies, step).

What runs where: the event loop only moves bytes. Parsing the JSON body, checking it, templating,
tokenizing and decoding images run in worker threads, behind limits checked before the work (the body's
size before it is read, the text's size before it is tokenized: a prompt that cannot fit is refused
without tokenizing it); the engine runs on its own thread (`runner`). Every error is an OpenAI error
object, on every route; no input makes a 500 (a property-based test throws random JSON at every field).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine import RequestError
from ..generation import Generator
from ..text.chat import ChatError
from ..text.media import MediaPolicy
from ..vision.preprocess import ImageError
from .errors import APIError
from .metrics import Metrics, Observe
from .protocol import Limits, fit_max_tokens, parse_request
from .responses import Watch, drain, final_json, sse
from .runner import EngineFailure, EngineRunner
from .schema import validate
from .security import Guard, GuardedH11Protocol

log = logging.getLogger("diffusiongemma.server")
MAX_INT_DIGITS = 30  # an integer in a request body with more digits is refused (no field needs more)


@dataclass
class ServerSettings:
    max_concurrent: int = 16  # requests in flight (running or queued); more get 429
    max_batch: int = 8  # requests denoising together
    max_prompt_tokens: int = 8192
    limits: Limits = field(default_factory=Limits)  # max_tokens, step caps a request may ask for
    request_timeout_s: float = 600.0  # a request still running after this is cancelled (504)
    max_body_bytes: int = 16 * 1024 * 1024
    body_timeout_s: float = 30.0  # the whole body must arrive within this
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    max_connections: int = 64  # open connections; more get 503 (uvicorn's limit_concurrency)
    api_key: str | None = None
    exposed: bool = False  # bound beyond loopback: no Host / Origin check (a key is then required by serve)
    image_dirs: tuple[Path, ...] = ()  # directories image parts may name files under (never network URLs)
    max_image_bytes: int = 16 * 1024 * 1024
    compile: bool = False  # the compiled step runner (Engine(runner="compiled")), warmed up before serving
    prefix_cache_bytes: int = 1 << 30  # the prefix cache (`engine.prefix`); 0 turns it off
    prefix_block: int = 16  # tokens per prefix-cache block
    # the engine loop on a thread of its own, started with the app; `serve` sets False and runs the loop on the
    # main thread itself (`app.state.runner.run()`), where PyTorch's CPU ops run faster
    engine_thread: bool = True


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer with more than {MAX_INT_DIGITS} digits")
    return int(text)


def _load_json(raw: bytes):
    try:
        return json.loads(raw, parse_int=_parse_int)
    except RecursionError:
        raise APIError(400, "invalid JSON body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"invalid JSON body: {e}") from None


def _text_bytes(value) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    return 0


def server_generator(checkpoint, s: ServerSettings) -> Generator:
    """The generator (and engine) a server runs; every rank of a tensor-parallel server builds the same one."""
    return Generator(checkpoint, max_batch=s.max_batch, max_context=checkpoint.config.text.max_position_embeddings,
                     runner="compiled" if s.compile else "eager", prefix_cache=s.prefix_cache_bytes,
                     prefix_block=s.prefix_block, lockstep=True)


def create_app(checkpoint, settings: ServerSettings | None = None, model_name: str | None = None) -> FastAPI:
    """The app serving a `load()`ed checkpoint (with its tokenizer)."""
    s = settings or ServerSettings()
    name = model_name or checkpoint.name
    gen = server_generator(checkpoint, s)
    engine, tokenizer = gen.engine, gen.tokenizer
    media = MediaPolicy(allow_local_paths=bool(s.image_dirs), roots=tuple(s.image_dirs), max_bytes=s.max_image_bytes)
    runner = EngineRunner(gen, s.max_concurrent)
    metrics = _metrics(runner)
    if metrics is not None:
        runner.on_result, runner.on_step = metrics.finished, metrics.step.observe
    token_bytes = max(len(t.encode("utf-8")) for t in tokenizer.tk.get_vocab())  # the most text one token holds
    app = FastAPI(title="diffusiongemma", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, settings=s)
    app.add_middleware(Observe, metrics=metrics)  # outermost: it sees the guard's refusals too
    app.state.runner, app.state.settings, app.state.model_name = runner, s, name

    @app.on_event("startup")
    async def _start():
        if not s.engine_thread:  # the caller runs the loop (and any warm-up) on its own thread
            return
        if s.compile:  # compile before the first request, not during it
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

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):  # unknown routes, wrong methods: OpenAI errors too
        return _error(APIError(e.status_code, str(e.detail).lower(), code="not_found" if e.status_code == 404 else None,
                               headers=dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("internal error")
        return _error(APIError(500, f"internal error: {type(e).__name__}", type_="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "in_flight": runner.in_flight}

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            raise APIError(404, "metrics need prometheus-client (pip install prometheus-client)", code="not_found")
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "diffusiongemma",
                                            "max_model_len": engine.max_context,
                                            "prefix_cache": engine.prefix_stats()}]}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(_static("index.html"))

    @app.get("/static/{path}")
    async def static(path: str):
        kinds = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".png": "image/png"}
        suffix = path[path.rfind("."):] if "." in path else ""
        if "/" in path or "\\" in path or path.startswith(".") or suffix not in kinds:
            raise APIError(404, "not found", code="not_found")
        try:
            data = resources.files("diffusiongemma.server").joinpath("static", path).read_bytes()
        except (FileNotFoundError, OSError):
            raise APIError(404, "not found", code="not_found") from None
        return Response(data, media_type=kinds[suffix])

    def _prepare(raw: bytes, kind: str):
        """In a worker thread: the body checked, mapped to settings, and its prompt built (templated,
        tokenized, images decoded), with the prompt's size bounded before it is tokenized."""
        body = validate(_load_json(raw), kind)
        parsed = parse_request(body, kind, checkpoint.generation_config, name, s.limits)
        text = body.get("messages") if kind == "chat" else body.get("prompt")
        if _text_bytes(text) + _text_bytes(body.get("tools")) > s.max_prompt_tokens * token_bytes:
            raise APIError(400, f"the prompt cannot fit in this server's limit of {s.max_prompt_tokens} tokens",
                           param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
        try:
            if kind == "chat":
                prompt = gen.chat(body["messages"], parsed.tools, parsed.thinking, media, parsed.tool_choice)
            else:
                p = body["prompt"]
                if isinstance(p, list):
                    if len(p) != 1:
                        raise APIError(400, "prompt must be one string (one prompt per request)", param="prompt")
                    p = p[0]
                if not p:
                    raise APIError(400, "prompt must be a non-empty string", param="prompt")
                prompt = gen.text(p)
        except ChatError as e:
            msg = str(e)
            param = "tool_choice" if msg.startswith("tool_choice") else "tools" if "tools" in msg else "messages"
            raise APIError(400, msg, param=param) from None
        except ImageError as e:
            raise APIError(400, f"invalid image: {e}", param="messages", code="invalid_image") from None
        if len(prompt.ids) > s.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt.ids)} tokens, more than this server's limit of "
                                f"{s.max_prompt_tokens}", param="messages", code="context_length_exceeded")
        fit_max_tokens(parsed, len(prompt.ids), engine.max_context, engine.canvas_length,
                       checkpoint.generation_config, s.limits)
        return parsed, prompt

    async def _handle(request: Request, kind: str):
        raw = await request.body()  # already read and bounded by the guard
        parsed, prompt = await asyncio.to_thread(_prepare, raw, kind)
        if runner.in_flight >= s.max_concurrent:
            raise APIError(429, f"too many requests in flight ({s.max_concurrent}); retry later",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        try:
            rid, queue = runner.submit(prompt, parsed.params, parsed.options)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param,
                           code="context_length_exceeded" if "context" in str(e) else None) from None
        watch = Watch(request, queue, lambda: runner.cancel(rid), s.request_timeout_s, rid)
        if parsed.stream:
            return StreamingResponse(sse(watch, kind, name, parsed.include_usage, tokenizer),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        try:
            result = await drain(watch)
        except ConnectionAbortedError:
            return Response(status_code=499)  # nobody is listening; the request was cancelled
        except BaseException:
            runner.cancel(rid)
            raise
        return final_json(result, kind, name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(request, "completion")

    return app


def _metrics(runner):
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return None
    return Metrics(runner)


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "info"):
    """uvicorn's configuration for the app: the guarded HTTP protocol (header deadline), the connection cap."""
    import uvicorn

    s = app.state.settings
    protocol = type("Protocol", (GuardedH11Protocol,), {"header_timeout_s": s.header_timeout_s})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          limit_concurrency=s.max_connections, timeout_keep_alive=5,
                          h11_max_incomplete_event_size=64 * 1024)


def _static(name: str) -> str:
    return resources.files("diffusiongemma.server").joinpath("static", name).read_text()


__all__ = ["EngineFailure", "Limits", "ServerSettings", "create_app", "uvicorn_config"]
