"""Masked pooling: one vector per example from the tokens of a packed batch.

Both poolings reduce over each example's own tokens with scatter operations into a fixed
[B, E] grid of pooling slots (E = max examples per sequence), so shapes never depend on how many
examples a batch holds. Empty slots come out as zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from navit.batch import PAD


def slot_index(segment_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Segment ids with padding sent to an extra overflow slot ``num_slots``."""
    return torch.where(segment_ids == PAD, num_slots, segment_ids)


class MeanPool(nn.Module):
    def forward(self, tokens: torch.Tensor, segment_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
        """tokens [B, L, D] -> [B, E, D] mean over each slot's tokens."""
        b, length, dim = tokens.shape
        index = slot_index(segment_ids, num_slots)
        sums = tokens.new_zeros(b, num_slots + 1, dim).scatter_add(
            1, index[..., None].expand(-1, -1, dim), tokens
        )
        counts = torch.zeros(b, num_slots + 1, device=tokens.device, dtype=tokens.dtype)
        counts = counts.scatter_add(1, index, torch.ones_like(index, dtype=tokens.dtype))
        return (sums / counts.clamp(min=1)[..., None])[:, :num_slots]

    def flops(self, rows: int, length: int, num_slots: int) -> int:
        """Matmul FLOPs of a forward over [rows, length] tokens with ``num_slots`` slots per row: none."""
        return 0


class MAPPool(nn.Module):
    """Multihead attention pooling (as in big_vision's MAP head) restricted to each example.

    A learned probe queries the tokens of every slot; the softmax runs over that example's tokens
    only (a segment softmax), followed by a residual MLP.

    With a single query the key and value projections never need to touch every token: a score
    is q·(W_k x + b_k) = (W_kᵀ q)·x + const, and the pooled value Σ pᵢ (W_v xᵢ + b_v) =
    W_v (Σ pᵢ xᵢ) + b_v (Σ pᵢ = 1). So each head pools the raw tokens and projects once per slot,
    which costs O(N·D·H) instead of the O(N·D²) of projecting all N tokens, with the same
    parameters and the same result. The pooling itself is one batched matmul of the tokens with
    their per-slot, per-head softmax weights ([B, (E+1)·H, L] @ [B, L, D]): no [N, H, D]
    intermediate, which at ViT-B width (12 heads) would be 12 times the tokens' memory.
    """

    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float = 1e-6, act: nn.Module | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.probe = nn.Parameter(torch.randn(dim) * 0.02)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), act or nn.GELU(), nn.Linear(hidden, dim))

    def flops(self, rows: int, length: int, num_slots: int) -> int:
        """Matmul FLOPs of a forward over [rows, length] tokens with ``num_slots`` slots per row."""
        dim, heads, hidden = self.probe.numel(), self.num_heads, self.mlp[0].out_features
        once = 2 * dim * dim  # the probe's query and its key-folded form
        scores = rows * length * dim * heads
        pooling = rows * (num_slots + 1) * heads * length * dim  # the padding slot included
        per_slot = 2 * dim * dim + 2 * dim * hidden
        return 2 * (scores + pooling + rows * num_slots * per_slot + once)

    def forward(self, tokens: torch.Tensor, segment_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
        b, length, dim = tokens.shape
        heads, head_dim = self.num_heads, self.head_dim
        query = self.q(self.probe).view(heads, head_dim)
        w_key, w_value = (w.to(tokens.dtype) for w in self.kv.weight.view(2, heads, head_dim, dim))
        b_key, b_value = (b.to(tokens.dtype) for b in self.kv.bias.view(2, heads, head_dim))
        query = query.to(tokens.dtype) * head_dim**-0.5
        # Scores against the raw tokens [B, L, H]; the key bias adds a per-head constant that the
        # softmax drops, kept so the logits match the textbook form.
        scores = tokens @ torch.einsum("hd,hdD->Dh", query, w_key) + (query * b_key).sum(-1)
        index = slot_index(segment_ids, num_slots)
        index_h = index[..., None].expand(-1, -1, heads)
        # Segment softmax; the per-slot max only stabilises exp() and needs no gradient.
        slot_max = scores.new_full((b, num_slots + 1, heads), float("-inf"))
        slot_max = slot_max.scatter_reduce(1, index_h, scores.detach(), reduce="amax")
        weights = torch.exp(scores - torch.gather(slot_max, 1, index_h))
        denom = weights.new_zeros(b, num_slots + 1, heads).scatter_add(1, index_h, weights)
        weights = weights / torch.gather(denom, 1, index_h)  # [B, L, H]
        # Each slot's weights over its row's tokens, per head: [B, L, E+1, H], zero off the slot.
        member = torch.nn.functional.one_hot(index, num_slots + 1).to(weights.dtype)
        by_slot = (member[..., None] * weights[:, :, None, :]).reshape(b, length, (num_slots + 1) * heads)
        pooled_tokens = torch.bmm(by_slot.transpose(1, 2), tokens)  # [B, (E+1)·H, D]
        pooled_tokens = pooled_tokens.view(b, num_slots + 1, heads, dim)[:, :num_slots]
        values = torch.einsum("bshD,hdD->bshd", pooled_tokens, w_value) + b_value
        x = self.proj(values.reshape(b, num_slots, dim))
        filled = (denom[:, :num_slots, :1] > 0).to(x.dtype)  # empty slots come out as zeros
        return (x + self.mlp(self.norm(x))) * filled
