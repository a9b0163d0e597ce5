"""The NaViT encoder: a pre-norm ViT over packed sequences, with masked pooling, and the head a
task puts on it (see :mod:`navit.heads`).

The model consumes a :class:`~navit.packing.PackedBatch` and nothing else. Per-batch work
(attention plans, positional embeddings, RoPE angles) happens once in ``forward_features``;
the blocks only do tensor math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from navit.attention import AttentionBackend, Situation, choose
from navit.config import NaViTConfig, resolve_config
from navit.batch import PAD, PackedBatch
from navit.heads import Head, build_head, default_head, head_class
from navit.pooling import MAPPool, MeanPool, slot_index
from navit.posemb import FactorizedPosEmbed, GridPosEmbed, Rope, TablePosEmbed, apply_rope
from navit.patchify import tubelet_differences
from navit.prefix import PrefixLayout
from navit.processor import Processor


@dataclass
class ForwardContext:
    """What every block needs about the batch, computed once per forward.

    With a ``slot_order`` (a backend's own token order, see :func:`prepare_attention`) the
    blocks see [1, S, D] tokens in that order, and so do ``rope`` and ``example_index``.
    """

    backend: AttentionBackend
    attn_state: Any
    rope: tuple[torch.Tensor, torch.Tensor] | None
    example_index: torch.Tensor  # per token, its (sequence, slot) as one id; padding -> a spare id per row
    num_ids: int
    slot_order: Any = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.slot_order is not None:
            out = run_backend(self.backend, self.backend.attend_slots, q[0], k[0], v[0], self.attn_state)
            return out[None]
        return run_backend(self.backend, self.backend.attend, q, k, v, self.attn_state)


def example_ids(segment_ids: torch.Tensor, max_examples_per_seq: int) -> tuple[torch.Tensor, int]:
    """Per token [B, L], one id for its (sequence, slot), padding a spare id of its sequence; and
    how many ids there are."""
    rows = segment_ids.shape[0]
    slots = max_examples_per_seq + 1
    offsets = slots * torch.arange(rows, device=segment_ids.device)[:, None]
    return slot_index(segment_ids, max_examples_per_seq) + offsets, rows * slots


def prepare_attention(backend: AttentionBackend, segment_ids: torch.Tensor) -> tuple[Any, Any]:
    """The backend's state for this batch, and its slot order when the blocks can keep their
    tokens in it (backends whose capabilities say ``slot_order``, in eager mode): see
    navit.attention.bucketed. Under ``torch.compile`` the packed [B, L] order stays, so one
    graph serves every batch of a packed shape."""
    if not backend.capabilities.slot_order or torch.compiler.is_compiling():
        return run_backend(backend, backend.prepare, segment_ids), None
    state = run_backend(backend, backend.prepare_slots, segment_ids)
    return state, (state if state.in_slot_order else None)


def run_backend(backend: AttentionBackend, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` for a method of ``backend``; eagerly, even inside ``torch.compile``, unless the
    backend's capabilities say it is traceable: a plan that depends on the data, traced into the
    graph, would force a recompile for every new batch."""
    return fn(*args) if backend.capabilities.traceable else _eagerly(fn, *args)


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
        # Under CUDA autocast LayerNorm returns float32: q and k go back to v's dtype, as the
        # kernels (varlen) need one half-precision dtype.
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        out = ctx.attend(q, k, v)  # [B, L, H, D]
        return self.proj(out.reshape(b, length, dim))


def activation(name: str) -> nn.Module:
    return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")


class Mlp(nn.Sequential):
    def __init__(self, cfg: NaViTConfig) -> None:
        hidden = cfg.hidden_dim
        super().__init__(
            nn.Linear(cfg.embed_dim, hidden, bias=cfg.mlp_bias),
            activation(cfg.act),
            nn.Dropout(cfg.dropout),
            nn.Linear(hidden, cfg.embed_dim, bias=cfg.mlp_bias),
            nn.Dropout(cfg.dropout),
        )


def drop_path(x: torch.Tensor, rate: float, ctx: ForwardContext, training: bool) -> torch.Tensor:
    """Stochastic depth per *example* (not per sequence): examples packed together drop independently."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand(ctx.num_ids, device=x.device) >= rate
    scale = keep.to(x.dtype) / (1.0 - rate)
    return x * scale[ctx.example_index][..., None]


class LayerScale(nn.Module):
    """A learned per-channel factor on a residual branch (CaiT)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: NaViTConfig, drop_path_rate: float) -> None:
        super().__init__()
        scale = (lambda: LayerScale(cfg.embed_dim, cfg.layer_scale)) if cfg.layer_scale is not None else nn.Identity
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = scale()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.ls2 = scale()
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), ctx)), self.drop_path_rate, ctx, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, ctx, self.training)


class NaViT(nn.Module):
    """Vision Transformer for packed images and clips of any resolution, aspect ratio and length:
    an encoder with the head of a task on it.

    The encoder gives per-token features (:meth:`forward_features`) and, through its pooling
    (``config.pool``, with ``config.final_norm``), one pooled vector per example (:meth:`embed`).
    ``head`` is the spec of a registered head (``{"name": ..., **config}``, see
    :mod:`navit.heads`); by default a ``classifier`` over ``config.num_classes`` classes, and no
    head for ``num_classes=0`` (then ``model(batch)`` is the pooled vectors). ``config.num_classes``
    always states the head's classes. The pooling is built only when something reads pooled
    vectors: no head, or a head that reads them (a segmenter reads tokens).

    ``processor`` (a :class:`navit.Processor`) is the preprocessing that turns files and images
    into this model's ``PackedBatch``; it is saved with the weights and restored by
    :func:`navit.load_model`. Models no processor can feed (other than 2 or 3 axes, or 1 or 3
    channels) take packed examples only and have none.
    """

    def __init__(self, config: NaViTConfig, processor: Processor | None = None, head: dict[str, Any] | None = None) -> None:
        super().__init__()
        head = head if head is not None else default_head(config)
        if head is not None:  # the config states the head's classes
            config = config.replace(num_classes=int(head.get("num_classes", 0)))
        self.config = cfg = config
        self.processor = processor or (Processor.for_model(cfg) if Processor.can_feed(cfg) else None)
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.embed_dim)
        self.pos_embed = (
            None
            if cfg.pos_embed == "none"
            else GridPosEmbed(cfg.embed_dim, cfg.pos_grid, cfg.pos_interp, cfg.pos_keep_aspect)
            if cfg.pos_embed == "grid"
            else TablePosEmbed(cfg.embed_dim, mode=cfg.pos_mode, max_len=cfg.pos_max_len)
            if cfg.pos_embed == "table"
            else FactorizedPosEmbed(
                cfg.embed_dim,
                num_axes=cfg.num_axes,
                kind=cfg.pos_embed,
                mode=cfg.pos_mode,
                combine=cfg.pos_combine,
                max_len=cfg.pos_max_len,
                fourier_bands=cfg.fourier_bands,
            )
        )
        self.rope = (
            Rope(cfg.head_dim, num_axes=cfg.num_axes, mode=cfg.pos_mode, max_len=cfg.pos_max_len, theta=cfg.rope_theta)
            if cfg.rope
            else None
        )
        self.prefix = nn.Parameter(torch.randn(cfg.prefix_tokens, cfg.embed_dim) * 0.02) if cfg.prefix_tokens else None
        rates = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.pool = (
            None
            if head is not None and not head_class(head).pooled
            else MAPPool(cfg.embed_dim, cfg.num_heads, cfg.hidden_dim, cfg.norm_eps, activation(cfg.act))
            if cfg.pool == "map"
            else MeanPool()
        )
        self.head: nn.Module = build_head(head, cfg) if head is not None else nn.Identity()
        self.apply(_init_weights)

    @property
    def processor(self) -> Processor | None:
        return self._processor

    @processor.setter
    def processor(self, processor: Processor | None) -> None:
        if processor is not None:
            processor.check_model(self.config)
        self._processor = processor

    @property
    def num_features(self) -> int:
        return self.config.embed_dim

    @property
    def num_classes(self) -> int:
        """The head's classes; 0 without a head."""
        return self.config.num_classes

    # -- the head, and what a checkpoint holds -----------------------------------------------
    def head_spec(self) -> dict[str, Any] | None:
        """The head as ``{"name": ..., **config}`` (see :mod:`navit.heads`), or None for none."""
        return self.head.spec() if isinstance(self.head, Head) else None

    def to_dict(self) -> dict[str, Any]:
        """The encoder's config as a JSON-able dict (``num_classes``: the head's); with
        :meth:`head_spec`, what :meth:`from_dict` rebuilds the model from."""
        return self.config.to_dict()

    @classmethod
    def from_dict(cls, values: dict[str, Any], processor: Processor | None = None,
                  head: dict[str, Any] | None = None) -> "NaViT":  # fmt: skip
        """The model :meth:`to_dict` and :meth:`head_spec` describe (by default the head the
        class builds from the config: checkpoints written before heads were saved)."""
        return cls(NaViTConfig.from_dict(values), processor, head)

    def reset_head(self, num_classes: int) -> None:
        """A new head of the same kind for ``num_classes`` classes, initialised as in a new model;
        the encoder keeps its weights (timm's ``reset_classifier``). A classifier with
        ``num_classes=0`` becomes no head: ``model(batch)`` is then the pooled vectors."""
        kind = self.head.name if isinstance(self.head, Head) else "classifier"
        spec = {**(self.head_spec() or {}), "name": kind, "num_classes": num_classes}
        if kind == "classifier" and num_classes == 0:
            self.head = nn.Identity()
        else:
            weight = self.patch_embed.weight
            head = build_head(spec, self.config)
            head.apply(_init_weights)
            self.head = head.to(device=weight.device, dtype=weight.dtype)
        self.config = self.config.replace(num_classes=num_classes)

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay: biases, norms, layer scales, position tables,
        prefix tokens, the MAP probe, and those the head names."""
        head = {f"head.{n}" for n in self.head.no_weight_decay()} if isinstance(self.head, Head) else set()
        return head | {n for n, p in self.named_parameters()
                       if p.dim() < 2 or n.startswith("pos_embed.") or n in ("prefix", "pool.probe")}  # fmt: skip

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one (the rest is sharded with the root): the blocks, and
        the head's own (a text tower's)."""
        return [*self.blocks, *(self.head.fsdp_units() if isinstance(self.head, Head) else [])]

    def flops(self, batch: PackedBatch, *, training: bool = False) -> int:
        """FLOPs of a forward over ``batch`` (2 per multiply-add of every matmul; norms, softmax
        and other elementwise work left out), or of a training step's forward and backward.

        Linear layers count on every token of the batch, padding included (and the blocks on the
        ``prefix_tokens`` of every slot), as the dense and flex backends compute them (the bucketed
        backend's slot order skips the padding); attention costs Σ nᵢ² per layer, nᵢ an example's
        tokens with its prefix; pooling and the head as :meth:`head_flops` says. A backward costs
        twice its forward, except that no gradient flows into the pixels.
        """
        cfg, dim = self.config, self.config.embed_dim
        tokens, slots = batch.segment_ids.numel(), batch.slot_to_example.numel()
        wide = tokens + cfg.prefix_tokens * slots
        square_sum = int(((batch.example_lengths().double() + cfg.prefix_tokens) ** 2).sum())
        embed = tokens * cfg.patch_dim * dim
        blocks = wide * cfg.depth * (4 * dim * dim + 2 * dim * cfg.hidden_dim) + cfg.depth * 2 * square_sum * dim
        forward = 2 * (embed + blocks) + self.head_flops(batch)
        return 3 * forward - 2 * embed if training else forward

    def head_flops(self, batch: PackedBatch) -> int:
        """FLOPs of pooling (when built) and the head over ``batch`` (see the head's ``flops``)."""
        pool = self.pool.flops(batch.num_seqs, batch.seq_len, batch.max_examples_per_seq) if self.pool else 0
        return pool + (self.head.flops(batch) if isinstance(self.head, Head) else 0)

    def attention_situation(self, device: torch.device) -> Situation:
        """What attention faces in a forward on ``device`` now: the dtype of its inputs (autocast's
        when autocast is on there, else the weights') and whether gradients flow through it."""
        autocast = device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else self.patch_embed.weight.dtype
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        return Situation(device, dtype, grad)

    def attention_backend(self, device: torch.device) -> AttentionBackend:
        """The backend ``config.attn_backend`` names ('auto': the preferred one that fits) for a
        forward on ``device`` now; a named one that cannot run here raises, naming those that can."""
        return choose(self.config.attn_backend, self.attention_situation(device))

    def _check_batch(self, batch: PackedBatch) -> None:
        cfg = self.config
        if not isinstance(batch, PackedBatch):
            raise TypeError(
                f"NaViT takes a navit.PackedBatch, got {type(batch).__name__}; "
                "build one with model.processor(images) or navit.pack_images(images, ...)"
            )
        if batch.patches.shape[-1] != cfg.patch_dim:
            tubelet = f"{cfg.temporal_patch_size}x" if cfg.temporal_patch_size > 1 else ""
            raise ValueError(
                f"batch patches have {batch.patches.shape[-1]} values each, but the model expects "
                f"patch_size={cfg.patch_size} with {cfg.in_chans} channels "
                f"({tubelet}{cfg.patch_size}x{cfg.patch_size}x{cfg.in_chans} = {cfg.patch_dim} values)"
            )
        if batch.num_axes != cfg.num_axes:
            raise ValueError(
                f"batch examples have {batch.num_axes} coordinate axes, but the model has num_axes={cfg.num_axes} "
                "(2 for images, 3 for clips); build the batch with model.processor"
            )

    def tubelets(self, patches: torch.Tensor) -> torch.Tensor:
        """The patch embedding's input: the flattened patches, or (``tubelet_input`` ``"difference"``,
        ``"sum-difference"``) each tubelet's mean frame (its sum) and frame-to-frame differences."""
        cfg = self.config
        if cfg.tubelet_input == "frames" or cfg.temporal_patch_size == 1:
            return patches
        pt = cfg.temporal_patch_size
        return tubelet_differences(patches, pt, gain=float(pt), mean_gain=cfg.tubelet_mean_gain)

    def forward_features(self, batch: PackedBatch) -> torch.Tensor:
        """Per-token features [B, L, D] (after the final norm, unless it norms the pooled
        vectors); zeros at padding."""
        self._check_batch(batch)
        segment_ids = batch.segment_ids
        backend = self.attention_backend(segment_ids.device)
        x = self.patch_embed(self.tubelets(batch.patches.to(self.patch_embed.weight.dtype)))
        need_grid = self.pos_embed is not None or self.rope is not None
        grid = batch.token_grid_sizes() if need_grid else None
        if self.pos_embed is not None:
            x = x + self.pos_embed(batch.coords, grid).to(x.dtype)
        rope = self.rope(batch.coords, grid) if self.rope is not None else None
        layout = None
        if self.prefix is not None:  # each example led by the prefix tokens; no rotation for them
            layout = PrefixLayout(segment_ids, batch.max_examples_per_seq, self.config.prefix_tokens)
            x, segment_ids = layout.insert(x, self.prefix), layout.segment_ids
            if rope is not None:
                cos, sin = rope
                keep = (self.prefix.shape[0], *cos.shape[2:])
                rope = layout.insert(cos, cos.new_ones(keep), 1.0), layout.insert(sin, sin.new_zeros(keep))
        state, order = prepare_attention(backend, segment_ids)
        example_index, num_ids = example_ids(segment_ids, batch.max_examples_per_seq)
        if order is not None:
            x, example_index = order.enter(x)[None], order.enter(example_index)[None]
            rope = tuple(order.enter(t)[None] for t in rope) if rope is not None else None
        ctx = ForwardContext(backend, state, rope, example_index, num_ids, order)
        for block in self.blocks:
            x = block(x, ctx)
        if order is not None:
            x = order.leave(x[0], segment_ids.shape)
        if layout is not None:
            x = layout.restore(x)
        if self.config.final_norm == "tokens":
            x = self.norm(x)
        return x * batch.token_mask[..., None].to(x.dtype)

    def pool_slots(self, tokens: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Pooled vectors per slot [B, E, D] (fixed shape; empty slots are zero)."""
        if self.pool is None:
            raise ValueError(f"this model's {self.head.name!r} head reads per-token features, so it has no pooling: "
                             "use forward_features, or build the encoder without that head for pooled vectors")  # fmt: skip
        slots = self.pool(tokens, batch.segment_ids, batch.max_examples_per_seq)
        if self.config.final_norm == "pooled":
            slots = self.norm(slots) * (batch.slot_to_example != PAD)[..., None].to(slots.dtype)
        return slots

    def pooled(self, tokens: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """One pooled vector per example [N, D], in input order, from the features ``tokens``."""
        return self.pool_slots(tokens, batch).flatten(0, 1)[batch.example_slots()]

    def forward_head(self, tokens: torch.Tensor, batch: PackedBatch, *, pre_logits: bool = False) -> torch.Tensor:
        """The head on the features ``tokens``: on each example's pooled vector (rows in input
        order), or on every token for a head that reads tokens. ``pre_logits``: what the head
        reads (the pooled vectors, or the tokens), without the head."""
        features = tokens if isinstance(self.head, Head) and not self.head.pooled else self.pooled(tokens, batch)
        return features if pre_logits else self.head(features)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """One pooled vector per example [N, D], in input order."""
        return self.pooled(self.forward_features(batch), batch)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """The head's outputs: a classifier's logits [N, num_classes], one row per example in input
        order; a segmenter's [B, L, p·p, classes]; without a head the pooled vectors [N, D]."""
        return self.forward_head(self.forward_features(batch), batch)

    def outputs(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """Everything one forward gives, by name: ``"tokens"`` [B, L, D]; ``"pooled"`` [N, D] (input
        order) when the encoder pools; ``"logits"``, the head's outputs, when there is a head."""
        tokens = self.forward_features(batch)
        out = {"tokens": tokens}
        if self.pool is not None:
            out["pooled"] = self.pooled(tokens, batch)
        if isinstance(self.head, Head):
            out["logits"] = self.head(out["pooled"] if self.head.pooled else tokens)
        return out


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


def inflate_weights(weights: dict[str, torch.Tensor], image: NaViTConfig, clip: NaViTConfig) -> dict[str, torch.Tensor]:
    """An image model's weights (2 axes) for a clip model (3 axes), such that a still image (a
    one-tubelet clip, its frame repeated) gives exactly the image model's outputs.

    The patch embedding's kernel is split evenly over the tubelet's frames (for
    the difference inputs, it reads the mean frame and the changes start at zero); the spatial position
    tables move to axes 1 and 2, and the time axis starts neutral: a zero table (an all-one
    table for ``pos_combine="product"``), or a zero projection for Fourier features. Sin-cos
    embeddings, stacked embeddings and RoPE have no neutral time axis: they are refused.
    """
    if image.num_axes != 2 or clip.num_axes != 3:
        raise ValueError(f"inflation takes a 2-axis image model to a 3-axis clip model, got {image.num_axes} -> {clip.num_axes}")
    if clip.rope or (clip.pos_embed != "none" and (clip.pos_embed == "sincos" or clip.pos_combine == "stack")):
        raise ValueError(
            "an image model inflates exactly only with learned or fourier position embeddings combined by "
            f"sum or product and without rope (got pos_embed={clip.pos_embed}, pos_combine={clip.pos_combine}, "
            f"rope={clip.rope})"
        )
    out = {k: v for k, v in weights.items() if not k.startswith("pos_embed.axes.")}
    pt = clip.temporal_patch_size
    kernel = weights["patch_embed.weight"]
    if clip.tubelet_input != "frames":  # the mean frame takes the image kernel; changes start unseen
        out["patch_embed.weight"] = torch.cat([kernel / clip.tubelet_mean_gain, kernel.new_zeros(kernel.shape[0], kernel.shape[1] * (pt - 1))], 1)
    else:
        out["patch_embed.weight"] = kernel.repeat(1, pt) / pt
    for axis in (0, 1):
        for key in [k for k in weights if k.startswith(f"pos_embed.axes.{axis}.")]:
            out[key.replace(f"axes.{axis}.", f"axes.{axis + 1}.")] = weights[key]
    neutral = 1.0 if clip.pos_combine == "product" else 0.0
    for key in [k for k in weights if k.startswith("pos_embed.axes.0.")]:
        tensor = weights[key]
        out[key] = tensor.new_full(tensor.shape, neutral if key.endswith(("table", "proj.bias")) else 0.0)
    return out


def inflate_to_clips(model: NaViT, temporal_patch_size: int = 2) -> NaViT:
    """The clip model (3 axes, tubelets of ``temporal_patch_size`` frames) an image model becomes;
    see :func:`inflate_weights`. Its processor is the image model's, for clips."""
    config = model.config.replace(num_axes=3, temporal_patch_size=temporal_patch_size)
    processor = model.processor.replace(num_axes=3, temporal_patch_size=temporal_patch_size) if model.processor else None
    clip = NaViT(config, processor, model.head_spec())
    clip.load_state_dict(inflate_weights(model.state_dict(), model.config, config))
    return clip


class TokenModel(NaViT):
    """The encoder with a per-token head (subclasses set ``HEAD``, its registered name, and
    ``TASK``, for messages): images only, every token normed (``final_norm="tokens"``), no pooling."""

    HEAD: str
    TASK: str

    def __init__(self, config: NaViTConfig, processor: Processor | None = None, head: dict[str, Any] | None = None) -> None:
        if head is None and (config.num_axes != 2 or config.num_classes < 1):
            raise ValueError(f"{self.TASK} takes images (num_axes=2) and at least one class, got "
                             f"num_axes={config.num_axes}, num_classes={config.num_classes}")  # fmt: skip
        head = head if head is not None else {"name": self.HEAD, "num_classes": config.num_classes}
        if head.get("name") != self.HEAD:
            raise ValueError(f"a {type(self).__name__}'s head is {self.HEAD!r}, got {head.get('name')!r}")
        super().__init__(config.replace(final_norm="tokens"), processor, head)
