"""Data-parallel (DDP) and sharded (FSDP2) training on torch.distributed.

Launch with ``torchrun --nproc_per_node N -m steppo.cli train ...`` (or ``accelerate launch``);
``trainer.parallel`` picks the strategy (``auto``: DDP when launched on several processes).
Backend: NCCL on CUDA, gloo on CPU.

How a global batch is split (every rank holds the same list of trajectories, gathered after
each rank rolled out its share of the tasks):

1. **Scoring** (no grad): units (trajectories; task groups for the tree layout) are assigned
   to ranks balanced by model-input tokens (`assign`); each rank scores its own; the per-token
   and per-step scores are summed over ranks (all-reduce of zero-filled tensors), so every rank
   holds the global rollout log-probs, values and reference log-probs.
2. **Credit** runs on the global batch on every rank (vectorised, milliseconds): step-level
   whitening therefore uses the global batch's statistics, each step once, whatever the
   world size.
3. **Update**: the mini-batch schedule is global (same seed on every rank); each mini-batch's
   units are assigned to ranks balanced by tokens, and every loss weight is the one computed
   for the whole mini-batch, so the per-rank losses sum to the single-process loss. DDP and
   FSDP average gradients over ranks, hence each rank's loss is multiplied by the world size.
   Every rank runs the same number of micro-batches (ranks with fewer run zero-weight ones):
   FSDP's all-gathers and DDP's all-reduces are collectives.

Checkpoints hold full (unsharded) weights and optimiser state, written by rank 0 in the
single-process format, so a run resumes on any world size.

FSDP shards each decoder layer and the policy (or critic) root; rollout generation runs on a
full copy of the policy refreshed after every update (`RolloutCopy`), because generation
lengths differ across ranks and cannot run through collectives.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from steppo.core.batch import input_tokens
from steppo.core.choices import PARALLEL, check_choice
from steppo.core.records import Trajectory

STRATEGIES = PARALLEL  # trainer.parallel


@dataclass
class Distributed:
    """Where this process sits, and the modules the update runs through.

    `policy` / `critic` are what training forwards call: the DDP wrappers, or (FSDP2) the
    sharded modules themselves. Single process: the plain modules and world 1.
    """

    rank: int = 0
    world: int = 1
    strategy: str = "none"
    policy: nn.Module | None = None
    critic: nn.Module | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def loss_scale(self) -> float:
        """DDP and FSDP average gradients over ranks; per-rank losses are parts of a sum."""
        return float(self.world)

    def all_reduce_sum(self, *tensors: torch.Tensor | None) -> None:
        if not self.active:
            return
        for t in tensors:
            if t is not None:
                tdist.all_reduce(t, op=tdist.ReduceOp.SUM)

    def max_int(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.long)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()


def resolve_strategy(strategy: str, world: int) -> str:
    """``auto`` -> DDP when launched on several processes, else single-process."""
    check_choice(strategy, STRATEGIES, "trainer.parallel")  # a ConfigError (a ValueError)
    if strategy == "auto":
        return "ddp" if world > 1 else "none"
    return strategy


def init_process_group(device: torch.device, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group torchrun/accelerate describe in the environment (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or form a 1-rank group when not launched that way
    (to run the DDP/FSDP code path in one process)."""
    if tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    if "MASTER_ADDR" not in os.environ:  # one process, not launched: a 1-rank group on a free port
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return tdist.get_rank(), tdist.get_world_size()


def _layers(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a decoder (any HF causal LM: ``...layers``)."""
    for name, sub in module.named_modules():
        if name.endswith("layers") and isinstance(sub, nn.ModuleList):
            return list(sub)
    return []


def wrap(policy: nn.Module, critic: nn.Module | None, strategy: str, rank: int, world: int) -> Distributed:
    """The modules training runs through under `strategy` ("none", "ddp" or "fsdp")."""
    if strategy == "none":
        return Distributed(rank, world, strategy, policy, critic)
    if critic is not None and getattr(critic, "shared", False):
        raise ValueError("a shared critic reads the policy's hidden states outside its forward; "
                         "distributed training needs critic.shared=false")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = next(policy.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        # rotary-embedding buffers are constants: no per-forward buffer broadcast
        p = DDP(policy, device_ids=ids, broadcast_buffers=False)
        c = DDP(critic, device_ids=ids, broadcast_buffers=False) if critic is not None else None
        return Distributed(rank, world, strategy, p, c)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in (policy, critic):
            if module is None:
                continue
            for layer in _layers(module):
                fully_shard(layer)
            fully_shard(module, reshard_after_forward=True)
        return Distributed(rank, world, strategy, policy, critic)
    raise ValueError(f"unknown parallel strategy {strategy!r}")


def assign(trajs: Sequence[Trajectory], units: list[list[int]], world: int, layout: str) -> list[list[list[int]]]:
    """Split `units` across `world` ranks balanced by model-input tokens (largest first to the
    least-loaded rank; deterministic). Each rank keeps its units in their original order."""
    if world == 1:
        return [list(units)]
    costs = [input_tokens([trajs[i] for i in u], layout) for u in units]
    load = [0] * world
    owner = [0] * len(units)
    for k in sorted(range(len(units)), key=lambda k: (-costs[k], k)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[k] = r
        load[r] += costs[k]
    return [[u for k, u in enumerate(units) if owner[k] == r] for r in range(world)]


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights of a (possibly FSDP-sharded) module, on every rank."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in module.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().cpu()
    return out


def full_optimizer_state(dist: Distributed, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An optimiser state dict keyed and shaped as in a single process (FSDP: gathered)."""
    if dist.strategy != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(dist: Distributed, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if dist.strategy != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


class RolloutCopy:
    """A full, unsharded copy of an FSDP policy's causal LM for generation (made before the
    policy is sharded), refreshed from the sharded weights after every update (`refresh`)."""

    def __init__(self, policy_model: nn.Module):
        self.model = copy.deepcopy(policy_model)

    def refresh(self, sharded_policy: nn.Module) -> None:
        state = full_state_dict(sharded_policy)
        prefix = "model."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        self.model.load_state_dict(own)
