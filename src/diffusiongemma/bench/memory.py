"""Peak resident memory of a piece of work, sampled from /proc (CPU) or the CUDA allocator."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the high-water mark
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_during(fn: Callable[[], object], device: torch.device | str = "cpu", interval_s: float = 0.0005):
    """Run fn(); return (result, peak bytes above the level at the start)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], rss_bytes())
    return out, peak[0] - base


def peak_tensor_bytes(fn: Callable[[], object]):
    """Run fn() under the profiler; return (result, peak bytes of live torch tensors allocated by fn).

    Unlike RSS this is not blurred by the C allocator keeping freed pages, so it measures what the
    code holds at once (it does not see library-internal scratch memory). Not for code with custom autograd
    functions: the profiler books the frees made between operators inside one at the function's start.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        out = fn()
    # allocations are attributed to the op that made them (self usage), frees are "[memory]" events
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return out, peak
