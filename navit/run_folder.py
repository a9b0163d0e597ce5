"""Where a training run lives and how it runs: the ``run`` section of the training config, and
the run folder (created once per run, found again from any checkpoint in it, holding the run's
``config.yaml``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from navit import distributed as D
from navit.checkpoint import resolve_checkpoint
from navit.config import check_choices, check_numbers, option


@dataclass
class RunSection:
    seed: int = option(0, "seed of the data split, order, augmentation and initialisation")
    out: str = option("runs", "folder that holds run folders")
    name: str | None = option(None, "run folder name (default: <baseline>-<date>-<time>)")
    resume: str | None = option(None, "run or checkpoint to continue: its own config, with any options given on top")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    threads: int | None = option(None, "torch threads (default: the cores the loader workers leave free)")
    log_every: int = option(10, "steps between metric records")
    save_every: int = option(200, "steps between checkpoints")
    nan_policy: str = option("stop", "on a non-finite loss: stop the run, or skip the step", choices=("stop", "skip"))
    distributed: str = option("ddp", "under torchrun: ddp (replicated) or fsdp (FSDP2, sharded)", choices=D.STRATEGIES)

    def __post_init__(self) -> None:
        check_choices(self, "")
        check_numbers(self)
        for name in ("log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def new_run_folder(cfg: Any) -> Path:
    """A fresh folder ``out/name`` (default name: the baseline and the time); an existing one is refused."""
    name = cfg.run.name or time.strftime(f"{cfg.model.baseline}-%Y%m%d-%H%M%S")
    folder = Path(cfg.run.out) / name
    try:
        folder.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise ValueError(f"run folder {folder} exists: give another --name, or --resume {folder} to continue it") from None
    return folder


def run_folder_of(path: str | Path) -> Path:
    """The run folder of a run, checkpoints or checkpoint path (a checkpoint saved outside a
    run, by ``navit.save_model``, is its own folder)."""
    path = Path(path)
    if (path / "config.yaml").exists():
        return path
    checkpoint = resolve_checkpoint(path)
    run = checkpoint.parent.parent
    return run if (run / "config.yaml").exists() else checkpoint


def write_config(cfg: Any, folder: Path, info: D.DistInfo) -> None:
    """``config.yaml``: the run's options, a template for new runs (so without ``resume``)."""
    if info.is_main:
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg.with_options({"resume": None}).to_dict(), sort_keys=False))
