"""CPU backend whose cost grows with Σ nᵢ² (each image's own length), not with L², and trains.

Images of similar length are gathered into a few dense buckets [G, H, m, D], padded to the
bucket's longest image with a key mask, and attended with ``scaled_dot_product_attention`` (which
has a CPU backward, unlike FlexAttention). Bucket plans are made once per batch and reused by
every layer. Padding tokens are never computed; their outputs are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from navit.attention.base import segment_runs
from navit.packing import PAD


@dataclass
class Bucket:
    index: torch.Tensor  # [G·m] flat token index of every bucket slot
    size: tuple[int, int]  # (G, m)
    key_mask: torch.Tensor | None  # [G, 1, 1, m] True at real keys; None if no slot is padding
    valid: torch.Tensor | None  # [G·m] True at slots holding a real token; None if all do


@dataclass
class BucketPlan:
    buckets: list[Bucket]
    positions: torch.Tensor  # flat token index of each output row, buckets concatenated


def group_lengths(lengths: list[int], ratio: float, slack: int) -> list[list[int]]:
    """Split run indices (sorted by decreasing length) into buckets.

    A bucket closes when the next run is shorter than ``ratio`` × the bucket's longest and more
    than ``slack`` tokens shorter; ``slack`` keeps tiny images together, where padding is cheaper
    than another kernel call.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            longest = lengths[groups[-1][0]]
            if lengths[i] >= ratio * longest or longest - lengths[i] <= slack:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


class BucketedBackend:
    name = "bucketed"

    def __init__(self, ratio: float = 0.75, slack: int = 8) -> None:
        self.ratio, self.slack = ratio, slack

    def prepare(self, segment_ids: torch.Tensor) -> BucketPlan:
        starts, lengths, ids = segment_runs(segment_ids)
        real = ids != PAD
        starts, lengths = starts[real], lengths[real]
        length_list = lengths.tolist()
        buckets, positions = [], []
        for group in group_lengths(length_list, self.ratio, self.slack):
            rows = torch.tensor(group, device=starts.device)
            g_len, g_start = lengths[rows], starts[rows]
            m = max(length_list[i] for i in group)
            offset = torch.arange(m, device=starts.device)
            valid = offset[None, :] < g_len[:, None]  # [G, m]
            # Padded slots repeat the image's last token: harmless (masked as keys, dropped as
            # queries) and keeps the gather free of a sentinel row.
            index = g_start[:, None] + torch.minimum(offset[None, :], g_len[:, None] - 1)
            ragged = bool(min(length_list[i] for i in group) < m)
            buckets.append(
                Bucket(
                    index=index.reshape(-1),
                    size=(len(group), m),
                    key_mask=valid[:, None, None, :] if ragged else None,
                    valid=valid.reshape(-1) if ragged else None,
                )
            )
            positions.append(index[valid])
        if not positions:
            positions.append(starts.new_zeros(0))
        return BucketPlan(buckets, torch.cat(positions))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BucketPlan) -> torch.Tensor:
        b, length, heads, dim = q.shape
        flat = [t.reshape(b * length, heads, dim) for t in (q, k, v)]
        pieces = []
        for bucket in plan.buckets:
            g, m = bucket.size
            qg, kg, vg = (
                t.index_select(0, bucket.index).view(g, m, heads, dim).transpose(1, 2) for t in flat
            )
            out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=bucket.key_mask)
            out = out.transpose(1, 2).reshape(g * m, heads, dim)
            pieces.append(out if bucket.valid is None else out[bucket.valid])
        result = q.new_zeros(b * length, heads, dim)
        if pieces:
            result = result.index_copy(0, plan.positions, torch.cat(pieces))
        return result.view(b, length, heads, dim)
