"""Serving a tensor-parallel model: every rank runs the same engine steps over the same requests.

Rank 0 takes requests (its HTTP server calls `Generator.submit` and `cancel` from any thread); the other ranks
only follow. Before each engine step rank 0 broadcasts one message: the requests submitted and the cancellations
asked since the last message (the generator-level arguments: prompt, sampling parameters, output options and
request id, so that every rank builds the same text hooks and grammar constraints), and whether to step. Every
rank applies it and steps; the engine decides only from what it was given, so the ranks stay in lock-step and
their collectives pair up.

- Rank 0's engine holds a new request (`Engine.hold_new`) until its message has gone out: a request submitted
  during a step is admitted at the same later step on every rank. A cancellation is applied when broadcast too.
- Idle, rank 0 sends a message without a step about once a second (the runner's idle wake): the followers' wait
  is then always far below the collective timeout, and a dead rank 0 stops them within it.
- `stop()` tells the followers to return; `follow()` is their loop.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

log = logging.getLogger("diffusiongemma.lockstep")


@dataclass
class Message:
    submits: list = field(default_factory=list)  # (prompt, params, options, request_id)
    cancels: list = field(default_factory=list)
    step: bool = False
    stop: bool = False


class Lockstep:
    def __init__(self, generator, tp):
        self.generator, self.tp = generator, tp
        self.leader = tp.rank == 0
        self._lock = threading.Lock()
        self._pending = Message()
        if self.leader:
            generator.engine.hold_new = True

    # -- rank 0 --------------------------------------------------------------------------------------
    def submitted(self, args: tuple) -> None:
        self._pending.submits.append(args)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._pending.cancels.append(request_id)

    def lock(self) -> threading.Lock:
        return self._lock

    def sync(self, step: bool) -> None:
        """Rank 0: broadcast what arrived since the last message, then apply it here."""
        with self._lock:
            msg, self._pending = self._pending, Message()
        msg.step = step
        self.tp.broadcast_object(msg, "control")
        self._apply(msg, leader=True)

    def stop(self) -> None:
        if self.leader:
            self.tp.broadcast_object(Message(stop=True), "control")

    def _apply(self, msg: Message, leader: bool) -> None:
        engine = self.generator.engine
        if leader:
            engine.release([args[3] for args in msg.submits])
        for rid in msg.cancels:
            engine.cancel(rid)

    # -- the other ranks -----------------------------------------------------------------------------
    def follow(self) -> None:
        """A follower's loop: apply each message of rank 0 and step when it says so, until it says stop."""
        gen = self.generator
        while True:
            msg: Message = self.tp.broadcast_object(None, "control")
            if msg.stop:
                return
            for prompt, params, options, rid in msg.submits:
                gen.submit_local(prompt, params, options, rid)
            self._apply(msg, leader=False)
            if not msg.step:
                continue
            try:
                gen.step_local()
            except Exception:  # rank 0 fails the same step the same way: mirror its clean-up
                log.exception("engine step failed")
                gen.fail_all()
                gen.engine.step()
