"""Tensor and expert parallelism over torch.distributed: the process group, its collectives, the checks.

A `TensorParallel` is what every sharded module holds: this rank, the world size, whether the experts are
split by expert (expert parallel) or by intermediate column (tensor parallel), and the few collectives the
model and the vocabulary pass use (`all_reduce`, `all_gather`). Every collective counts the bytes it sends by
kind (attention, mlp, moe, vocabulary, embedding), which `bench --tensor-parallel` reports.

The sharding itself (which slice of which tensor a rank holds) is `model.shard`; this module sits below the
sampling layer because the vocabulary-parallel pass (`sampling.vocab_parallel`) needs the collectives too.

Launch: `torchrun --nproc-per-node N -m diffusiongemma CMD --tensor-parallel N`. `init` reads torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), refuses a world size that is not `--tensor-parallel`, and opens
a gloo (CPU) or NCCL (CUDA) group whose collectives give up after `timeout_s`: a rank that dies or hangs makes
the others stop with an error, never wait forever.
"""

from __future__ import annotations

import datetime
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import TextConfig


class ParallelError(ValueError):
    """A parallel layout that cannot work: a world size, a shape that does not divide, a missing launcher."""


class CollectiveError(RuntimeError):
    """A collective did not complete: another rank died, hung past the timeout, or disagreed on shapes."""


DEFAULT_TIMEOUT_S = 120.0


@dataclass
class TensorParallel:
    """One rank's view of a tensor-parallel group (size 1: the one-process layout, no collectives)."""

    rank: int = 0
    size: int = 1
    expert_parallel: bool = False
    group: object | None = None
    sent: Counter = field(default_factory=Counter)  # bytes per kind, as each rank's input to the collectives
    calls: Counter = field(default_factory=Counter)

    @property
    def active(self) -> bool:
        return self.size > 1

    def _run(self, kind: str, t: torch.Tensor | None, fn) -> None:
        if t is not None:
            self.sent[kind] += t.numel() * t.element_size()
        self.calls[kind] += 1
        try:
            fn()
        except RuntimeError as e:  # gloo/NCCL report a dead peer or a timeout as a bare RuntimeError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CollectiveError(f"rank {self.rank} of {self.size}: a collective ({kind}) failed, another rank "
                                  f"died or hung past the timeout: {first}") from None

    def all_reduce(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        """Sum t over the ranks (in place; returns t). Every rank gets the same bits (one reduction order)."""
        if self.size > 1:
            self._run(kind, t, lambda: dist.all_reduce(t, group=self.group))
        return t

    def all_gather(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        """[size, *t.shape]: every rank's t, in rank order."""
        if self.size == 1:
            return t[None]
        out = torch.empty((self.size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        self._run(kind, t, lambda: dist.all_gather_single(out, t.contiguous(), group=self.group))
        return out.view(self.size, *t.shape)

    def broadcast_object(self, obj, kind: str = "control", src: int = 0):
        """rank `src`'s Python object on every rank (the server's lock-step: what to do next)."""
        if self.size == 1:
            return obj
        box = [obj]
        self._run(kind, None, lambda: dist.broadcast_object_list(box, src=src, group=self.group))
        return box[0]

    def reset_counts(self) -> None:
        self.sent.clear()
        self.calls.clear()


SINGLE = TensorParallel()


def split(n: int, size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's equal share of n items (n divisible by size, checked by `check_shapes`)."""
    share = n // size
    return rank * share, (rank + 1) * share


def kv_share(q_heads: int, kv_heads: int, size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the key/value heads rank holds: its equal share when kv_heads divides over the ranks,
    else the one kv head its query heads read (replicated on size / kv_heads ranks: vLLM's rule)."""
    if kv_heads % size == 0:
        return split(kv_heads, size, rank)
    q0 = split(q_heads, size, rank)[0]
    head = q0 // (q_heads // kv_heads)
    return head, head + 1


def check_shapes(config: TextConfig, size: int, expert_parallel: bool) -> None:
    """Refuse, before any weight is read, a layout whose shapes do not divide over `size` ranks; the message
    names the numbers. Query heads, the dense and self-conditioning MLPs' intermediate size, the vocabulary and
    the experts (expert parallel) or their intermediate size (tensor parallel) must divide; key/value heads
    either divide or divide `size` (then each is replicated on size / kv_heads ranks)."""
    if not isinstance(size, int) or size < 1:
        raise ParallelError(f"--tensor-parallel must be a positive integer, got {size!r}")
    if size == 1:
        return
    problems = []

    def need(value: int, what: str) -> None:
        if value % size:
            problems.append(f"{what} ({value}) is not divisible by --tensor-parallel {size}")

    need(config.num_attention_heads, "num_attention_heads")
    for kv in sorted({config.layer_kv_heads(i) for i in range(config.num_hidden_layers)}):
        if kv % size and size % kv:
            problems.append(f"num_key_value_heads ({kv}) neither divides over nor divides --tensor-parallel {size}")
    need(config.intermediate_size, "intermediate_size")
    need(config.vocab_size, "vocab_size")
    if expert_parallel:
        need(config.num_experts, "num_experts (expert parallel)")
    else:
        need(config.moe_intermediate_size, "moe_intermediate_size")
    if problems:
        raise ParallelError("cannot shard this model: " + "; ".join(problems))


def world_from_env() -> tuple[int, int] | None:
    """(rank, world size) from torchrun's environment, or None when not launched by it."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ParallelError(f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r} "
                            "are not integers") from None


def init(tensor_parallel: int = 1, expert_parallel: bool = False, device: str | torch.device = "cpu",
         timeout_s: float = DEFAULT_TIMEOUT_S) -> TensorParallel:
    """This process's place in the group: SINGLE for one process (--tensor-parallel 1, no torchrun), else the
    rank in an initialised process group of exactly `tensor_parallel` ranks."""
    if not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ParallelError(f"--tensor-parallel must be a positive integer, got {tensor_parallel!r}")
    if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ParallelError(f"the collective timeout must be positive seconds, got {timeout_s!r}")
    world = world_from_env()
    if world is None:
        if tensor_parallel > 1:
            raise ParallelError(f"--tensor-parallel {tensor_parallel} needs {tensor_parallel} processes: launch "
                                f"with torchrun --nproc-per-node {tensor_parallel} -m diffusiongemma ...")
        if expert_parallel:
            raise ParallelError("--expert-parallel needs --tensor-parallel N > 1 (under torchrun)")
        return SINGLE
    rank, size = world
    if size != tensor_parallel:
        raise ParallelError(f"the world has {size} processes (WORLD_SIZE) but --tensor-parallel is "
                            f"{tensor_parallel}: they must be equal")
    if size == 1:
        return TensorParallel(expert_parallel=False)
    open_group(rank, size, device, timeout_s)
    return TensorParallel(rank=dist.get_rank(), size=dist.get_world_size(), expert_parallel=expert_parallel)


def open_group(rank: int, size: int, device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """The default process group (once): gloo on CPU, NCCL on CUDA (each rank on its LOCAL_RANK device), every
    collective giving up after `timeout_s`. Tensor-parallel inference and FSDP training both open it here."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout_s))


def shutdown() -> None:
    """Leave the group: a barrier first (no rank tears its connections down while another still talks), then
    destroy it. A barrier that fails (another rank died) does not stop the shutdown."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - the others are gone; nothing left to wait for
            pass
        dist.destroy_process_group()


__all__ = ["CollectiveError", "DEFAULT_TIMEOUT_S", "ParallelError", "SINGLE", "TensorParallel", "check_shapes", "init", "kv_share", "open_group",
           "shutdown", "split", "world_from_env"]
