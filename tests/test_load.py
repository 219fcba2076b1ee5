"""A bounded load test on loopback: 16 concurrent streaming clients, a fixed number of requests; every
request completes or is cleanly rejected by the concurrency limit (429), nothing else goes wrong, and
the server's memory and engine state come back to their starting level afterwards."""

import asyncio
import gc
import logging

import pytest

from diffusiongemma.bench.load import load_test
from diffusiongemma.bench.memory import rss_bytes
from server_utils import idle, running_server


def test_sixteen_streaming_clients(shipped_or_tiny_model_dir, caplog):
    caplog.set_level(logging.WARNING, logger="diffusiongemma.server")
    with running_server(shipped_or_tiny_model_dir, max_concurrent=8, max_batch=8) as (url, app):
        asyncio.run(load_test(url, clients=16, requests=16, max_tokens=24))  # warm-up: allocator, caches
        gc.collect()
        before = rss_bytes()
        res = asyncio.run(load_test(url, clients=16, requests=48, max_tokens=24))
        gc.collect()
        after = rss_bytes()
        runner = app.state.runner
        assert res["errors"] == 0, res["error_bodies"]
        assert res["completed"] + res["rejected"] == 48
        assert res["completed"] >= 8 and res["rejected"] > 0  # the limit of 8 in flight really applied
        assert runner.in_flight == 0 and not runner.engine.has_work()
        assert (after - before) < 64 * 2**20, f"memory grew by {(after - before) / 2**20:.0f} MiB"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.slow
def test_thirty_two_clients_with_faults(shipped_or_tiny_model_dir, caplog):
    """32 streaming clients, 96 requests, 30% of them misbehaving (hanging up after the first chunk, or sending
    malformed bodies): no 5xx, every good request completes, the in-flight count and the engine come back
    to idle, and resident memory stays within 10% of its level before the round."""
    caplog.set_level(logging.WARNING, logger="diffusiongemma.server")
    with running_server(shipped_or_tiny_model_dir, max_concurrent=64, max_batch=8) as (url, app):
        asyncio.run(load_test(url, clients=32, requests=32, max_tokens=24, faults=0.3, seed=1))  # warm-up
        gc.collect()
        before = rss_bytes()
        res = asyncio.run(load_test(url, clients=32, requests=96, max_tokens=24, faults=0.3, seed=2))
        runner = app.state.runner
        idle(runner, seconds=4)  # the assertion below says whether it got there
        gc.collect()
        after = rss_bytes()
        assert res["server_errors"] == 0 and res["errors"] == 0, res["error_bodies"]
        assert res["completed"] == res["good"] and res["rejected"] == 0
        assert res["disconnected"] > 5 and res["bad_rejected"] > 5
        assert res["completed"] + res["disconnected"] + res["bad_rejected"] == 96
        assert runner.in_flight == 0 and not runner.engine.has_work()
        assert abs(after - before) < 0.1 * before, f"resident memory {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
