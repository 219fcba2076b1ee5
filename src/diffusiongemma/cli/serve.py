"""`diffusiongemma serve`: the OpenAI-compatible server and the browser view (http://HOST:PORT/)."""

from __future__ import annotations

import argparse
import ipaddress
import logging

from .common import CLIError, add_model_args, load_model, positive_int, run_cli


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _main(argv) -> int:
    import uvicorn

    from ..server.app import ServerSettings, create_app

    ap = argparse.ArgumentParser(prog="diffusiongemma serve", description=__doc__)
    add_model_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request")
    ap.add_argument("--served-model-name", help="model id reported by /v1/models (default: directory name)")
    ap.add_argument("--max-concurrent", type=positive_int, default=16, help="requests in flight; more get 429")
    ap.add_argument("--max-batch", type=positive_int, default=8, help="requests denoising together")
    ap.add_argument("--max-prompt-tokens", type=positive_int, default=8192)
    ap.add_argument("--max-tokens", type=positive_int, default=4096, help="largest max_tokens a request may ask")
    ap.add_argument("--allow-local-images", action="store_true",
                    help="let image parts name local files (data: URLs always work; network URLs never)")
    a = ap.parse_args(argv)
    if not _is_loopback(a.host) and not a.api_key:
        logging.getLogger("diffusiongemma.server").warning(
            "serving on %s without --api-key: anyone who can reach this address can use the model", a.host)
    ck = load_model(a)
    settings = ServerSettings(max_concurrent=a.max_concurrent, max_batch=a.max_batch,
                              max_prompt_tokens=a.max_prompt_tokens, max_tokens=a.max_tokens, api_key=a.api_key,
                              allow_local_images=a.allow_local_images, compile=a.compile)
    app = create_app(ck, settings, a.served_model_name)
    print(f"serving {app.state.model_name} on http://{a.host}:{a.port}/ (OpenAI API under /v1)")
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="info")
    except OSError as e:
        raise CLIError(f"cannot listen on {a.host}:{a.port}: {e.strerror}") from None
    return 0


def main(argv=None) -> int:
    return run_cli("diffusiongemma serve", _main, argv)
