"""FlexAttention backend with a document mask: block-sparse, so fully masked tiles are skipped.

Fast on CUDA for training and inference; on CPU PyTorch has no FlexAttention backward, so it is
for inference there. The block mask is built once per batch and shared by all layers.

On CPU the token axis is padded to a multiple of :data:`CPU_TOKEN_MULTIPLE` (padding attends only
to padding). Inductor's CPU flex kernel (torch 2.13) computes q·kᵀ in tiles of 16 keys; on AVX2
machines (8 floats per vector), for a last tile of exactly 8 keys and a head_dim of 8 or 16, it
reads 16 keys and writes 16 scores per row: 8 keys past the tile's end, and 8 scores into the
next row or, after the last row, over the running row maxima. Outputs then depend on whatever
memory follows k (far off, or NaN). No token count that is a multiple of 16 leaves such
a tail. AVX-512 machines take another, correct path there.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from navit.attention.base import Capabilities
from navit.batch import PAD

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = create_block_mask = None


def available() -> bool:
    return flex_attention is not None


CPU_TOKEN_MULTIPLE = 16  # see the module docstring


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


class FlexBackend:
    name = "flex"
    # No CPU backward in PyTorch; ``auto``'s choice on CUDA in fp32 (varlen outranks it in half).
    capabilities = Capabilities(
        devices=("cpu", "cuda"), dtypes=(torch.float16, torch.bfloat16, torch.float32), backward=("cuda",),
        traceable=True, preference={"cuda": 20}, present=lambda device: available(),
    )

    def prepare(self, segment_ids: torch.Tensor):
        if flex_attention is None:
            raise RuntimeError("the flex backend needs torch>=2.5 (FlexAttention)")
        b, length = segment_ids.shape
        padded = length + (-length % CPU_TOKEN_MULTIPLE if segment_ids.device.type == "cpu" else 0)

        def same_segment(batch, head, q_idx, kv_idx):
            # Padding (-1), and the tokens past ``length`` that attend adds on CPU, match padding
            # only, so no query row is empty. (Clamped indices, not a padded copy of the ids:
            # inside a compiled model the CPU flex lowering takes no computed tensor here.)
            q_id = segment_ids[batch, q_idx.clamp(max=length - 1)].where(q_idx < length, PAD)
            kv_id = segment_ids[batch, kv_idx.clamp(max=length - 1)].where(kv_idx < length, PAD)
            return q_id == kv_id

        return create_block_mask(same_segment, b, None, padded, padded, device=segment_ids.device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
        if torch.is_grad_enabled() and q.requires_grad and q.device.type == "cpu":
            raise RuntimeError(
                "FlexAttention has no CPU backward in PyTorch; train on CPU with "
                "attn_backend='bucketed'"
            )
        length = q.shape[1]
        extra = block_mask.seq_lengths[1] - length  # the CPU padding of prepare
        # Contiguous [B, H, L, D] copies; under compile they fuse into the producers of q, k, v.
        # (Inside a compiled model on CPU, errors once blamed on the layout of qk-norm's outputs
        # were the tail read described above: what follows k in memory changed with the layout.)
        q, k, v = (F.pad(t.transpose(1, 2).contiguous(), (0, 0, 0, extra)) for t in (q, k, v))
        # Inside a compiled model the outer graph compiles flex; eagerly it needs its own compile.
        attend = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
        return attend(q, k, v, block_mask=block_mask)[:, :, :length].transpose(1, 2)
