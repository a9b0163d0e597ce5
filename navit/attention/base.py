"""The interface every masked-attention backend implements.

A backend turns a batch's segment ids into whatever it needs (``prepare``, once per forward) and
then computes attention for every layer (``attend``) so that no token sees another image's tokens
or padding. Outputs at padding positions are unspecified.

A backend may also offer ``prepare_slots(segment_ids)``, whose state has ``in_slot_order``,
``enter`` and ``leave``, and ``attend_slots(q, k, v, state)`` on [S, H, D] tokens in that order:
then the model moves its tokens into the backend's order once per forward instead of every
layer (the bucketed backend does; see navit.attention.bucketed).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)  # half precision, whether weights or autocast


class AttentionBackend(Protocol):
    name: str
    # Whether torch.compile may trace prepare/attend into its graph. Backends whose plans depend on
    # the data (bucket sizes, run lengths) say False: under compile they run eagerly between
    # graphs, so one compiled graph serves every batch of the same packed shape.
    traceable: bool

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
