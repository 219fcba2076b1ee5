"""Start the real server (uvicorn) on a free loopback port in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model_dir, **settings):
    import uvicorn

    import diffusiongemma as dg
    from diffusiongemma.server.app import Limits, ServerSettings, create_app, uvicorn_config

    if "max_tokens" in settings:
        settings["limits"] = Limits(max_tokens=settings.pop("max_tokens"))
    app = create_app(dg.load(model_dir, dtype="float32"), ServerSettings(**settings))
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def idle(runner, seconds: float = 10.0) -> bool:
    """Whether the server's runner has no request in flight and its engine no work, waiting up to `seconds`."""
    deadline = time.monotonic() + seconds
    while runner.in_flight or runner.engine.has_work():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
