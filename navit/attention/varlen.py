"""CUDA backend: variable-length flash attention (``torch.nn.attention.varlen``).

The packed [B, L] tokens are one flat stream cut into runs at segment boundaries, so no mask
exists at all and cost is Σ nᵢ². Padding runs attend among themselves (finite, ignored).
Flash attention needs fp16 or bf16 (e.g. under ``torch.autocast``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from navit.attention.base import HALF_DTYPES, Capabilities, segment_runs

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.9
    varlen_attn = None


def available() -> bool:
    return varlen_attn is not None and torch.cuda.is_available()


@dataclass
class VarlenState:
    cu_seqlens: torch.Tensor  # [runs + 1] int32
    max_len: int


class VarlenBackend:
    name = "varlen"
    # Torch ships the flash kernel for CUDA only, in half precision; ``auto``'s first choice there.
    capabilities = Capabilities(
        devices=("cuda",), dtypes=HALF_DTYPES, preference={"cuda": 30}, present=lambda device: available(),
    )

    def prepare(self, segment_ids: torch.Tensor) -> VarlenState:
        if varlen_attn is None:
            raise RuntimeError("the varlen backend needs torch>=2.9 (torch.nn.attention.varlen)")
        if segment_ids.device.type not in self.capabilities.devices:
            raise RuntimeError("the varlen backend runs on CUDA only; use 'bucketed' on CPU")
        starts, lengths, _ = segment_runs(segment_ids)
        cu = torch.cat([starts, starts.new_tensor([segment_ids.numel()])]).to(torch.int32)
        return VarlenState(cu_seqlens=cu, max_len=int(lengths.max()))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: VarlenState) -> torch.Tensor:
        b, length, heads, dim = q.shape
        if q.dtype not in HALF_DTYPES:
            raise RuntimeError(
                f"the varlen backend needs fp16/bf16 inputs, got {q.dtype}; run under "
                "torch.autocast('cuda', dtype=torch.bfloat16) or use attn_backend='flex'"
            )
        flat = [t.reshape(b * length, heads, dim) for t in (q, k, v)]
        out = varlen_attn(*flat, state.cu_seqlens, state.cu_seqlens, state.max_len, state.max_len)
        return out.view(b, length, heads, dim)
