"""Scale-out plumbing: process groups, model wrapping and whole-model state under DDP or FSDP2.

The model knows nothing of this module; the training loop asks it for a wrapped model, for sums
over ranks, and for full (unsharded) state dicts to checkpoint. With one process everything here
is a no-op, so the same loop runs alone or under ``torchrun``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (if any).

    gloo on CPU, NCCL on CUDA. The timeout bounds how long a rank waits for a dead peer, so a
    crash on one rank makes the others fail instead of hanging forever.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_over_ranks(value: float | int, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def broadcast_object(value, info: DistInfo):
    """Rank 0's value on every rank (for decisions that must agree, like the step count)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_wrappable(model: nn.Module, info: DistInfo, strategy: str) -> None:
    """Refuse, before any work, a model that ``strategy`` cannot wrap: FSDP2 shards no 0-d
    parameters (the image-text model's logit scale and bias)."""
    scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
    if info.enabled and strategy == "fsdp" and scalars:
        raise ValueError(f"--distributed fsdp cannot shard the model's 0-d parameters {scalars}; "
                         "use --distributed ddp for it")  # fmt: skip


def wrap_model(model: nn.Module, info: DistInfo, strategy: str, device: torch.device) -> nn.Module:
    """DDP (replicated weights, averaged gradients) or FSDP2 (``fully_shard`` on each of the
    model's ``fsdp_units()``, its transformer blocks, then on the rest at the root)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed strategy {strategy!r}; expected one of {STRATEGIES}")
    if not info.enabled:
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for unit in model.fsdp_units():
        fully_shard(unit)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights, identical whatever the strategy and world size (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(unwrap(model), options=options) if info.enabled else unwrap(model).state_dict()


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    """Unsharded optimizer state keyed by parameter name, so any world size can load it (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(unwrap(model), optimizer, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict,
                    optimizer_state: dict | None) -> None:
    """Load full (unsharded) states into a possibly sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # Checked here: set_model_state_dict leaves missing weights as they are (sharded ones report
    # their full shape).
    own = {name: tuple(value.shape) for name, value in unwrap(model).state_dict().items()}
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"the weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, value in weights.items():
        if tuple(value.shape) != own[name]:
            raise ValueError(f"the weights do not fit the model: {name} is {tuple(value.shape)}, the model's {own[name]}")
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(unwrap(model), weights, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(unwrap(model), optimizer, optimizer_state, options=options)


def all_gather_object(value, info: DistInfo) -> list:
    """Every rank's ``value``, in rank order (a one-element list when alone)."""
    if not info.enabled:
        return [value]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered
