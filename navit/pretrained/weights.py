"""Pretrained weights from local files: read, renamed by template, and loaded only when every
tensor has its place."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typing import Any

import torch
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (safetensors, or a PyTorch file read with ``weights_only``)
    or of a folder's ``model.safetensors`` (sharded: through its index) or ``pytorch_model.bin``."""
    from safetensors.torch import load_file

    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(path / shard).items()}
        found = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).exists()]
        if not found:
            raise FileNotFoundError(f"{path} has a config.json but no model.safetensors (or its index) or pytorch_model.bin")
        path = found[0]
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: not a weights file; expected one of {WEIGHT_SUFFIXES}")
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # training checkpoints keep the weights one level down
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def match(key: str, template: str) -> tuple[str, str] | None:
    """(layer index or "", rest of the key) if ``key`` starts with ``template`` (``{i}``: a layer index)."""
    m = re.match(re.escape(template).replace(re.escape("{i}"), r"(\d+)"), key)
    return None if m is None else ((m.group(1) if m.groups() else ""), key[m.end():])


def rename(key: str, names: list[tuple[str, str]], *, reverse: bool = False) -> str | None:
    """``key`` renamed by the first (theirs, ours) prefix pair that matches it (ours -> theirs
    with ``reverse``), or None."""
    for theirs, ours in names:
        source, target = (ours, theirs) if reverse else (theirs, ours)
        if (found := match(key, source)) is not None:
            return target.replace("{i}", found[0]) + found[1]
    return None


def load_checked(model: nn.Module, weights: dict[str, torch.Tensor], origins: dict[str, str], source: object) -> None:
    """Load ``weights`` (navit names; ``origins`` maps each to the checkpoint's own name) into
    ``model``, refusing by name a weight without a place, of another shape, or missing."""
    own = model.state_dict()
    for key, value in weights.items():
        if key not in own or own[key].shape != value.shape:
            needs = "no such weight" if key not in own else f"the model needs {tuple(own[key].shape)}"
            raise ValueError(f"{source}: weight {origins[key]!r} ({key!r} in navit) has shape {tuple(value.shape)}; {needs}")
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ValueError(f"{source}: the checkpoint lacks weights for {missing}")
    model.load_state_dict(weights)
