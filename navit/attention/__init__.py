"""Masked-attention backends, registered with their capabilities; ``auto`` picks by capability.

A new kernel is its own module, whose class declares ``name`` and ``capabilities``, plus one
``register(...)`` line (here, or in a plug-in outside navit).
"""

from __future__ import annotations

import torch

from navit.attention.base import AttentionBackend, Capabilities, Situation
from navit.attention.bucketed import BucketedBackend
from navit.attention.dense import DenseBackend
from navit.attention.flex import FlexBackend
from navit.attention.registry import (
    BACKENDS,
    auto_name,
    available_backends,
    choose,
    fitting,
    get_backend,
    names,
    register,
    unregister,
)
from navit.attention.varlen import VarlenBackend

# Measured on CPU in fp32 (benchmarks/attention_scaling.py): buckets gathered in every call win
# while their scores stay below about 0.3 of the dense B·L² scores in sequences of up to 256
# tokens; above that, gathering costs more than it saves (longer sequences keep their buckets, and
# a model in slot order always does: see BucketedBackend). In bf16 buckets won on every mix
# measured (a train step 1.17-1.56× faster than with the switch).
CPU_DENSE_ABOVE = 0.3


def tuned_bucketed(situation: Situation) -> BucketedBackend:
    """``auto``'s bucketed backend: in fp32 its per-call plans switch to one dense call for batches
    where that is cheaper (see CPU_DENSE_ABOVE); in half precision it always keeps its buckets."""
    return BucketedBackend(dense_above=None if situation.half else CPU_DENSE_ABOVE)


register(DenseBackend)
register(BucketedBackend, auto=tuned_bucketed)
register(VarlenBackend)
register(FlexBackend)


def auto_backend(device: torch.device, half_precision: bool, grad: bool = True) -> AttentionBackend:
    """``auto``'s backend for a device, in half precision (bf16) or fp32: varlen flash attention
    on CUDA in half precision, FlexAttention on CUDA in fp32, and on CPU the Σnᵢ² bucketed
    backend (see :func:`tuned_bucketed`)."""
    dtype = torch.bfloat16 if half_precision else torch.float32
    return choose("auto", Situation(torch.device(device), dtype, grad))


__all__ = [
    "BACKENDS", "CPU_DENSE_ABOVE", "AttentionBackend", "BucketedBackend", "Capabilities", "DenseBackend", "FlexBackend",
    "Situation", "VarlenBackend", "auto_backend", "auto_name", "available_backends", "choose", "fitting", "get_backend",
    "names", "register", "unregister",
]  # fmt: skip
