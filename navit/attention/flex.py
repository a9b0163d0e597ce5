"""FlexAttention backend with a document mask: block-sparse, so fully masked tiles are skipped.

Fast on CUDA for training and inference; on CPU PyTorch has no FlexAttention backward, so it is
for inference there. The block mask is built once per batch and shared by all layers.
"""

from __future__ import annotations

import functools

import torch

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = create_block_mask = None


def available() -> bool:
    return flex_attention is not None


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


class FlexBackend:
    name = "flex"
    traceable = True

    def prepare(self, segment_ids: torch.Tensor):
        if flex_attention is None:
            raise RuntimeError("the flex backend needs torch>=2.5 (FlexAttention)")
        b, length = segment_ids.shape

        def same_segment(batch, head, q_idx, kv_idx):
            # Padding (-1) matches padding, so no query row is empty.
            return segment_ids[batch, q_idx] == segment_ids[batch, kv_idx]

        return create_block_mask(same_segment, b, None, length, length, device=segment_ids.device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
        if torch.is_grad_enabled() and q.requires_grad and q.device.type == "cpu":
            raise RuntimeError(
                "FlexAttention has no CPU backward in PyTorch; train on CPU with "
                "attn_backend='bucketed'"
            )
        # Contiguous [B, H, L, D] inputs: inside a compiled model, inductor may lay out a producer
        # of q or k (qk-norm's LayerNorm) in a way the flex kernel then misreads (CPU, torch 2.13:
        # features off by up to 0.26 against dense). Under compile the copies fuse into the producer.
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        # Inside a compiled model the outer graph compiles flex; eagerly it needs its own compile.
        attend = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
        return attend(q, k, v, block_mask=block_mask).transpose(1, 2)
