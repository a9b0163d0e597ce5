"""Pretrained native-resolution models from local files, with their preprocessing, run packed:
SigLIP2 NaFlex from Hugging Face (:mod:`navit.pretrained.siglip2`) and timm's NaFlexViT
(:mod:`navit.pretrained.timm`). Nothing is downloaded: users bring the folder or file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from navit.config import NaViTConfig
from navit.pretrained.siglip2 import load_hf, write_hf
from navit.pretrained.timm import load_timm, read_timm, write_timm
from navit.pretrained.weights import read_json
from navit.processor import Processor

__all__ = ["image_tower", "kind", "load_hf", "load_pretrained", "load_timm", "write_hf", "write_timm"]


def kind(path: str | os.PathLike[str], arch: str | None = None) -> str | None:
    """``"timm"`` or ``"siglip2"`` for a pretrained folder (a ``config.json`` and no navit
    ``meta.json``) or its weights file, or, ``arch`` given, a timm weights file; None for anything else."""
    if arch is not None:
        return "timm"
    path = folder_of(path)
    if not (path.is_dir() and (path / "config.json").exists() and not (path / "meta.json").exists()):
        return None
    return "timm" if "architecture" in read_json(path / "config.json") else "siglip2"


def folder_of(path: str | os.PathLike[str], arch: str | None = None) -> Path:
    """``path``; for the weights file of a pretrained folder given without ``arch``, the folder."""
    path = Path(path)
    parent = path.parent
    if arch is None and path.is_file() and (parent / "config.json").exists() and not (parent / "meta.json").exists():
        return parent
    return path


def load_pretrained(path: str | os.PathLike[str], arch: str | None = None) -> nn.Module:
    """The model of a pretrained folder or file (see :func:`kind`), in eval mode."""
    path = folder_of(path, arch)
    return load_timm(path, arch) if kind(path, arch) == "timm" else load_hf(path)


def image_tower(path: str | os.PathLike[str], arch: str | None = None) -> tuple[NaViTConfig, Processor, dict[str, torch.Tensor]]:
    """The image model of a pretrained folder or file as a starting point for fine-tuning: its
    config, its processor and its weights in navit's names."""
    path = folder_of(path, arch)
    if kind(path, arch) == "timm":
        return read_timm(path, arch)[:3]
    from navit.pretrained.siglip2 import image_tower as siglip2_tower

    return siglip2_tower(path)
