"""Reference backend: a dense [L, L] boolean mask with ``scaled_dot_product_attention``.

Simple and obviously right, so every other backend is tested against it; its cost and memory
grow with L², which is what the other backends avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from navit.attention.base import Capabilities


class DenseBackend:
    name = "dense"
    # Runs anywhere SDPA does; ``auto``'s last resort where nothing faster fits.
    capabilities = Capabilities(traceable=True, preference={"cpu": 0, "cuda": 0})

    def prepare(self, segment_ids: torch.Tensor) -> torch.Tensor:
        # Padding (-1) matches padding, so no row is fully masked and nothing becomes NaN.
        return (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])  # [B, 1, L, L]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=state
        )
        return out.transpose(1, 2)
