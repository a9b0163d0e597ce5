"""Model configuration: one dataclass and a registry of named presets."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from numbers import Real
from typing import Any

from navit import attention
from navit.posemb import rope_pairs_per_axis

POS_EMBED_KINDS = ("learned", "sincos", "fourier", "grid", "table", "none")
POS_INTERPS = ("bilinear", "bicubic")
ACTIVATIONS = ("gelu", "gelu_tanh")
POS_MODES = ("absolute", "fractional")
POS_COMBINES = ("sum", "stack", "product")
POOL_KINDS = ("map", "mean")
FINAL_NORMS = ("tokens", "pooled")
TUBELET_INPUTS = ("frames", "difference", "sum-difference")


def option(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with a help line (and its allowed values) for configs and the CLI."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(instance: Any, where: str) -> None:
    """Raise naming the field if a field declared with ``choices`` holds another value."""
    for f in dataclasses.fields(instance):
        allowed = f.metadata.get("choices")
        if allowed is not None and getattr(instance, f.name) not in allowed:
            raise ValueError(f"{where}{f.name}={getattr(instance, f.name)!r}; expected one of {allowed}")


def numbers(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (fields of dataclass ``cls``) with numbers where its fields want them (lists of
    numbers too), integers as ``int``: YAML reads ``1e-3`` as a string and ``KEY=VALUE`` flags
    hand over text, so a string that reads as a number becomes one; anything else raises naming
    the field."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # hints that cannot be resolved at run time (a plug-in's): left as given
        return dict(values)
    out = dict(values)
    for name, value in values.items():
        hint = hints.get(name)
        origin, kinds = typing.get_origin(hint), typing.get_args(hint) or (hint,)
        if origin is list and {int, float} & set(kinds) and isinstance(value, (list, tuple)):
            out[name] = [_number(f"{name}[{i}]", v, float not in kinds) for i, v in enumerate(value)]
        elif origin in (None, typing.Union, types.UnionType) and {int, float} & set(kinds):
            if not (value is None and type(None) in kinds):
                out[name] = _number(name, value, float not in kinds)
    return out


def _number(name: str, value: Any, integer: bool) -> int | float:
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if (isinstance(number, bool) or not isinstance(number, Real) or not math.isfinite(number)
            or (integer and number != int(number))):  # fmt: skip
        raise ValueError(f"{name}={value!r} must be {'an integer' if integer else 'a finite number'}")
    if integer:
        return int(number)
    return number if type(number) in (int, float) else float(number)  # plain numbers as given


def check_numbers(instance: Any) -> None:
    """:func:`numbers` on a dataclass instance's own fields, in place."""
    fixed = numbers(type(instance), {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)})
    for name, value in fixed.items():
        object.__setattr__(instance, name, value)


def reject_unknown_fields(cls: type, values: Any, what: str, error: type[Exception]) -> None:
    """Raise ``error`` naming every key of ``values`` that is not a field of dataclass ``cls``
    (config files and overrides: a typo must fail, not be ignored)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise error(f"unknown {what} {unknown}; known: {sorted(known)}")


@dataclass
class NaViTConfig:
    """Everything needed to build a :class:`navit.NaViT`.

    An example has ``num_axes`` token axes: 2 for images (row, col), 3 for clips (time, row,
    col). A token is a patch of ``temporal_patch_size`` × ``patch_size`` × ``patch_size`` pixels
    (``temporal_patch_size`` > 1 needs the time axis). ``tubelet_input="sum-difference"`` feeds
    the patch embedding a tubelet's frame sum and the differences between its consecutive frames
    times ``temporal_patch_size``, instead of the frames themselves: the same information, with the
    small frame-to-frame changes that carry motion as large, separate inputs (see
    :func:`navit.patchify.tubelet_differences`). ``"difference"`` is the same with the mean frame
    in place of the sum (the first form: it learns real motion too, but loses still appearance
    on ``synthetic-video``).

    Positional embeddings are factorized (paper §2.1): one embedding per axis, combined by
    ``pos_combine``. ``pos_mode="fractional"`` uses position / side length, so the same relative
    position gets the same embedding at every resolution; ``"absolute"`` uses the patch index and
    a table of ``pos_max_len`` entries per axis. ``pos_embed="grid"`` is instead one learned
    ``pos_grid`` × ``pos_grid`` table (SigLIP2 NaFlex, timm NaFlexViT) resized to each image's own
    patch grid with antialiased ``pos_interp`` interpolation (as ViT resizes its embedding to a new
    resolution); ``pos_keep_aspect`` resizes it to a square of the grid's longer side and crops
    (timm's aspect-preserving variant). ``pos_embed="table"`` is one learned ``pos_max_len`` ×
    ``pos_max_len`` table indexed by (row, col) (Pix2Struct), by ``pos_mode`` positions.

    ``mlp_dim`` sets the MLP width explicitly (default ``int(embed_dim * mlp_ratio)``); ``act`` is
    the MLP activation of the blocks and the pooling head (``gelu_tanh``: the tanh approximation).
    ``layer_scale`` (an initial value, or None for none) scales each block's two branches by learned
    per-channel factors. ``prefix_tokens`` learned tokens (a class token, registers) go in front
    of every example's tokens inside the model; they attend and are attended to within their
    example but are not pooled and not returned. ``final_norm`` normalises every token before
    pooling (``"tokens"``) or the pooled vector (``"pooled"``, timm's ``fc_norm``).

    ``pool`` and ``final_norm`` are the encoder's: how it makes one pooled vector per example.
    ``num_classes`` is the head's: ``NaViT(config)`` puts a ``classifier`` head of that many classes
    on the encoder, or none for 0; a model with another head (:mod:`navit.heads`) sets it to that
    head's classes.
    """

    patch_size: int = 16
    temporal_patch_size: int = 1
    tubelet_input: str = "frames"
    num_axes: int = 2
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    mlp_dim: int | None = None
    act: str = "gelu"
    num_classes: int = 1000
    qkv_bias: bool = True
    qk_norm: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    norm_eps: float = 1e-6
    pos_embed: str = "learned"
    pos_mode: str = "fractional"
    pos_combine: str = "sum"
    pos_max_len: int = 64
    fourier_bands: int = 16
    pos_grid: int = 16
    pos_interp: str = "bilinear"
    pos_keep_aspect: bool = False
    rope: bool = False
    rope_theta: float = 100.0
    pool: str = "map"
    final_norm: str = "tokens"
    layer_scale: float | None = None
    prefix_tokens: int = 0
    attn_backend: str = "auto"
    dropout: float = 0.0
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        check_numbers(self)

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"NaViTConfig.{name}={value!r}; expected one of {allowed}")

        choice("pos_embed", POS_EMBED_KINDS)
        choice("pos_interp", POS_INTERPS)
        choice("act", ACTIVATIONS)
        choice("pos_mode", POS_MODES)
        choice("pos_combine", POS_COMBINES)
        choice("pool", POOL_KINDS)
        choice("final_norm", FINAL_NORMS)
        choice("tubelet_input", TUBELET_INPUTS)
        choice("attn_backend", ("auto", *attention.names()))  # the registry, plug-ins included
        for name in ("patch_size", "temporal_patch_size", "num_axes", "in_chans", "embed_dim", "depth",
                     "num_heads", "pos_max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"NaViTConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_classes", "prefix_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"NaViTConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if self.mlp_dim is not None and self.mlp_dim < 1:
            raise ValueError(f"NaViTConfig.mlp_dim must be >= 1, got {self.mlp_dim}")
        if self.pos_embed == "table" and self.num_axes != 2:
            raise ValueError(f"pos_embed='table' is a 2-D table for images: num_axes=2, got {self.num_axes}")
        if self.pos_embed == "grid" and (self.num_axes != 2 or self.pos_grid < 1):
            raise ValueError(f"pos_embed='grid' is a 2-D table for images: num_axes=2 and pos_grid >= 1 "
                             f"(got num_axes={self.num_axes}, pos_grid={self.pos_grid})")  # fmt: skip
        if self.pos_keep_aspect and self.pos_embed != "grid":
            raise ValueError(f"pos_keep_aspect=True keeps the aspect of the position grid: it needs pos_embed='grid', "
                             f"got {self.pos_embed!r}")  # fmt: skip
        if self.temporal_patch_size > 1 and self.num_axes != 3:
            raise ValueError(
                f"temporal_patch_size={self.temporal_patch_size} needs a time axis: num_axes=3, got {self.num_axes}"
            )
        if self.pos_combine == "stack" and self.embed_dim % self.num_axes:
            raise ValueError(
                f"pos_combine='stack' needs embed_dim divisible by num_axes={self.num_axes}, got {self.embed_dim}"
            )
        if self.rope and (self.head_dim % 2 or rope_pairs_per_axis(self.head_dim, self.num_axes) < 1):
            raise ValueError(
                f"rope=True over {self.num_axes} axes needs an even head_dim of at least "
                f"{2 * self.num_axes}, got {self.head_dim}"
            )

    @property
    def hidden_dim(self) -> int:
        """Width of the MLPs: ``mlp_dim``, or ``embed_dim * mlp_ratio``."""
        return self.mlp_dim or int(self.embed_dim * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: temporal_patch_size · patch_size² · in_chans."""
        return self.temporal_patch_size * self.patch_size**2 * self.in_chans

    @property
    def tubelet_mean_gain(self) -> float:
        """The scale of a tubelet's mean frame in the patch embedding's input: its frames for
        ``"sum-difference"`` (the frame sum), 1 for ``"difference"``."""
        return float(self.temporal_patch_size) if self.tubelet_input == "sum-difference" else 1.0

    def replace(self, **overrides: Any) -> "NaViTConfig":
        reject_unknown_fields(type(self), overrides, "NaViTConfig field(s)", TypeError)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "NaViTConfig":
        return cls().replace(**values)


_SIZES = {
    # The quick-start model: small enough to train in minutes on two CPU cores.
    "mini": dict(embed_dim=128, depth=4, num_heads=4, pos_mode="absolute"),
    "ti": dict(embed_dim=192, depth=12, num_heads=3),
    "s": dict(embed_dim=384, depth=12, num_heads=6),
    "b": dict(embed_dim=768, depth=12, num_heads=12),
    "l": dict(embed_dim=1024, depth=24, num_heads=16),
}

PRESETS: dict[str, NaViTConfig] = {
    f"navit_{size}{patch}": NaViTConfig(patch_size=patch, **dims)
    for size, dims in _SIZES.items()
    for patch in (16, 32)
}


def list_models() -> list[str]:
    """Names accepted by :func:`navit.create_model`."""
    return sorted(PRESETS)


def resolve_config(name_or_config: str | NaViTConfig, **overrides: Any) -> NaViTConfig:
    if isinstance(name_or_config, NaViTConfig):
        base = name_or_config
    elif name_or_config in PRESETS:
        base = PRESETS[name_or_config]
    else:
        raise ValueError(f"unknown model {name_or_config!r}; available: {list_models()}")
    return base.replace(**overrides) if overrides else base
