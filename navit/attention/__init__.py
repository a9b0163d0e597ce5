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


# Measured on CPU in fp32 (benchmarks/attention_scaling.py): buckets win while their scores stay
# below about 0.3 of the dense B·L² scores in sequences of up to 256 tokens; above that, gathering
# costs more than it saves (longer sequences keep their buckets, see BucketedBackend). In
# bf16 buckets won on every mix measured (a train step 1.17-1.56× faster than with the switch).
CPU_DENSE_ABOVE = 0.3


def auto_backend(device: torch.device, half_precision: bool) -> AttentionBackend:
    """Fastest backend for a device: varlen flash attention on CUDA in half precision,
    FlexAttention on CUDA in fp32, and on CPU the Σnᵢ² bucketed backend, which in fp32 switches
    to one dense call for batches where that is cheaper."""
    if device.type == "cuda":
        if half_precision and varlen.available():
            return VarlenBackend()
        return FlexBackend() if flex.available() else DenseBackend()
    return BucketedBackend(dense_above=None if half_precision else CPU_DENSE_ABOVE)


def get_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    return BACKENDS[name]()


__all__ = ["AttentionBackend", "available_backends", "auto_backend", "get_backend", "BACKENDS"]
