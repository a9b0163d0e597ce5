"""Masked-attention backends, chosen by device and overridable by name."""

from __future__ import annotations

import torch

from navit.attention import flex, varlen
from navit.attention.base import AttentionBackend
from navit.attention.bucketed import BucketedBackend
from navit.attention.dense import DenseBackend
from navit.attention.flex import FlexBackend
from navit.attention.varlen import VarlenBackend

BACKENDS = {
    "dense": DenseBackend,
    "bucketed": BucketedBackend,
    "varlen": VarlenBackend,
    "flex": FlexBackend,
}


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that run on ``device`` (``varlen`` additionally needs fp16/bf16)."""
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    names = ["dense", "bucketed"]
    if on_cuda and varlen.available():
        names.append("varlen")
    if flex.available() and on_cuda:
        names.append("flex")
    return names


def auto_backend_name(device: torch.device, half_precision: bool) -> str:
    """Fastest backend for a device: varlen flash attention on CUDA in half precision, FlexAttention
    on CUDA in fp32, the Σnᵢ² bucketed backend on CPU."""
    if device.type == "cuda":
        if half_precision and varlen.available():
            return "varlen"
        if flex.available():
            return "flex"
        return "dense"
    return "bucketed"


def get_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    return BACKENDS[name]()


__all__ = ["AttentionBackend", "available_backends", "auto_backend_name", "get_backend", "BACKENDS"]
