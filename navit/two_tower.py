"""Two-tower image-text model for contrastive pre-training (NaViT paper §2.4, §3.2).

The image tower is the :class:`~navit.NaViT` encoder alone, without a head (``num_classes=0``), so
``embed(batch)`` gives one pooled vector per packed image; the text tower is a
:class:`~navit.text.TextTransformer`. Each is followed by a bias-free linear projection to a
shared ``embed_dim`` and L2-normalised. Train with :meth:`ImageTextModel.contrastive_loss`
(the chunked losses of :mod:`navit.contrastive`).

The whole model is described by an :class:`ImageTextConfig`, a plain JSON-able dict via
``to_dict`` / ``from_dict``, so a checkpoint is that dict plus the ``state_dict``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from navit.config import NaViTConfig, reject_unknown_fields, resolve_config
from navit.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from navit.model import NaViT
from navit.batch import PackedBatch
from navit.text import ByteTokenizer, TextTransformer

__all__ = ["ImageTextConfig", "ImageTextModel", "create_image_text_model", "LOSSES"]

LOSSES = ("sigmoid", "softmax")

#: Initial logit scale t (stored as log t) and bias b per loss: SigLIP uses t = 10, b = -10;
#: CLIP uses t = 1 / 0.07 and no bias.
_INIT_SCALE = {"sigmoid": 10.0, "softmax": 1.0 / 0.07}
_INIT_BIAS = {"sigmoid": -10.0, "softmax": None}


@dataclass
class ImageTextConfig:
    """Everything needed to build an :class:`ImageTextModel`.

    ``init_logit_scale`` / ``init_logit_bias`` of ``None`` mean the loss's default (SigLIP:
    10 and -10; CLIP: 1/0.07 and no bias). The softmax loss has no bias (it would cancel).

    ``image_proj=False`` uses the image tower's pooled vector as it is (SigLIP: the image width
    must then be ``embed_dim``); ``text_proj_bias`` gives the text projection a bias (SigLIP's
    text head). ``text_pool``, ``text_act``, ``text_mlp_dim`` and ``text_norm_eps`` shape the
    text tower (:class:`~navit.text.TextTransformer`).
    """

    image: NaViTConfig = field(default_factory=lambda: NaViTConfig(num_classes=0))
    embed_dim: int = 192
    loss: str = "sigmoid"
    text_width: int = 192
    text_depth: int = 4
    text_heads: int = 3
    text_mlp_ratio: float = 4.0
    text_max_len: int = 64
    vocab_size: int = ByteTokenizer.NUM_BYTES + 3
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    text_mlp_dim: int | None = None
    text_act: str = "gelu"
    text_pool: str = "mean"
    text_norm_eps: float = 1e-6
    image_proj: bool = True
    text_proj_bias: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.image, dict):
            self.image = NaViTConfig.from_dict(self.image)
        if self.loss not in LOSSES:
            raise ValueError(f"ImageTextConfig.loss={self.loss!r}; expected one of {LOSSES}")
        if self.image.num_classes != 0:
            raise ValueError(
                "the image tower must have num_classes=0 (pooled features, no head), "
                f"got num_classes={self.image.num_classes}"
            )
        for name in ("embed_dim", "text_width", "text_depth", "text_heads", "text_max_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageTextConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width={self.text_width} is not divisible by text_heads={self.text_heads}")
        if self.init_logit_scale is not None and self.init_logit_scale <= 0:
            raise ValueError(f"init_logit_scale must be > 0, got {self.init_logit_scale}")
        if self.loss == "softmax" and self.init_logit_bias is not None:
            raise ValueError("the softmax loss has no logit bias; leave init_logit_bias=None")
        if not self.image_proj and self.image.embed_dim != self.embed_dim:
            raise ValueError(f"image_proj=False needs the image width {self.image.embed_dim} to be embed_dim={self.embed_dim}")

    @property
    def logit_scale_init(self) -> float:
        return _INIT_SCALE[self.loss] if self.init_logit_scale is None else float(self.init_logit_scale)

    @property
    def logit_bias_init(self) -> float | None:
        return _INIT_BIAS[self.loss] if self.init_logit_bias is None else float(self.init_logit_bias)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the image config nested under ``"image"``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ImageTextConfig":
        reject_unknown_fields(cls, values, "ImageTextConfig field(s)", TypeError)
        values = dict(values)
        if isinstance(values.get("image"), dict):
            values["image"] = NaViTConfig.from_dict(values["image"])
        return cls(**values)


class ImageTextModel(nn.Module):
    """NaViT image tower + text transformer, projected to a shared, L2-normalised space.

    ``logit_scale`` is a parameter holding log t (CLIP convention; the loss multiplies by
    ``logit_scale.exp()``); ``logit_bias`` is the SigLIP bias b, a parameter for the sigmoid loss
    and ``None`` for softmax. ``forward(batch, ids, mask)`` returns ``(img_emb, txt_emb)``.
    """

    def __init__(self, config: ImageTextConfig, processor=None) -> None:
        super().__init__()
        self.config = cfg = config
        self.image = NaViT(cfg.image, processor)
        self.text = TextTransformer(
            cfg.vocab_size,
            width=cfg.text_width,
            depth=cfg.text_depth,
            num_heads=cfg.text_heads,
            max_len=cfg.text_max_len,
            mlp_ratio=cfg.text_mlp_ratio,
            mlp_dim=cfg.text_mlp_dim,
            norm_eps=cfg.text_norm_eps,
            act=cfg.text_act,
            pool=cfg.text_pool,
        )
        self.image_proj = nn.Linear(cfg.image.embed_dim, cfg.embed_dim, bias=False) if cfg.image_proj else nn.Identity()
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=cfg.text_proj_bias)
        for proj in (self.image_proj, self.text_proj):
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        bias = cfg.logit_bias_init
        self.logit_bias = None if bias is None else nn.Parameter(torch.tensor(float(bias)))

    # -- building / saving ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The model's config as a JSON-able dict; ``from_dict(d)`` + ``load_state_dict`` rebuild it."""
        return self.config.to_dict()

    def head_spec(self) -> None:
        """None: no registered head; the text tower and projections are described by the config."""
        return None

    @classmethod
    def from_dict(cls, values: dict[str, Any], processor=None, head: dict[str, Any] | None = None) -> "ImageTextModel":
        if head is not None:
            raise ValueError(f"an image-text model takes no head, got {head.get('name')!r}")
        return cls(ImageTextConfig.from_dict(values), processor)

    @property
    def num_classes(self) -> None:
        """None: the model classifies by class names, any number of them (zero-shot)."""
        return None

    def tokenizer(self, **kwargs: Any):
        """The tokenizer of this model's text tower: a pretrained one attached to the model
        (``text_tokenizer``, loaded with it from its folder), else a :class:`ByteTokenizer`."""
        if getattr(self, "text_tokenizer", None) is not None:
            return self.text_tokenizer
        if self.config.vocab_size != ByteTokenizer.NUM_BYTES + 3:
            raise ValueError(
                f"vocab_size={self.config.vocab_size} is not the byte tokenizer's, and no tokenizer was loaded "
                "with the model (put tokenizer.json beside its weights)"
            )
        return ByteTokenizer(max_len=self.config.text_max_len, **kwargs)

    @property
    def processor(self):
        """The image tower's :class:`navit.Processor`."""
        return self.image.processor

    @processor.setter
    def processor(self, processor) -> None:
        self.image.processor = processor

    def no_weight_decay(self) -> set[str]:
        """The image tower's exclusions, plus 1-D parameters, the text positions and the logit scalars."""
        image = {f"image.{n}" for n in self.image.no_weight_decay()}
        return image | {n for n, p in self.named_parameters() if p.dim() < 2 or n == "text.pos_embed"}

    def fsdp_units(self) -> list[nn.Module]:
        """Every transformer block of both towers."""
        return [*self.image.fsdp_units(), *self.text.blocks]

    def flops(self, batch: PackedBatch, text_shape: tuple[int, int], *, training: bool = False) -> int:
        """FLOPs (matmuls) of a forward, or a training step, over ``batch`` and texts whose ids
        are ``text_shape`` [N, T] (see :meth:`navit.NaViT.flops`)."""
        cfg = self.config
        (num_texts, length), width = text_shape, cfg.text_width
        hidden = cfg.text_mlp_dim or int(width * cfg.text_mlp_ratio)
        per_text = length * cfg.text_depth * (4 * width * width + 2 * width * hidden + 2 * length * width)
        image_proj = cfg.image.embed_dim * cfg.embed_dim if cfg.image_proj else 0
        projections = batch.num_examples * image_proj + num_texts * width * cfg.embed_dim
        return self.image.flops(batch, training=training) + (6 if training else 2) * (num_texts * per_text + projections)

    # -- encoders ------------------------------------------------------------------------------
    def encode_image(self, batch: PackedBatch) -> torch.Tensor:
        """[N, embed_dim] unit vectors, one per packed image, in input order."""
        return F.normalize(self.image_proj(self.image.embed(batch)), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, embed_dim] unit vectors, one per text."""
        return F.normalize(self.text_proj(self.text(ids, mask)), dim=-1)

    def forward(self, batch: PackedBatch, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(batch), self.encode_text(ids, mask)

    # -- loss ----------------------------------------------------------------------------------
    def logits(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        """Full [N_img, N_txt] logit matrix ``t <img, txt> (+ b)`` (for evaluation)."""
        out = self.logit_scale.exp() * img_emb @ txt_emb.T
        return out if self.logit_bias is None else out + self.logit_bias

    def contrastive_loss(
        self,
        img_emb: torch.Tensor,
        txt_emb: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        chunk_size: int | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor:
        """The configured loss (sigmoid or softmax) with this model's scale and bias."""
        scale = self.logit_scale.exp()
        if self.config.loss == "softmax":
            return softmax_contrastive_loss(
                img_emb, txt_emb, logit_scale=scale, valid=valid, chunk_size=chunk_size, group=group
            )
        return sigmoid_contrastive_loss(
            img_emb, txt_emb, logit_scale=scale, logit_bias=self.logit_bias,
            valid=valid, chunk_size=chunk_size, group=group,
        )


def _default_heads(width: int) -> int:
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


def create_image_text_model(
    image_model: str | NaViTConfig = "navit_ti16",
    *,
    loss: str = "sigmoid",
    embed_dim: int | None = None,
    text_width: int | None = None,
    text_depth: int = 4,
    text_heads: int | None = None,
    text_mlp_ratio: float = 4.0,
    text_max_len: int = 64,
    image_overrides: dict[str, Any] | None = None,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
) -> ImageTextModel:
    """Build an :class:`ImageTextModel` around a NaViT preset or config.

    ``image_overrides`` changes fields of the image config (as in :func:`navit.create_model`);
    the image tower always gets ``num_classes=0``. ``embed_dim`` and ``text_width`` default to
    the image tower's width; ``text_heads`` to one head per 64 channels (at least one, dividing
    the width).
    """
    overrides = dict(image_overrides or {})
    if overrides.get("num_classes", 0) != 0:
        raise ValueError("the image tower of an image-text model has no head; do not set num_classes")
    overrides["num_classes"] = 0
    image_cfg = resolve_config(image_model, **overrides)
    width = image_cfg.embed_dim if text_width is None else text_width
    return ImageTextModel(
        ImageTextConfig(
            image=image_cfg,
            embed_dim=image_cfg.embed_dim if embed_dim is None else embed_dim,
            loss=loss,
            text_width=width,
            text_depth=text_depth,
            text_heads=_default_heads(width) if text_heads is None else text_heads,
            text_mlp_ratio=text_mlp_ratio,
            text_max_len=text_max_len,
            init_logit_scale=init_logit_scale,
            init_logit_bias=init_logit_bias,
        )
    )
