"""Checkpoints that are safe to load and never half-written.

A checkpoint is a folder: ``model.safetensors`` (weights), ``meta.json`` (model config, label
names, step, loader state, anything JSON) and ``train_state.pt`` (optimizer and scheduler
tensors, loaded with ``weights_only=True`` so no arbitrary object is ever unpickled). It is
written under a temporary name and renamed into place; ``latest`` names the newest complete
one, so a crash mid-save leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS, META, TRAIN_STATE, LATEST = "model.safetensors", "meta.json", "train_state.pt", "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _replaceable(name: str) -> bool:
    """A file of a checkpoint folder, or one that ``navit eval`` writes into it."""
    return name in (WEIGHTS, META, TRAIN_STATE, "eval.json") or name.endswith("_vs_tokens.png")


def write_checkpoint(
    final: str | Path,
    weights: dict[str, torch.Tensor],
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint folder ``final`` atomically (a temporary folder renamed into place).
    An existing checkpoint there is replaced, with what evaluation wrote beside it; a folder
    holding anything else, or a file, is refused (it would be deleted)."""
    final = Path(final)
    others = sorted(p.name for p in final.iterdir() if not _replaceable(p.name)) if final.is_dir() else []
    if others or (final.exists() and not final.is_dir()):
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise FileExistsError(f"{final} holds more than a checkpoint ({shown or 'it is a file'}), which writing one "
                              "there would delete: save into a new or empty folder")  # fmt: skip
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    for child in tmp.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def save_checkpoint(
    folder: str | Path,
    name: str,
    weights: dict[str, torch.Tensor],
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
    *,
    keep: int | None = 3,
) -> Path:
    """Write checkpoint ``folder/name`` atomically and point ``folder/latest`` at it."""
    folder = Path(folder)
    final = write_checkpoint(folder / name, weights, meta, train_state)
    _write_atomic(folder / LATEST, name + "\n")
    if keep is not None:
        _prune(folder, keep, protect=name)
    return final


def _prune(folder: Path, keep: int, protect: str) -> None:
    """Remove all but the ``keep`` newest complete checkpoints (by step name order)."""
    complete = sorted(p for p in folder.iterdir() if p.is_dir() and (p / META).exists() and not p.name.startswith("."))
    for old in complete[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a file in it, a checkpoints folder with ``latest``, or a run folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if path.is_file():
        if path.name not in (WEIGHTS, META):
            raise FileNotFoundError(f"{path} is not a checkpoint file: expected {WEIGHTS} or {META} in a checkpoint folder")
        path = path.parent
    for candidate in (path, path / "checkpoints"):
        if (candidate / WEIGHTS).exists():
            return candidate
        if (candidate / LATEST).exists():
            name = (candidate / LATEST).read_text().strip()
            target = candidate / name
            if not (target / WEIGHTS).exists():
                raise FileNotFoundError(f"{candidate / LATEST} names {name}, which is missing or incomplete")
            return target
    raise FileNotFoundError(
        f"no checkpoint found at {path}: expected {WEIGHTS}, or a 'latest' file in it or in "
        f"{path / 'checkpoints'}"
    )


def load_meta(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / META).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint metadata {checkpoint / META} is damaged: {error}") from error


def load_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(checkpoint / WEIGHTS)
    except Exception as error:
        raise ValueError(f"checkpoint weights {checkpoint / WEIGHTS} are damaged: {error}") from error


def load_train_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / TRAIN_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"training state {path} is damaged or unsafe: {error}") from error
