"""The engine on its own thread, feeding each request's events to the asyncio task that awaits them.

The engine steps whenever any request is active (requests join and leave between steps: continuous
batching); HTTP handlers submit requests and read their events from an asyncio queue. Cancelling a
request (a client that went away) frees its cache at the next step. An exception inside a step is
reported to the requests that were running and the thread keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

from ..engine import CommitEvent, Engine, SamplingParams
from ..engine.request import CommitHook

log = logging.getLogger("diffusiongemma.server")


class EngineFailure(RuntimeError):
    pass


class EngineRunner:
    def __init__(self, engine: Engine, max_concurrent: int = 32):
        self.engine = engine
        self.max_concurrent = max_concurrent
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="diffusiongemma-engine", daemon=True)
        self._lock = threading.Lock()
        self._next = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout=10)

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, hook: CommitHook | None,
               images=None) -> tuple[str, asyncio.Queue]:
        """Queue a request (raises RequestError on bad parameters); returns its id and event queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._next += 1
            rid = f"req-{self._next}"
        self._queues[rid] = (loop, queue)
        try:
            self.engine.add(prompt_ids, params, request_id=rid, hook=hook, images=images)
        except Exception:
            self._queues.pop(rid, None)
            raise
        with self._wake:
            self._wake.notify_all()
        return rid, queue

    def cancel(self, rid: str) -> None:
        if rid in self._queues:
            self.engine.cancel(rid)
            with self._wake:
                self._wake.notify_all()

    def _deliver(self, rid: str, item) -> None:
        target = self._queues.get(rid)
        if target is None:
            return
        loop, queue = target
        if isinstance(item, Exception) or (isinstance(item, CommitEvent) and item.finish_reason is not None):
            self._queues.pop(rid, None)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the client's loop is gone
            pass

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.engine.has_work():
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    return
            try:
                events = self.engine.step()
            except Exception as e:  # keep serving: fail the running requests, drop them
                log.exception("engine step failed")
                for rid in list(self._queues):
                    self.engine.cancel(rid)
                    self._deliver(rid, EngineFailure(f"generation failed: {e}"))
                try:
                    self.engine.step()  # processes the cancellations (frees caches)
                except Exception:
                    log.exception("engine cleanup failed")
                continue
            for ev in events:
                self._deliver(ev.request_id, ev)
