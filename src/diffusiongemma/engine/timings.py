"""Where an engine's time goes, per phase (prefill, commit, decoder, vocabulary, sampler): a benchmark's
instrument, kept out of the step code. Disabled by default, so normal runs pay nothing; when enabled it
synchronises the device around each phase so that the clock reads finished work."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class Timings:
    """Accumulated wall time and call counts per phase."""

    def __init__(self, device: torch.device, enabled: bool = False):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    @contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0
        self.calls[phase] = self.calls.get(phase, 0) + 1

    def ms_per_call(self, phase: str) -> float:
        return 1000 * self.seconds.get(phase, 0.0) / max(self.calls.get(phase, 0), 1)

    def ms_per_step(self, *phases: str) -> float:
        """Milliseconds of the given phases per denoising step (per decoder forward)."""
        return 1000 * sum(self.seconds.get(p, 0.0) for p in phases) / max(self.calls.get("decoder", 0), 1)
