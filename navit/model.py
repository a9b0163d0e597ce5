"""The NaViT encoder: a pre-norm ViT over packed sequences, with masked pooling and a head.

The model consumes a :class:`~navit.packing.PackedBatch` and nothing else. Per-batch work
(attention plans, positional embeddings, RoPE angles) happens once in ``forward_features``;
the blocks only do tensor math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from navit.attention import AttentionBackend, auto_backend, get_backend
from navit.attention.base import HALF_DTYPES
from navit.config import NaViTConfig, resolve_config
from navit.packing import PackedBatch
from navit.pooling import MAPPool, MeanPool, slot_index
from navit.posemb import FactorizedPosEmbed, Rope2D, apply_rope


@dataclass
class ForwardContext:
    """What every block needs about the batch, computed once per forward."""

    backend: AttentionBackend
    attn_state: Any
    rope: tuple[torch.Tensor, torch.Tensor] | None
    slot_index: torch.Tensor  # [B, L] slot per token, padding -> E
    num_slots: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return run_backend(self.backend, self.backend.attend, q, k, v, self.attn_state)


def run_backend(backend: AttentionBackend, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` for a method of ``backend``; eagerly, even inside ``torch.compile``, unless the
    backend is traceable: a plan that depends on the data, traced into the graph, would force a
    recompile for every new batch."""
    return fn(*args) if backend.traceable else _eagerly(fn, *args)


@torch.compiler.disable
def _eagerly(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class Attention(nn.Module):
    def __init__(self, cfg: NaViTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        norm = (lambda: nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps)) if cfg.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.proj_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        out = ctx.attend(q, k, v)  # [B, L, H, D]
        return self.proj(out.reshape(b, length, dim))


class Mlp(nn.Sequential):
    def __init__(self, cfg: NaViTConfig) -> None:
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        super().__init__(
            nn.Linear(cfg.embed_dim, hidden, bias=cfg.mlp_bias),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(hidden, cfg.embed_dim, bias=cfg.mlp_bias),
            nn.Dropout(cfg.dropout),
        )


def drop_path(x: torch.Tensor, rate: float, ctx: ForwardContext, training: bool) -> torch.Tensor:
    """Stochastic depth per *image* (not per sequence): images packed together drop independently."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], ctx.num_slots + 1, device=x.device) >= rate
    scale = keep.to(x.dtype) / (1.0 - rate)
    return x * torch.gather(scale, 1, ctx.slot_index)[..., None]


class Block(nn.Module):
    def __init__(self, cfg: NaViTConfig, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), ctx), self.drop_path_rate, ctx, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, ctx, self.training)


class NaViT(nn.Module):
    """Vision Transformer for packed images of any resolution and aspect ratio."""

    def __init__(self, config: NaViTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.embed_dim)
        self.pos_embed = (
            None
            if cfg.pos_embed == "none"
            else FactorizedPosEmbed(
                cfg.embed_dim,
                kind=cfg.pos_embed,
                mode=cfg.pos_mode,
                combine=cfg.pos_combine,
                max_len=cfg.pos_max_len,
                fourier_bands=cfg.fourier_bands,
            )
        )
        self.rope = (
            Rope2D(cfg.head_dim, mode=cfg.pos_mode, max_len=cfg.pos_max_len, theta=cfg.rope_theta)
            if cfg.rope
            else None
        )
        rates = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.pool = (
            MAPPool(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps)
            if cfg.pool == "map"
            else MeanPool()
        )
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.apply(_init_weights)

    @property
    def num_features(self) -> int:
        return self.config.embed_dim

    def attention_backend(self, device: torch.device) -> AttentionBackend:
        name = self.config.attn_backend
        if name != "auto":
            return get_backend(name)
        autocast = device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
        half = self.patch_embed.weight.dtype in HALF_DTYPES or (
            autocast and torch.get_autocast_dtype(device.type) in HALF_DTYPES
        )
        return auto_backend(device, half)

    def _check_batch(self, batch: PackedBatch) -> None:
        if not isinstance(batch, PackedBatch):
            raise TypeError(
                f"NaViT takes a navit.PackedBatch, got {type(batch).__name__}; "
                "build one with navit.pack_images(images, ...)"
            )
        if batch.patches.shape[-1] != self.config.patch_dim:
            raise ValueError(
                f"batch patches have {batch.patches.shape[-1]} values each, but the model expects "
                f"patch_size={self.config.patch_size} with {self.config.in_chans} channels "
                f"({self.config.patch_dim} values)"
            )

    def forward_features(self, batch: PackedBatch) -> torch.Tensor:
        """Per-token features [B, L, D] after the final norm; zeros at padding."""
        self._check_batch(batch)
        segment_ids = batch.segment_ids
        backend = self.attention_backend(segment_ids.device)
        x = self.patch_embed(batch.patches.to(self.patch_embed.weight.dtype))
        need_grid = self.pos_embed is not None or self.rope is not None
        grid = batch.token_grid_sizes() if need_grid else None
        if self.pos_embed is not None:
            x = x + self.pos_embed(batch.coords, grid).to(x.dtype)
        ctx = ForwardContext(
            backend=backend,
            attn_state=run_backend(backend, backend.prepare, segment_ids),
            rope=self.rope(batch.coords, grid) if self.rope is not None else None,
            slot_index=slot_index(segment_ids, batch.max_images_per_seq),
            num_slots=batch.max_images_per_seq,
        )
        for block in self.blocks:
            x = block(x, ctx)
        return self.norm(x) * batch.token_mask[..., None].to(x.dtype)

    def pool_slots(self, tokens: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Pooled vectors per slot [B, E, D] (fixed shape; empty slots are zero)."""
        return self.pool(tokens, batch.segment_ids, batch.max_images_per_seq)

    def forward_head(self, tokens: torch.Tensor, batch: PackedBatch, *, pre_logits: bool = False) -> torch.Tensor:
        """Pool per image and apply the head; rows follow the input image order."""
        slots = self.pool_slots(tokens, batch)
        pooled = slots.flatten(0, 1)[batch.image_slots()]
        return pooled if pre_logits else self.head(pooled)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """One pooled vector per image [N, D], in input order."""
        return self.forward_head(self.forward_features(batch), batch, pre_logits=True)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Logits [N, num_classes], one row per image in input order."""
        return self.forward_head(self.forward_features(batch), batch)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def create_model(name_or_config: str | NaViTConfig = "navit_ti16", **overrides: Any) -> NaViT:
    """Build a NaViT from a preset name (see :func:`navit.list_models`) or a config.

    Keyword arguments override any :class:`NaViTConfig` field, e.g.
    ``create_model("navit_s16", num_classes=10, pos_mode="absolute")``.
    """
    return NaViT(resolve_config(name_or_config, **overrides))
