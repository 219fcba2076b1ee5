"""`diffusiongemma serve`: the OpenAI-compatible server and the browser view (http://HOST:PORT/)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import threading
import time
from pathlib import Path

from .common import CLIError, add_model_args, add_prefix_args, load_model, positive_int, run_cli


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _one_malloc_arena() -> None:
    """glibc gives each thread that allocates its own malloc arena, and a thread's arena keeps what large request
    bodies freed (measured: 14-57 MiB more resident after three refused 15 MB prompts with HTTP on its own
    thread, against 14 MiB with it on the main thread). One arena for every thread returns it as before."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = 1
    except (OSError, AttributeError):  # not glibc: nothing to set
        pass


def _main(argv) -> int:
    import uvicorn

    from ..server.app import Limits, ServerSettings, create_app, server_generator, uvicorn_config

    ap = argparse.ArgumentParser(prog="diffusiongemma serve", description=__doc__)
    add_model_args(ap, compile_help="compile the denoising step and commit with torch.compile before serving "
                                    "(~30-90 s at startup, then ~2x faster steps on a CPU)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request")
    ap.add_argument("--allow-no-key", action="store_true",
                    help="serve beyond loopback without --api-key (anyone who reaches the address can use it)")
    ap.add_argument("--served-model-name", help="model id reported by /v1/models (default: directory name)")
    ap.add_argument("--max-concurrent", type=positive_int, default=16, help="requests in flight; more get 429")
    ap.add_argument("--max-batch", type=positive_int, default=8, help="requests denoising together")
    ap.add_argument("--max-prompt-tokens", type=positive_int, default=8192)
    ap.add_argument("--max-tokens", type=positive_int, default=4096, help="largest max_tokens a request may ask")
    ap.add_argument("--max-denoising-steps", type=positive_int, default=256,
                    help="largest step cap (and schedule length) per canvas a request may ask")
    ap.add_argument("--max-stability", type=positive_int, default=16,
                    help="largest stability_threshold a request may ask")
    ap.add_argument("--request-timeout", type=positive_int, default=600,
                    help="seconds a request may run before it is cancelled (504)")
    ap.add_argument("--max-connections", type=positive_int, default=64, help="open connections; more get 503")
    ap.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                    help="log level (info writes one JSON line per API request; /metrics has Prometheus metrics)")
    add_prefix_args(ap, 1024)
    ap.add_argument("--allow-local-images", action="append", default=[], metavar="DIR",
                    help="let image parts name files under DIR (repeatable; data: URLs always work, network URLs "
                         "never)")
    a = ap.parse_args(argv)
    exposed = not _is_loopback(a.host)
    if exposed and not a.api_key and not a.allow_no_key:
        raise CLIError(f"serving on {a.host} needs --api-key (or --allow-no-key to let anyone who can reach it in)")
    dirs = tuple(Path(d) for d in a.allow_local_images)
    for d in dirs:
        if not d.is_dir():
            raise CLIError(f"--allow-local-images {d}: not a directory")
    ck = load_model(a)
    limits = Limits(max_tokens=a.max_tokens, max_denoising_steps=a.max_denoising_steps,
                    max_stability_threshold=a.max_stability)
    settings = ServerSettings(max_concurrent=a.max_concurrent, max_batch=a.max_batch,
                              max_prompt_tokens=a.max_prompt_tokens, limits=limits,
                              request_timeout_s=float(a.request_timeout), max_connections=a.max_connections,
                              api_key=a.api_key, exposed=exposed, image_dirs=dirs, compile=a.compile,
                              prefix_cache_bytes=a.prefix_cache_mib << 20, prefix_block=a.prefix_block)
    settings.engine_thread = False  # the engine loop runs on this (the main) thread, HTTP on another
    if ck.model.tp.rank:  # tensor parallel: rank 0 serves HTTP, this rank steps in lock-step with it
        server_generator(ck, settings).lockstep.follow()
        return 0
    app = create_app(ck, settings, a.served_model_name)  # a ValueError (a prefix cache too small) is reported
    runner = app.state.runner
    if a.compile:
        print("compiling the engine step before serving (30-90 s) ...")
        print(f"compiled and warmed up in {runner.engine.warm_up():.0f} s")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = uvicorn.Server(uvicorn_config(app, a.host, a.port, log_level=a.log_level))
    failed: list[OSError] = []

    def http():
        try:
            server.run()
        except OSError as e:
            failed.append(e)

    _one_malloc_arena()
    thread = threading.Thread(target=http, name="diffusiongemma-http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    if not server.started:
        why = f": {failed[0].strerror}" if failed else " (see the log above)"
        raise CLIError(f"cannot listen on {a.host}:{a.port}{why}")
    print(f"serving {app.state.model_name} on http://{a.host}:{a.port}/ (the page; the OpenAI API under /v1)")
    # uvicorn off the main thread installs no signal handlers: SIGTERM and Ctrl-C shut it down from here
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        runner.run(alive=thread.is_alive)  # until the HTTP server stops (its shutdown stops the loop)
    except KeyboardInterrupt:
        server.should_exit = True
        thread.join(timeout=15)
        raise
    finally:
        _stop_followers(runner.generator)
    thread.join(timeout=15)
    return 0


def _stop_followers(gen) -> None:
    """Tensor parallel: the other ranks return from their loop (unless they are gone already)."""
    from ..parallel import CollectiveError

    if gen.lockstep is not None:
        try:
            gen.lockstep.stop()
        except CollectiveError:
            pass


def main(argv=None) -> int:
    return run_cli("diffusiongemma serve", _main, argv)
