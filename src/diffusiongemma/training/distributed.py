"""Data-parallel training over torch.distributed: FSDP2 (`fully_shard`) over the text layers.

`torchrun --nproc-per-node N -m diffusiongemma train --fsdp ...`. Each text layer is a `fully_shard` unit: its
parameters, gradients and AdamW state live 1/N on each rank, all-gathered for its forward (and its recompute
under gradient checkpointing) and reduce-scattered after its backward. The few tensors outside the layers (the
tied embedding / LM head, the final norm, the self-conditioning MLP, a vision tower) are read outside any module's
forward by the objective (the LM head is `embed_tokens.weight`), where FSDP's hooks cannot gather them; they stay
replicated and their gradients are summed in one all-reduce per step (DDP-style).

Exactness: step k's batch is the data's `batch(k, B)` as in one process; rank r takes examples r, r+N, ... and
each example keeps its own keyed draws (`key_seed(seed, k, i, 9)`, i the index in the whole batch), so the N ranks
together compute what one process computes; gradients are summed, not averaged (the loss is already weighted by
each rank's share of the batch). Only the order of the float sums differs. Every rank runs the same number of
layer forwards (FSDP's all-gathers must pair up): one micro-batch per rank, and the self-conditioning first pass
runs on every rank when any rank needs it.

Saving: the full state dict is gathered to rank 0 (CPU), which writes the release-format directory; the optimizer
state is gathered too (`trainer_state.pt`, keyed by parameter name, so a run can resume on any number of ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class DataParallel:
    """One rank's part in data-parallel training (size 1: one process, nothing sharded)."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size
        self.model = None
        self.replicated: list[torch.nn.Parameter] = []

    @classmethod
    def from_env(cls, timeout_s: float = 600.0) -> DataParallel:
        from ..parallel import open_group, world_from_env

        world = world_from_env()
        if world is None or world[1] == 1:
            return cls()
        open_group(*world, "cuda" if torch.cuda.is_available() else "cpu", timeout_s)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def shard(self, model, vision=None) -> None:
        """fully_shard each text layer (gradients summed over the ranks); note the replicated rest."""
        if not self.active:
            return
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        for layer in model.layers:
            fully_shard(layer)
            layer.set_gradient_divide_factor(1.0)
            layer.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        self.model = model
        params = list(model.parameters()) + (list(vision.parameters()) if vision is not None else [])
        self.replicated = [p for p in params if p.requires_grad and not isinstance(p, DTensor)]

    def indices(self, n: int) -> list[int]:
        """This rank's examples of a batch of n."""
        return list(range(self.rank, n, self.size))

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set (the same answer on every rank)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum_parts(self, parts: dict[str, float]) -> dict[str, float]:
        """Per-rank loss parts (each already weighted by its share of the batch) summed over the ranks."""
        if not self.active:
            return parts
        keys = sorted(parts)
        t = torch.tensor([float(parts[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def sync_replicated_grads(self) -> None:
        """Sum the replicated parameters' gradients over the ranks, in one flat all-reduce."""
        if not self.active or not self.replicated:
            return
        for p in self.replicated:
            if p.grad is None:  # unused on this rank's examples: it still joins the sum
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.replicated])
        dist.all_reduce(flat)
        offset = 0
        for p in self.replicated:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def clip_grad_norm(self, params, max_norm: float) -> float:
        """clip_grad_norm_ over sharded (DTensor) and replicated gradients: each shard's squares summed over
        the ranks, each replicated gradient counted once."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        sharded = torch.zeros((), dtype=torch.float64)
        whole = torch.zeros((), dtype=torch.float64)
        for g in grads:
            if isinstance(g, DTensor):
                sharded += g.to_local().double().pow(2).sum()
            else:
                whole += g.double().pow(2).sum()
        if self.active:
            dist.all_reduce(sharded)
        total = float((sharded + whole).sqrt())
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return total

    # -- saving ------------------------------------------------------------------------------------------------
    def full_model_state(self, model) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, whole, on rank 0's CPU ({} on the other ranks; every rank must call)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def whole_model(self, model, config):
        """A plain (unsharded) copy of the text model on rank 0's CPU, for saving (None on the other ranks)."""
        state = self.full_model_state(model)
        if not self.leader:
            return None
        from ..loader import build_text_model

        whole = build_text_model(config)
        whole.load_state_dict(state, assign=True, strict=False)  # rotary tables are not saved
        return whole

    def full_optimizer_state(self, model, opt) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                             cpu_offload=True))

    def load_optimizer_state(self, model, opt, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
