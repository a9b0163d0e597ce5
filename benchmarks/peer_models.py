"""Adapters that let ``peers.py`` drive navit and public NaViT/NaFlex implementations alike.

Every adapter builds a classifier of the same size (:data:`WIDTHS`: ViT-Ti 192 wide with 3
heads, ViT-S 384/6, ViT-B 768/12; MLP 4x, patch 16, depth configurable) and turns one
:class:`StepImages` (the *same* images for everyone) into its own
input format. Peers are imported, never copied; an adapter whose library is missing reports why
and is skipped.

Implementations
---------------
navit          ``navit.create_model("navit_<width>16", depth=...)`` on a pre-packed ``PackedBatch``
               (``navit.pack`` of pre-patchified images); attention backend ``auto`` (CPU:
               bucketed with adaptive dense fallback).
navit-dense    the same model with ``attn_backend="dense"`` (one [B, 1, L, L] mask).
navit-lean     ``qk_norm=False, pool="mean"``: what navit costs without its two extras, to
               compare with the mask-free ceiling like for like (diagnostic row).
lucidrains     ``vit_pytorch.na_vit.NaViT`` (dense [B, 1, n, n] mask over each group padded to
               its longest group); fed the same groups navit packed, ``token_dropout_prob=None``.
               Its patchify and mask building run inside ``forward`` and are timed with it.
lucidrains-own the same model fed the step's images as one list, grouped by its own
               ``group_images=True`` (next fit up to L tokens per group, inside ``forward``):
               how a user runs it; more groups and padding than navit's first fit.
timm-naflex    ``timm.models.naflexvit.NaFlexVit`` (per-image padding: every image is its own
               row, padded to the batch's longest image) with qk-norm, MAP pooling and factorized
               learned position embeddings, like navit; inputs from timm's own ``Patchify`` and
               ``NaFlexCollator``.
ceiling        a plain ViT with no mask at all on square images with the batch's mean token
               count: ``nn.TransformerEncoder`` (batch_first, norm_first, GELU, same dims) with
               patch embedding, learned position embedding and mean pooling.
ceiling-same   navit's own model (qk-norm, MAP pooling) on the same squares, one image per row,
               attention unmasked: the mask-free ViT of navit's architecture.
navit-compiled navit (auto) under ``torch.compile`` (``--compile``).
navit-squares  navit (auto) fed the ceiling's square images, packed (diagnostic: navit's own
               overhead at exactly the ceiling's attention work, without the Σnᵢ² > N·mean²
               effect of varied sizes).
linear-only    only the step's linear layers (patch embedding, qkv, proj, fc1, fc2 per block,
               head) chained on navit's B·L tokens: no attention, norm, activation or residual
               (diagnostic: the least time any implementation of this model can take here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import navit
from navit.attention import DenseBackend
from navit.batch import Example

PATCH = 16


@dataclass(frozen=True)
class Dims:
    """The model size every implementation gets (patch 16, MLP 4x width)."""

    name: str
    width: int
    heads: int

    @property
    def mlp(self) -> int:
        return 4 * self.width

    @property
    def label(self) -> str:
        return f"ViT-{self.name.capitalize()}"

    @property
    def navit_preset(self) -> str:
        return f"navit_{self.name}16"


WIDTHS = {d.name: d for d in (Dims("ti", 192, 3), Dims("s", 384, 6), Dims("b", 768, 12))}


@dataclass
class StepImages:
    """The images of one step, identical for every implementation.

    ``pixels[i]`` is image i already resized to its native patch grid ([3, rows·16, cols·16]);
    ``tokens[i]`` is navit's patchified version of the same pixels. ``seq_of[i]`` is the
    sequence navit's first-fit packer put it in (lucidrains gets the same groups).
    """

    pixels: list[torch.Tensor]
    tokens: list[Example]
    seq_of: list[int]
    labels: torch.Tensor  # [N] long
    seq_len: int
    num_seqs: int
    max_examples_per_seq: int

    @property
    def num_images(self) -> int:
        return len(self.pixels)

    @property
    def real_tokens(self) -> int:
        return sum(t.num_tokens for t in self.tokens)

    def groups(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.num_seqs)]
        for i, s in enumerate(self.seq_of):
            out[s].append(i)
        return [g for g in out if g]


@dataclass
class Prepared:
    inputs: Any
    labels: torch.Tensor
    real_tokens: int  # tokens of real image content the model processes
    computed_tokens: int  # tokens the model computes on, padding included
    note: str = ""


@dataclass
class Impl:
    key: str
    label: str
    build: Callable[..., nn.Module]  # (num_classes, depth, dims) -> model
    prepare: Callable[[StepImages], Prepared]
    forward: Callable[[nn.Module, Any], torch.Tensor]
    missing: str | None = None  # why it cannot run here
    detail: str = ""
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# navit
# --------------------------------------------------------------------------------------------
def navit_prepare(step: StepImages) -> Prepared:
    result = navit.pack(
        step.tokens,
        step.seq_len,
        max_examples_per_seq=step.max_examples_per_seq,
        num_seqs=step.num_seqs,
    )
    if result.leftover:
        raise RuntimeError(f"{len(result.leftover)} images did not fit the navit batch")
    batch = result.batch
    return Prepared(batch, step.labels, batch.num_real_tokens, batch.segment_ids.numel())


def navit_impl(key: str, label: str, **overrides: Any) -> Impl:
    def build(num_classes: int, depth: int, dims: Dims) -> nn.Module:
        return navit.create_model(dims.navit_preset, num_classes=num_classes, depth=depth, **overrides)

    detail = "navit.create_model(preset" + "".join(f", {k}={v!r}" for k, v in overrides.items()) + ")"
    return Impl(key, label, build, navit_prepare, lambda m, x: m(x), detail=detail)


# --------------------------------------------------------------------------------------------
# lucidrains vit-pytorch NaViT
# --------------------------------------------------------------------------------------------
def lucidrains_impls() -> list[Impl]:
    """lucidrains' NaViT on navit's groups, and on its own grouping of the same images."""
    try:
        import vit_pytorch
        from vit_pytorch.na_vit import NaViT as LucidNaViT
        from vit_pytorch.na_vit import group_images_by_max_seq_len
    except Exception as error:  # ImportError, or a broken install
        missing = f"vit-pytorch not importable ({type(error).__name__}: {error})"
        return [Impl("lucidrains", "lucidrains NaViT", None, None, None, missing=missing),
                Impl("lucidrains-own", "lucidrains NaViT, own grouping", None, None, None, missing=missing)]
    version = getattr(vit_pytorch, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as _v

            version = _v("vit-pytorch")
        except Exception:
            version = "?"

    def build(num_classes: int, depth: int, dims: Dims) -> nn.Module:
        # image_size only sizes the factorized position tables: 64 patches per side is enough
        # for every grid in the benchmark mixes (<= 256 tokens, aspect <= 4:1).
        return LucidNaViT(
            image_size=64 * PATCH, patch_size=PATCH, num_classes=num_classes, dim=dims.width,
            depth=depth, heads=dims.heads, dim_head=dims.width // dims.heads, mlp_dim=dims.mlp,
            dropout=0.0, emb_dropout=0.0, token_dropout_prob=None,
        )

    def prepare(step: StepImages) -> Prepared:
        groups = step.groups()
        order = [i for g in groups for i in g]  # its output rows follow the groups
        longest = max(sum(step.tokens[i].num_tokens for i in g) for g in groups)
        return Prepared(
            [[step.pixels[i] for i in g] for g in groups],
            step.labels[torch.tensor(order)],
            step.real_tokens,
            len(groups) * longest,
            note="patchify + mask inside forward",
        )

    def prepare_own(step: StepImages) -> Prepared:
        # Its forward groups the list itself (timed); grouping here only counts its padding.
        groups = group_images_by_max_seq_len(step.pixels, PATCH, max_seq_len=step.seq_len)
        longest = max(sum(img.shape[-2] * img.shape[-1] // PATCH**2 for img in g) for g in groups)
        return Prepared((step.pixels, step.seq_len), step.labels, step.real_tokens,
                        len(groups) * longest, note=f"its own next fit: {len(groups)} groups")

    detail = f"vit_pytorch.na_vit.NaViT (vit-pytorch {version})"
    return [
        Impl("lucidrains", "lucidrains NaViT", build, prepare, lambda m, x: m(x),
             detail=detail + " on navit's groups"),
        Impl("lucidrains-own", "lucidrains NaViT, own grouping", build, prepare_own,
             lambda m, x: m(x[0], group_images=True, group_max_seq_len=x[1]),
             detail=detail + ", group_images=True: its own next-fit grouping of the same images"),
    ]


# --------------------------------------------------------------------------------------------
# timm NaFlexViT
# --------------------------------------------------------------------------------------------
def timm_impl() -> Impl:
    try:
        import timm
        from timm.data.naflex_dataset import NaFlexCollator
        from timm.data.naflex_transforms import Patchify
        from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg
    except Exception as error:
        return Impl("timm-naflex", "timm NaFlexViT", None, None, None,
                    missing=f"timm with NaFlexViT not importable ({type(error).__name__}: {error})")

    def build(num_classes: int, depth: int, dims: Dims) -> nn.Module:
        # Built from NaFlexVitCfg directly: timm.create_model drops None-valued overrides, so
        # init_values=None (no LayerScale, like navit) could not be passed through it.
        cfg = NaFlexVitCfg(
            patch_size=PATCH, embed_dim=dims.width, depth=depth, num_heads=dims.heads,
            mlp_ratio=dims.mlp / dims.width, qkv_bias=True, qk_norm=True, init_values=None,
            class_token=False, reg_tokens=0, global_pool="map", pos_embed="factorized",
        )
        return NaFlexVit(cfg, num_classes=num_classes)

    patchify = Patchify(PATCH)

    def prepare(step: StepImages) -> Prepared:
        items = [(patchify(img), int(y)) for img, y in zip(step.pixels, step.labels)]
        longest = max(t.num_tokens for t in step.tokens)
        # timm pads every image to the collator's max_seq_len; the batch's longest image is the
        # least padding its per-image layout allows (its own loader uses a fixed seq-len bucket).
        inputs, labels = NaFlexCollator(max_seq_len=longest)(items)
        inputs.pop("seq_len", None)
        return Prepared(inputs, labels, step.real_tokens, len(items) * longest,
                        note="padded per image to the batch's longest")

    return Impl("timm-naflex", "timm NaFlexViT", build, prepare, lambda m, x: m(x),
                detail=f"timm.models.naflexvit.NaFlexVit (timm {timm.__version__}): qk_norm, MAP pool, "
                "factorized pos-emb, no reg/cls tokens, no LayerScale")


# --------------------------------------------------------------------------------------------
# Mask-free ceiling
# --------------------------------------------------------------------------------------------
class PlainViT(nn.Module):
    """Standard ViT on a fixed square grid: no mask, no padding, mean pooling."""

    def __init__(self, num_classes: int, depth: int, dims: Dims, tokens: int) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(PATCH * PATCH * 3, dims.width)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dims.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dims.width, dims.heads, dims.mlp, dropout=0.0, activation="gelu",
            layer_norm_eps=1e-6, batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dims.width, eps=1e-6)
        self.head = nn.Linear(dims.width, num_classes)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patches) + self.pos_embed
        x = self.norm(self.encoder(x))
        return self.head(x.mean(1))


def ceiling_side(step: StepImages) -> int:
    return max(1, round(math.sqrt(step.real_tokens / step.num_images)))


def ceiling_impl() -> Impl:
    def prepare(step: StepImages) -> Prepared:
        side = ceiling_side(step)
        g = torch.Generator().manual_seed(1234)
        patches = torch.rand(step.num_images, side * side, PATCH * PATCH * 3, generator=g)
        n = step.num_images * side * side
        return Prepared(patches, step.labels, n, n, note=f"{side}x{side} tokens per image")

    def build(num_classes: int, depth: int, dims: Dims, tokens: int = 0) -> nn.Module:
        return PlainViT(num_classes, depth, dims, tokens)

    impl = Impl("ceiling", "plain ViT (no mask)", build, prepare, lambda m, x: m(x),
                detail="torch nn.TransformerEncoder(batch_first, norm_first, GELU) ViT, square "
                "images of the mean token count, mean pool")
    impl.extra["needs_tokens"] = True
    return impl


def ceiling_squares(step: StepImages) -> tuple[int, list[Example]]:
    """The ceiling's images as navit examples: one square of the mean token count per image."""
    side = ceiling_side(step)
    g = torch.Generator().manual_seed(1234)
    coords = navit.patchify.grid_coords(side, side)
    return side, [Example(torch.rand(side * side, PATCH * PATCH * 3, generator=g), coords, (side, side))
                  for _ in range(step.num_images)]


def navit_squares_impl() -> Impl:
    def prepare(step: StepImages) -> Prepared:
        side, tokens = ceiling_squares(step)
        # Sequences just long enough for an equal share of squares, so padding stays as small as
        # the ceiling's (none) and both do the same work: ceil(N / B) squares per sequence.
        per_seq = math.ceil(step.num_images / step.num_seqs)
        batch = navit.pack(tokens, per_seq * side * side, num_seqs=step.num_seqs,
                           max_examples_per_seq=max(per_seq, step.max_examples_per_seq)).batch
        return Prepared(batch, step.labels, batch.num_real_tokens, batch.segment_ids.numel(),
                        note=f"{side}x{side} squares, {batch.num_seqs}×{batch.seq_len}")

    impl = navit_impl("navit-squares", "navit on the ceiling's squares")
    impl.prepare = prepare
    impl.detail = "navit.create_model(preset) on the ceiling's square images, packed (diagnostic)"
    return impl


class Unmasked(DenseBackend):
    """Dense attention with no mask at all: one image per row, every row full."""

    name = "unmasked"

    def prepare(self, segment_ids: torch.Tensor) -> None:
        return None  # attend's mask: none


def ceiling_same_impl() -> Impl:
    """navit's own model (qk-norm, MAP pooling, factorized position embedding) with the masking
    taken out: the ceiling's squares one per row, attention unmasked. What navit's architecture
    costs with nothing to pack."""

    def prepare(step: StepImages) -> Prepared:
        side, tokens = ceiling_squares(step)
        batch = navit.pack(tokens, side * side, num_seqs=step.num_images, max_examples_per_seq=1).batch
        n = batch.num_real_tokens
        return Prepared(batch, step.labels, n, n, note=f"{side}x{side} tokens per image, one per row")

    def build(num_classes: int, depth: int, dims: Dims) -> nn.Module:
        model = navit.create_model(dims.navit_preset, num_classes=num_classes, depth=depth)
        model.attention_backend = lambda device: Unmasked()  # this instance only
        return model

    return Impl("ceiling-same", "mask-free ViT, navit's architecture", build, prepare, lambda m, x: m(x),
                detail="navit's model (qk-norm, MAP pool) on the ceiling's squares, one per row, "
                "attention with no mask (same architecture, nothing packed)")


class LinearLayersOnly(nn.Module):
    """The model's linear layers and nothing else, so a step costs exactly their GEMMs."""

    def __init__(self, num_classes: int, depth: int, dims: Dims) -> None:
        super().__init__()
        self.width = dims.width
        self.patch_embed = nn.Linear(PATCH * PATCH * 3, dims.width)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Linear(dims.width, 3 * dims.width), nn.Linear(dims.width, dims.width),
                           nn.Linear(dims.width, dims.mlp), nn.Linear(dims.mlp, dims.width)])
            for _ in range(depth)
        )
        self.head = nn.Linear(dims.width, num_classes)

    def forward(self, inputs: tuple[torch.Tensor, int]) -> torch.Tensor:
        patches, num_images = inputs
        x = self.patch_embed(patches)
        for qkv, proj, fc1, fc2 in self.blocks:
            x = proj(qkv(x).unflatten(-1, (3, self.width)).sum(-2))  # q, k and v all feed proj
            x = fc2(fc1(x))
        return self.head(x.mean(0)).expand(num_images, -1)


def linear_only_impl() -> Impl:
    def prepare(step: StepImages) -> Prepared:
        tokens = step.num_seqs * step.seq_len  # what navit computes on, padding included
        patches = torch.rand(tokens, PATCH * PATCH * 3, generator=torch.Generator().manual_seed(1234))
        return Prepared((patches, step.num_images), step.labels, step.real_tokens, tokens,
                        note="navit's B·L tokens through the linear layers only")

    return Impl("linear-only", "linear layers only", LinearLayersOnly, prepare, lambda m, x: m(x),
                detail="the model's linear layers alone on navit's B·L tokens (diagnostic: a floor "
                "for every implementation's step)")


def all_impls(diagnostics: bool = True, compiled: bool = False) -> list[Impl]:
    impls = [
        navit_impl("navit", "navit (auto)"),
        navit_impl("navit-dense", "navit (dense)", attn_backend="dense"),
    ]
    if compiled:
        impl = navit_impl("navit-compiled", "navit (auto), torch.compile")
        impl.detail += " under torch.compile"
        impl.extra["compile"] = True
        impls.append(impl)
    if diagnostics:
        impls.append(navit_impl("navit-lean", "navit (no qk-norm, mean pool)", qk_norm=False, pool="mean"))
    impls += [*lucidrains_impls(), timm_impl(), ceiling_impl(), ceiling_same_impl()]
    if diagnostics:
        impls += [navit_squares_impl(), linear_only_impl()]
    return impls


def build_model(impl: Impl, num_classes: int, depth: int, dims: Dims, step: StepImages) -> nn.Module:
    if impl.extra.get("needs_tokens"):
        side = ceiling_side(step)
        return impl.build(num_classes, depth, dims, side * side)
    return impl.build(num_classes, depth, dims)


def check_real_tokens_match(prepared: dict[str, Prepared], step: StepImages) -> None:
    """Every mask-based implementation must see exactly the step's real tokens."""
    for key, p in prepared.items():
        if key not in ("ceiling", "ceiling-same", "navit-squares") and p.real_tokens != step.real_tokens:
            raise AssertionError(f"{key} sees {p.real_tokens} real tokens, expected {step.real_tokens}")


__all__ = [
    "Impl", "Prepared", "StepImages", "PlainViT", "all_impls", "build_model",
    "PATCH", "check_real_tokens_match", "ceiling_side", "navit_prepare", "navit_squares_impl",
]
