"""The interface every masked-attention backend implements, and how it declares what it can do.

A backend turns a batch's segment ids into whatever it needs (``prepare``, once per forward) and
then computes attention for every layer (``attend``) so that no token sees another image's tokens
or padding. Outputs at padding positions are unspecified.

A backend whose :class:`Capabilities` say ``slot_order`` also offers
``prepare_slots(segment_ids)``, whose state has ``in_slot_order``, ``enter`` and ``leave``, and
``attend_slots(q, k, v, state)`` on [S, H, D] tokens in that order: then the model moves its
tokens into the backend's order once per forward instead of every layer (the bucketed backend
does; see navit.attention.bucketed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)  # half precision, whether weights or autocast
FLOAT_DTYPES = (*HALF_DTYPES, torch.float32, torch.float64)


@dataclass(frozen=True)
class Situation:
    """What a forward pass asks of attention: the device, the dtype of the attention inputs (the
    weights', or autocast's), and whether gradients flow through it."""

    device: torch.device
    dtype: torch.dtype
    grad: bool

    @property
    def half(self) -> bool:
        return self.dtype in HALF_DTYPES

    def __str__(self) -> str:
        return f"{self.device.type}, {dtype_name(self.dtype)}, {'with' if self.grad else 'without'} gradients"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _kernel_present(device: torch.device) -> bool:
    return True


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared by its class as ``capabilities = Capabilities(...)``.

    ``devices``: device types it runs on (None: any). ``present(device)``: whether its kernel is
    installed here (a PyTorch version or build may lack it). ``dtypes``: the attention input
    dtypes it takes. ``backward``: device types where it has a backward (None: wherever it runs).
    ``traceable``: whether ``torch.compile`` may trace ``prepare`` / ``attend`` into its graph;
    backends whose plans depend on the data (bucket sizes, run lengths) say False and run
    eagerly between graphs, so one compiled graph serves every batch of a packed shape.
    ``slot_order``: whether it offers ``prepare_slots`` / ``attend_slots`` (see above).
    ``preference``: per device type, its rank for ``attn_backend='auto'``, which picks the
    highest-ranked backend that fits the situation; on a device type it does not name, ``auto``
    never picks it (it can still be asked for by name).
    """

    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    backward: tuple[str, ...] | None = None
    traceable: bool = False
    slot_order: bool = False
    preference: Mapping[str, int] = field(default_factory=dict)
    present: Callable[[torch.device], bool] = _kernel_present

    def problem(self, situation: Situation) -> str | None:
        """Why the backend cannot run in ``situation``, in a few words; None when it can."""
        device = situation.device.type
        if self.devices is not None and device not in self.devices:
            return f"it runs on {' / '.join(self.devices)} only"
        if not self.present(situation.device):
            return f"its kernel is missing from this PyTorch ({torch.__version__}) on {device}"
        if situation.dtype not in self.dtypes:
            hint = " (run under torch.autocast)" if set(self.dtypes) <= set(HALF_DTYPES) else ""
            return f"it takes {' / '.join(map(dtype_name, self.dtypes))} only{hint}"
        if situation.grad and self.backward is not None and device not in self.backward:
            return f"it has no backward on {device} (inference only there, under torch.no_grad())"
        return None


class AttentionBackend(Protocol):
    name: str
    capabilities: Capabilities

    def prepare(self, segment_ids: torch.Tensor) -> Any:
        """Per-batch state from segment ids [B, L] (PAD = -1 at padding)."""
        ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any) -> torch.Tensor:
        """q, k, v: [B, L, H, D] -> [B, L, H, D]."""
        ...


def segment_runs(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximal runs of equal segment ids in the flattened [B·L] token order.

    Returns (start, length, segment id) per run; runs never cross a sequence boundary. The packer
    keeps each image's tokens contiguous, so every image is exactly one run.
    """
    b, length = segment_ids.shape
    flat = segment_ids.reshape(-1)
    position = torch.arange(flat.numel(), device=flat.device)
    is_start = torch.ones_like(flat, dtype=torch.bool)
    is_start[1:] = (flat[1:] != flat[:-1]) | (position[1:] % length == 0)
    starts = torch.nonzero(is_start).squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])])
    return starts, ends - starts, flat[starts]
