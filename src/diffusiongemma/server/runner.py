"""The generator on its own thread, feeding each request's outputs to the asyncio task that awaits them.

The engine steps whenever any request is active (requests join and leave between steps: continuous
batching); HTTP handlers submit requests and read their outputs (draft frames, text deltas, the final
`Result`) from an asyncio queue. Text is made on the engine thread (`generation.TextRequest`), so a
request's text state is only ever touched by one thread. Cancelling a request (a client that went away)
frees its cache at the next step. An exception inside a step is reported to the requests that were
running and the thread keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from ..engine import SamplingParams
from ..generation import Generator, OutputOptions, Prompt, Result
from ..parallel import CollectiveError

log = logging.getLogger("diffusiongemma.server")


class EngineFailure(RuntimeError):
    pass


class EngineRunner:
    def __init__(self, generator: Generator, max_concurrent: int = 32, on_result=None, on_step=None):
        """on_result(stats), on_step(seconds): called on the engine thread (the server's metrics)."""
        self.on_result, self.on_step = on_result, on_step
        self.generator = generator
        self.engine = generator.engine
        self.max_concurrent = max_concurrent
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="diffusiongemma-engine", daemon=True)
        self._lock = threading.Lock()
        self._next = 0

    def start(self) -> None:
        """Run the engine loop on a thread of its own (tests, and an app embedded in another program)."""
        self._thread.start()

    def run(self, alive=lambda: True) -> None:
        """Run the engine loop on the calling thread until `stop()` (or until `alive()` is false). `serve` runs it
        on the main thread: PyTorch's CPU ops run 1.6-2.4x slower from another thread (measured: the mid
        checkpoint's canvas 2,588 against 1,567 ms, the shipped model's request 164-203 against 74-86 ms)."""
        self._loop(alive)

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    def submit(self, prompt: Prompt, params: SamplingParams, options: OutputOptions) -> tuple[str, asyncio.Queue]:
        """Queue a request (raises RequestError on bad parameters); returns its id and output queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._next += 1
            rid = f"req-{self._next}"
        self._queues[rid] = (loop, queue)  # before the engine thread can produce anything for it
        try:
            self.generator.submit(prompt, params, options, request_id=rid)
        except Exception:
            self._queues.pop(rid, None)
            raise
        with self._wake:
            self._wake.notify_all()
        return rid, queue

    def cancel(self, rid: str) -> None:
        if rid in self._queues:
            self.generator.cancel(rid)
            with self._wake:
                self._wake.notify_all()

    def _deliver(self, rid: str, item) -> None:
        target = self._queues.get(rid)
        if target is None:
            return
        loop, queue = target
        if isinstance(item, (Exception, Result)):
            self._queues.pop(rid, None)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the client's loop is gone
            pass

    def _loop(self, alive=lambda: True) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.generator.has_work() and alive():
                    self._wake.wait(timeout=1.0)
                    if not self.generator.has_work():
                        self.generator.idle()  # tensor parallel: the other ranks hear from rank 0
                if self._stop or not alive():
                    return
            try:
                t0 = time.perf_counter()
                outputs = self.generator.step()
                if self.on_step is not None:
                    self.on_step(time.perf_counter() - t0)
            except CollectiveError:  # another rank died or hung: this group cannot serve any more
                for rid in self.generator.fail_all():
                    self._deliver(rid, EngineFailure("generation failed: a tensor-parallel rank stopped"))
                raise
            except Exception as e:  # keep serving: fail the running requests, drop them
                log.exception("engine step failed")
                for rid in self.generator.fail_all():
                    self._deliver(rid, EngineFailure(f"generation failed: {e}"))
                try:
                    self.engine.step()  # processes the cancellations (frees caches)
                except Exception:
                    log.exception("engine cleanup failed")
                continue
            for rid, out in outputs:
                if isinstance(out, Result) and self.on_result is not None:
                    self.on_result(out.stats)
                self._deliver(rid, out)
