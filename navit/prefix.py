"""Prefix tokens (a class token, registers) in packed sequences.

A model with ``R`` prefix tokens puts its ``R`` learned vectors in front of every example's
tokens, as if each example were alone, while the batch keeps its own layout: the model widens
each sequence from ``L`` to ``L + R·E`` positions (``E`` pooling slots) on the way in and takes
the example tokens back out after the blocks. Examples keep their order and stay contiguous, each
now led by its prefix; the prefixes of empty slots are padding, and padding stays at the end, so
every attention backend and the drop-path slots work on the wide layout unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from navit.batch import PAD


class PrefixLayout:
    """Where every token and every prefix token of a batch goes in the widened sequences.

    Built from ``segment_ids`` [B, L] alone, with tensor operations (no loop over examples); the
    moves are gathers, so gradients flow to both the tokens and the prefix vectors.
    """

    def __init__(self, segment_ids: torch.Tensor, num_slots: int, num_prefix: int) -> None:
        b, length = segment_ids.shape
        device = segment_ids.device
        self.num_prefix, self.length = num_prefix, length + num_prefix * num_slots
        real = segment_ids != PAD
        starts = real & (segment_ids != F.pad(segment_ids[:, :-1], (1, 0), value=PAD))
        # Each token moves right by R for every example that starts at or before it.
        self.positions = torch.arange(length, device=device) + num_prefix * starts.long().cumsum(1)  # [B, L]
        # The new position of each slot's first token; other tokens, and the prefixes of empty
        # slots, go to an overflow position that is cut off at the end.
        overflow = self.length
        slot = torch.where(starts, segment_ids, num_slots)
        first = torch.full((b, num_slots + 1), overflow, dtype=torch.long, device=device)
        first = first.scatter(1, slot, torch.where(starts, self.positions, overflow))[:, :num_slots]
        offsets = torch.arange(num_prefix, device=device) - num_prefix
        filled = (first < overflow)[..., None]
        prefix_positions = torch.where(filled, first[..., None] + offsets, overflow).reshape(b, -1)  # [B, E·R]
        # source[b, p]: what position p holds: token t (t < L), prefix vector r (L + r), or zero (L + R).
        source = torch.full((b, self.length + 1), length + num_prefix, dtype=torch.long, device=device)
        source = source.scatter(1, self.positions, torch.arange(length, device=device).expand(b, -1))
        prefix_index = (length + torch.arange(num_prefix, device=device)).repeat(num_slots).expand(b, -1)
        self.source = source.scatter(1, prefix_positions, prefix_index)[:, : self.length]
        slots = torch.arange(num_slots, device=device).repeat_interleave(num_prefix).expand(b, -1)
        wide = torch.full((b, self.length + 1), PAD, dtype=torch.long, device=device)
        wide = wide.scatter(1, self.positions, segment_ids)
        self.segment_ids = wide.scatter(1, prefix_positions, slots)[:, : self.length]

    def insert(self, values: torch.Tensor, prefix: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Per-token ``values`` [B, L, ...] in the wide layout [B, L + R·E, ...], with the ``R``
        rows of ``prefix`` [R, ...] in front of every example and ``fill`` elsewhere."""
        b, _, *rest = values.shape
        pad = values.new_full((b, 1, *rest), fill)
        table = torch.cat([values, prefix.to(values.dtype).expand(b, *prefix.shape), pad], 1)
        index = self.source.view(b, -1, *([1] * len(rest))).expand(-1, -1, *rest)
        return table.gather(1, index)

    def restore(self, values: torch.Tensor) -> torch.Tensor:
        """The example tokens [B, L, ...] of wide ``values`` [B, L + R·E, ...], in the batch's layout."""
        rest = values.shape[2:]
        index = self.positions.view(*self.positions.shape, *([1] * len(rest))).expand(-1, -1, *rest)
        return values.gather(1, index)
