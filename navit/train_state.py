"""Everything a training run must carry over a restart, gathered in one place.

Each part has ``state_dict`` / ``load_state_dict``: the model and its optimizer (gathered to full,
unsharded states), the progress counters, and what each rank holds its own of: the loader's
position, the metrics window and the random generator. :class:`TrainState` writes them into one
checkpoint (:mod:`navit.checkpoint`) and reads them back. A per-rank part is restored only on the
world size it was saved on; on another one the loader restarts its saved epoch (the shards
differ) and the other per-rank parts start afresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from navit import distributed as D
from navit.checkpoint import load_meta, load_train_state, load_weights, resolve_checkpoint, save_checkpoint
from navit.inference import checkpoint_meta
from navit.train_data import restart_epoch


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class Progress:
    """How far training has come. ``tokens`` and ``flops`` are the totals over all ranks up to the
    last checkpoint (``base``) plus this rank's since."""

    step: int = 0
    examples: int = 0  # over all ranks
    tokens_base: int = 0
    flops_base: int = 0
    tokens: int = 0  # this rank, since the start or the resume
    flops: int = 0
    flops_all: int = 0  # every rank's, since the start or the resume (counted only for max_flops)

    def add(self, *, examples: int, tokens: int, flops: int, flops_all: int) -> None:
        """One step more: ``examples`` and ``flops_all`` over all ranks, ``tokens`` and ``flops`` this rank's."""
        self.step += 1
        self.examples += examples
        self.tokens += tokens
        self.flops += flops
        self.flops_all += flops_all

    def totals(self, info: D.DistInfo, device: torch.device) -> tuple[int, int]:
        """(real tokens, training FLOPs) over all ranks (a collective under torchrun)."""
        tokens = self.tokens_base + int(D.sum_over_ranks(self.tokens, info, device))
        flops = self.flops_base + int(D.sum_over_ranks(self.flops, info, device))
        return tokens, flops

    def state_dict(self, info: D.DistInfo, device: torch.device) -> dict[str, int]:
        """The checkpoint's counters, over all ranks (a collective under torchrun)."""
        tokens, flops = self.totals(info, device)
        return {"step": self.step, "examples_seen": self.examples, "tokens_seen": tokens, "train_flops": flops}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.examples = int(state["step"]), int(state["examples_seen"])
        self.tokens_base, self.flops_base = int(state["tokens_seen"]), int(state["train_flops"])
        self.tokens = self.flops = self.flops_all = 0


class RNG:
    """The torch random generator of this process (stochastic depth, dropout)."""

    def state_dict(self) -> torch.Tensor:
        return torch.get_rng_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)


class TrainState:
    """The parts of a run a checkpoint holds, and how they are written and read back."""

    #: Per-rank parts saved in ``meta.json`` (JSON); the others go to ``train_state.pt`` (tensors).
    IN_META = ("loader", "window")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
                 per_rank: dict[str, Stateful], info: D.DistInfo, device: torch.device) -> None:  # fmt: skip
        self.model, self.optimizer, self.progress = model, optimizer, progress  # model: wrapped (DDP, FSDP)
        self.per_rank, self.info, self.device = per_rank, info, device

    def save(self, folder: Path, task: Any, config: dict[str, Any]) -> None:
        """Write checkpoint ``folder/step_N``, described as ``task``'s model trained with
        ``config``. Gathering full states is collective: every rank takes part, rank 0 writes."""
        info = self.info
        weights = D.full_model_state(self.model, info)
        optimizer_state = D.full_optimizer_state(self.model, self.optimizer, info)
        gathered = {name: D.all_gather_object(part.state_dict(), info) for name, part in self.per_rank.items()}
        progress = self.progress.state_dict(info, self.device)
        if not info.is_main:
            return
        model = D.unwrap(self.model)
        in_meta = {name: states for name, states in gathered.items() if name in self.IN_META}
        meta = {**checkpoint_meta(task, model, model.processor), "config": config, **progress, **in_meta,
                "world_size": info.world_size}  # fmt: skip
        tensors = {name: states for name, states in gathered.items() if name not in self.IN_META}
        train_state = {"optimizer": optimizer_state, **tensors}
        save_checkpoint(folder, f"step_{self.progress.step:08d}", weights, meta, train_state)

    def load(self, path: str | Path) -> Path:
        """Restore every part from the checkpoint at ``path``; returns the checkpoint's folder."""
        info = self.info
        checkpoint = resolve_checkpoint(path)
        meta = load_meta(checkpoint)
        state = load_train_state(checkpoint)
        try:
            D.load_full_state(self.model, self.optimizer, load_weights(checkpoint), state["optimizer"])
        except ValueError as error:  # the options given changed the model
            raise ValueError(f"cannot resume {checkpoint}: {error}; resume without changing model options") from None
        saved = {**state, **meta}
        if len(saved["loader"]) == info.world_size:
            for name, part in self.per_rank.items():
                if name in saved:  # a window is missing from older checkpoints
                    part.load_state_dict(saved[name][info.rank])
        else:
            epoch = restart_epoch(self.per_rank["loader"], saved["loader"][0])  # type: ignore[arg-type]
            if info.is_main:
                print(f"resuming {len(saved['loader'])}-rank data state on {info.world_size} rank(s): "
                      f"epoch {epoch} restarts")  # fmt: skip
        self.progress.load_state_dict(meta)
        return checkpoint
