"""CPU backend whose cost grows with Σ nᵢ² (each image's own length), not with L², and trains.

Images of similar length are gathered into a few dense buckets [G, H, m, D], padded to the
bucket's longest image with a key mask, and attended with ``scaled_dot_product_attention`` (which
has a CPU backward, unlike FlexAttention). Bucket plans are made once per batch and reused by
every layer. Padding tokens are never computed; their outputs are copies of some real row.

The model keeps its tokens in the *slot order* of a plan made by :meth:`BucketedBackend.prepare_slots`
(images grouped by exact length, buckets concatenated, each [G, n]) through the whole block stack:
:meth:`BucketPlan.enter` once before the first block, :meth:`BucketPlan.leave` once after the last.
Then every layer's attention runs on views of q, k and v, with no mask and no gather or scatter,
and the linear layers skip the batch's packing padding. ``attend`` on tensors in the packed
[B, L] order makes the same round trip in every call.

In bf16 / fp16 on CPU, short buckets use plain matmul + softmax attention instead: there the
flash kernel's backward is slow and the half-precision GEMMs are fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from navit.attention.base import HALF_DTYPES, Capabilities, segment_runs
from navit.attention.dense import DenseBackend
from navit.batch import PAD


@dataclass
class Bucket:
    size: tuple[int, int]  # (G, m): G images padded to m tokens
    key_mask: torch.Tensor | None  # [G, 1, 1, m] True at real keys; None if no slot is padding


@dataclass
class BucketPlan:
    buckets: list[Bucket]
    index: torch.Tensor  # flat token index of every slot of every bucket, buckets concatenated
    source: torch.Tensor  # per flat token, its row among the buckets' slots (padding: any row)
    dense_mask: torch.Tensor | None = None  # set when one dense [L, L] mask is cheaper

    @property
    def in_slot_order(self) -> bool:
        """Whether a model can keep its tokens in this plan's slot order (not for the dense
        fallback, nor for a batch of padding alone)."""
        return self.dense_mask is None and bool(self.buckets)

    def enter(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] in packed order -> [S, ...] in slot order (a bucket's padded slots repeat
        its image's last token)."""
        return tokens.flatten(0, 1).index_select(0, self.index)

    def leave(self, slots: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """[S, ...] in slot order -> [B, L, ...] in packed order (padding tokens read some slot)."""
        return slots.index_select(0, self.source).unflatten(0, shape)


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


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention as two batched matmuls and a softmax, in the inputs' dtype: [G, H, m, D] -> [G, H, m, D].

    Keeps the [G, H, m, m] probabilities for backward, so it is for short buckets only. The scale
    and the key mask (as an additive -inf bias) ride in the first GEMM (``baddbmm``), which saves
    a pass over the scores each way. In bf16 the scores are rounded to bf16 before the softmax:
    about 1% relative error against exact attention, where the flash kernel, which accumulates in
    fp32, has about 0.3%.
    """
    g, heads, m, dim = q.shape
    q3, k3, v3 = (t.reshape(g * heads, m, dim) for t in (q, k, v))
    if key_mask is None:
        scores = torch.bmm(q3 * dim**-0.5, k3.transpose(1, 2))
    else:  # every row keeps a real key, so no row is all -inf
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~key_mask, float("-inf"))
        bias = bias.expand(g, heads, 1, m).reshape(g * heads, 1, m)
        scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=dim**-0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), v3).view(g, heads, m, dim)


class BucketedBackend:
    """``dense_above``: when the buckets would cost more than this fraction of the dense B·L²
    scores (few, long images per sequence), one dense masked call beats gathering in every call,
    so a :meth:`prepare` plan switches to it, in sequences of at most ``dense_max_len`` tokens.
    ``None`` (the default for the named backend) always uses buckets. In longer sequences buckets
    won whenever a sequence held two or more images (fp32, 2 threads, equal images: dense ÷
    buckets 1.57-2.15× at half the dense scores for L = 512 to 2048), since the dense masked call
    then runs the unfused kernel over all B·L² scores. A :meth:`prepare_slots` plan never
    switches: in slot order the dense call would also run every layer on the padding, and with
    the switch a whole model's forward or training step took 0.99-2.27× its time without it, on
    every mix and layout measured (``benchmarks/dense_switch.py``, 1 thread).

    ``matmul_max_len``: in bf16 / fp16 on CPU, buckets of at most this many tokens use
    :func:`matmul_attention`; a training step of the default model ran 1.17-1.28× faster with it
    on every mix measured (images up to 1000 tokens). 512 bounds the probabilities it keeps to
    H·m·2 bytes per token.

    ``ratio`` 0.9 beat 0.75 by 2-10% in attention forward + backward on every mix measured: less
    padding outweighs the extra kernel calls of a few more buckets. Exact lengths (ratio 1,
    slack 0) cost 25% more there (images of 16-64 tokens, L = 1024 and 4096: 3-8x the buckets),
    but in slot order, where a padded slot also costs its linear layers, they won: a ViT-Ti /
    ViT-S training step at 0.973 / 0.990 (uniform mix), 0.913 / 0.953 (paper) and 0.926 / 0.936
    (native) of the mask-free ViT's speed per real token, against 0.963 / 0.885, 0.910 / 0.935
    and 0.919 / 0.933 with ratio 0.9 and per-call gathers (one interleaved run of 7 steps each)."""

    name = "bucketed"
    # Data-dependent plans (not traceable); ``auto``'s choice on CPU, where it trains.
    capabilities = Capabilities(slot_order=True, preference={"cpu": 20})

    def __init__(self, ratio: float = 0.9, slack: int = 8, dense_above: float | None = None,
                 matmul_max_len: int = 512, dense_max_len: int = 256) -> None:
        self.ratio, self.slack, self.dense_above = ratio, slack, dense_above
        self.matmul_max_len, self.dense_max_len = matmul_max_len, dense_max_len

    def prepare(self, segment_ids: torch.Tensor) -> BucketPlan:
        return self._plan(segment_ids, exact=False)

    def prepare_slots(self, segment_ids: torch.Tensor) -> BucketPlan:
        """A plan for a model that keeps its tokens in slot order (:meth:`BucketPlan.in_slot_order`):
        one bucket per image length, so no slot is padding and no bucket needs a mask."""
        return self._plan(segment_ids, exact=True)

    def _plan(self, segment_ids: torch.Tensor, exact: bool) -> BucketPlan:
        starts, lengths, ids = segment_runs(segment_ids)
        real = ids != PAD
        starts, lengths = starts[real], lengths[real]
        length_list = lengths.tolist()
        if exact:  # slot order: never the dense switch, which would run every layer on the padding
            groups = group_lengths(length_list, 1.0, 0)
        else:
            groups = group_lengths(length_list, self.ratio, self.slack)
            bucket_cost = sum(len(g) * length_list[g[0]] ** 2 for g in groups)
            dense_cost = segment_ids.numel() * segment_ids.shape[1]
            short = segment_ids.shape[1] <= self.dense_max_len
            if self.dense_above is not None and short and bucket_cost > self.dense_above * dense_cost:
                empty = starts.new_zeros(0)
                return BucketPlan([], empty, empty, DenseBackend().prepare(segment_ids))
        buckets, indices, valids = [], [], []
        for group in groups:
            rows = torch.tensor(group, device=starts.device)
            g_len, g_start = lengths[rows], starts[rows]
            m = length_list[group[0]]
            offset = torch.arange(m, device=starts.device)
            valid = offset[None, :] < g_len[:, None]  # [G, m]
            # Padded slots repeat the image's last token: harmless (masked as keys, dropped as
            # queries) and keeps the gather free of a sentinel row.
            index = g_start[:, None] + torch.minimum(offset[None, :], g_len[:, None] - 1)
            ragged = bool(length_list[group[-1]] < m)
            buckets.append(Bucket(size=(len(group), m), key_mask=valid[:, None, None, :] if ragged else None))
            indices.append(index.reshape(-1))
            valids.append(valid.reshape(-1))
        index = torch.cat(indices or [starts.new_zeros(0)])
        # Each real token reads its output from its own (unpadded) slot: one gather for the whole
        # layer's output, whose backward is one scatter.
        rows = torch.nonzero(torch.cat(valids or [index.new_zeros(0, dtype=torch.bool)])).squeeze(1)
        source = index.new_zeros(segment_ids.numel())
        source[index[rows]] = rows
        return BucketPlan(buckets, index, source)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BucketPlan) -> torch.Tensor:
        if plan.dense_mask is not None:
            return DenseBackend().attend(q, k, v, plan.dense_mask)
        if not plan.buckets:  # nothing but padding
            return torch.zeros_like(q)
        # One gather per tensor for all buckets: its backward is one scatter, not one per bucket.
        out = self.attend_slots(plan.enter(q), plan.enter(k), plan.enter(v), plan)
        return plan.leave(out, q.shape[:2])

    def attend_slots(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BucketPlan) -> torch.Tensor:
        """q, k, v: [S, H, D] in the plan's slot order -> [S, H, D]; each bucket is a view."""
        _, heads, dim = q.shape
        sizes = [g * m for g, m in (bucket.size for bucket in plan.buckets)]
        matmul_max = self.matmul_max_len if q.dtype in HALF_DTYPES and q.device.type == "cpu" else 0
        pieces = []
        for bucket, qg, kg, vg in zip(plan.buckets, q.split(sizes), k.split(sizes), v.split(sizes)):
            g, m = bucket.size
            qg, kg, vg = (t.view(g, m, heads, dim).transpose(1, 2) for t in (qg, kg, vg))
            if m <= matmul_max:
                out = matmul_attention(qg, kg, vg, bucket.key_mask)
            else:
                out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=bucket.key_mask)
            pieces.append(out.transpose(1, 2).reshape(g * m, heads, dim))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
