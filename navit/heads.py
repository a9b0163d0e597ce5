"""Heads: what a task puts on the encoder's outputs, one registry line each.

The encoder (:class:`navit.NaViT`) gives per-token features [B, L, D] and, through its pooling,
one pooled vector per example [N, D]. A head reads one of the two (``pooled``) and turns it into
the task's outputs. Each head has a small config dataclass, so a model is saved as its encoder
config plus a head *spec*, ``{"name": ..., **head config}``, which :func:`build_head` turns back
into the same head. Adding a head is a class here and a line in :data:`HEADS`.

The heads: ``classifier`` (logits from pooled vectors), ``segmenter`` (logits per pixel from
every token) and ``text-tower`` (the text side of the two-tower image-text model, which puts
pooled vectors and texts in one space; :class:`navit.two_tower.ImageTextModel` is the encoder
with this head).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from navit.batch import PackedBatch
from navit.config import NaViTConfig, check_numbers, reject_unknown_fields
from navit.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from navit.text import ByteTokenizer, TextTransformer


@dataclass
class HeadConfig:
    """The settings of a head over ``num_classes`` classes (the base of the heads' configs)."""

    num_classes: int

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.num_classes < 1:
            raise ValueError(f"a head needs num_classes >= 1, got {self.num_classes}; "
                             "for pooled vectors without a head use num_classes=0 on the model")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HeadConfig":
        reject_unknown_fields(cls, values, f"{cls.__name__} field(s)", ValueError)
        return cls(**values)


class Head(nn.Module):
    """Base of the heads. Subclasses set ``name``, ``Config`` and ``pooled`` (whether the head
    reads pooled vectors [N, D] or per-token features [B, L, D]) and take ``(config, encoder)``,
    ``encoder`` being the :class:`NaViTConfig` of the features they read."""

    name: ClassVar[str]
    Config: ClassVar[type]  # a dataclass with to_dict() and from_dict(values), as HeadConfig
    pooled: ClassVar[bool]
    config: Any

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes

    def spec(self) -> dict[str, Any]:
        """``{"name": ..., **config}``: what :func:`build_head` rebuilds this head from."""
        return {"name": self.name, **self.config.to_dict()}

    def flops(self, batch: PackedBatch) -> int:
        """Matmul FLOPs of a forward over ``batch`` (2 per multiply-add)."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names (within the head) of parameters trained without weight decay, beyond the 1-D
        ones the model excludes anyway."""
        return set()

    def fsdp_units(self) -> list[nn.Module]:
        """The head's modules FSDP shards one by one (a big head's blocks)."""
        return []


class ClassifierHead(Head, nn.Linear):
    """Logits [N, classes] from each example's pooled vector: one linear layer (timm's ``head``)."""

    name = "classifier"
    Config = HeadConfig
    pooled = True

    def __init__(self, config: HeadConfig, encoder: NaViTConfig) -> None:
        nn.Linear.__init__(self, encoder.embed_dim, config.num_classes)
        self.config = config

    def flops(self, batch: PackedBatch) -> int:
        """Once per example."""
        return 2 * batch.num_examples * self.in_features * self.out_features


class SegmenterHead(Head, nn.Linear):
    """Segmenter's linear decoder: every token's feature becomes logits [p·p, classes] for the
    pixels of its patch (in the patch's row-major order), so tokens [B, L, D] give
    [B, L, p·p, classes]. Images only (two axes)."""

    name = "segmenter"
    Config = HeadConfig
    pooled = False

    def __init__(self, config: HeadConfig, encoder: NaViTConfig) -> None:
        if encoder.num_axes != 2:
            raise ValueError(f"the segmenter head takes images (num_axes=2), got num_axes={encoder.num_axes}")
        nn.Linear.__init__(self, encoder.embed_dim, encoder.patch_size**2 * config.num_classes)
        self.config, self.patch_size = config, encoder.patch_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens).unflatten(-1, (self.patch_size**2, self.num_classes))

    def flops(self, batch: PackedBatch) -> int:
        """On every token, padding included."""
        return 2 * batch.segment_ids.numel() * self.in_features * self.out_features

    def label_maps(self, logits: torch.Tensor, batch: PackedBatch, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Each example's class per pixel [H, W] (uint8) at ``sizes`` (its image's height and
        width): its logits on its own grid, resized bilinearly, arg-max over classes."""
        p, classes = self.patch_size, self.num_classes
        maps = []
        for grid_logits, (height, width) in zip(batch.unpack(logits.float().flatten(2)), sizes, strict=True):
            rows, cols = grid_logits.shape[:2]
            image = grid_logits.view(rows, cols, p, p, classes).permute(4, 0, 2, 1, 3).reshape(1, classes, rows * p, cols * p)
            image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
            maps.append(image[0].argmax(0).to(torch.uint8).cpu())
        return maps

class DetectorHead(Head):
    """OWL-ViT's detection head on every token: a box (an MLP of three layers) and class logits
    (one linear layer, sigmoid scores) per token. A token's box starts at its own patch of its
    example's grid: the MLP's output is added to the inverse sigmoid of the patch's centre and
    size as shares of the example's width and height (its own grid, not a square one), and the
    sum goes through a sigmoid. ``forward(tokens, batch)`` gives ``{"boxes": [B, L, 4] (cx, cy,
    w, h) in [0, 1] of the example's canvas, "logits": [B, L, classes]}``. Images only."""

    name = "detector"
    Config = HeadConfig
    pooled = False
    prior = 0.01  # initial score of every class (RetinaNet's focal-loss prior)

    def __init__(self, config: HeadConfig, encoder: NaViTConfig) -> None:
        if encoder.num_axes != 2:
            raise ValueError(f"the detector head takes images (num_axes=2), got num_axes={encoder.num_axes}")
        super().__init__()
        self.config, width = config, encoder.embed_dim
        self.box = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, 4))  # fmt: skip
        self.classes = nn.Linear(width, config.num_classes)

    def reset_parameters(self) -> None:
        """Boxes start as each token's patch (last layer zero), scores at :attr:`prior`."""
        nn.init.zeros_(self.box[-1].weight)
        nn.init.zeros_(self.box[-1].bias)
        nn.init.constant_(self.classes.bias, -math.log((1 - self.prior) / self.prior))

    @staticmethod
    def box_bias(batch: PackedBatch) -> torch.Tensor:
        """[B, L, 4] inverse sigmoid of each token's patch (centre x, centre y, width, height) as
        shares of its example's own grid."""
        rows_cols = batch.token_grid_sizes()[..., -2:].flip(-1).float()  # [B, L, 2] (cols, rows)
        centre = (batch.coords[..., -2:].flip(-1).float() + 0.5) / rows_cols
        patch = torch.stack(torch.broadcast_tensors(1 / rows_cols[..., 0], 1 / rows_cols[..., 1]), -1)
        return torch.logit(torch.cat([centre, patch], -1).clamp(1e-4, 1 - 1e-4))

    def forward(self, tokens: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        bias = self.box_bias(batch).to(tokens.device, tokens.dtype)
        return {"boxes": torch.sigmoid(self.box(tokens) + bias), "logits": self.classes(tokens)}

    def flops(self, batch: PackedBatch) -> int:
        """On every token, padding included."""
        width = self.classes.in_features
        return 2 * batch.segment_ids.numel() * width * (2 * width + 4 + self.config.num_classes)


#: The contrastive losses a text tower is trained with (:mod:`navit.contrastive`).
LOSSES = ("sigmoid", "softmax")
#: Initial logit scale t (stored as log t) and bias b per loss: SigLIP uses t = 10, b = -10;
#: CLIP uses t = 1 / 0.07 and no bias.
_INIT_SCALE = {"sigmoid": 10.0, "softmax": 1.0 / 0.07}
_INIT_BIAS = {"sigmoid": -10.0, "softmax": None}


@dataclass
class TextTowerConfig:
    """The settings of the ``text-tower`` head: a :class:`~navit.text.TextTransformer`
    (``text_*``, ``vocab_size``), the projections of texts and pooled vectors to a shared
    ``embed_dim``, and the loss whose logit scale and bias it learns.

    ``init_logit_scale`` / ``init_logit_bias`` of ``None`` mean the loss's default (SigLIP:
    10 and -10; CLIP: 1/0.07 and no bias). The softmax loss has no bias (it would cancel).
    ``image_proj=False`` takes the encoder's pooled vector as it is (SigLIP: the encoder's width
    must then be ``embed_dim``); ``text_proj_bias`` gives the text projection a bias (SigLIP's
    text head). ``text_pool="last"`` pools a text by its last position (SigLIP), else the mean.
    """

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
        check_numbers(self)
        if self.loss not in LOSSES:
            raise ValueError(f"text-tower loss={self.loss!r}; expected one of {LOSSES}")
        for name in ("embed_dim", "text_width", "text_depth", "text_heads", "text_max_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"text-tower {name} must be >= 1, got {getattr(self, name)}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text-tower text_width={self.text_width} is not divisible by "
                             f"text_heads={self.text_heads}")  # fmt: skip
        if self.init_logit_scale is not None and self.init_logit_scale <= 0:
            raise ValueError(f"text-tower init_logit_scale must be > 0, got {self.init_logit_scale}")
        if self.loss == "softmax" and self.init_logit_bias is not None:
            raise ValueError("the softmax loss has no logit bias; leave init_logit_bias=None")

    @classmethod
    def for_encoder(cls, encoder: NaViTConfig, **settings: Any) -> "TextTowerConfig":
        """A text tower for ``encoder``: ``embed_dim`` and ``text_width`` default to the encoder's
        width, ``text_heads`` to one head per 64 channels (at least one, dividing the width)."""
        settings = {k: v for k, v in settings.items() if v is not None}  # None: the default
        width = settings.setdefault("text_width", encoder.embed_dim)
        settings.setdefault("embed_dim", encoder.embed_dim)
        heads = max(1, width // 64)
        while width % heads:
            heads -= 1
        settings.setdefault("text_heads", heads)
        return cls.from_dict(settings)

    @property
    def logit_scale_init(self) -> float:
        return _INIT_SCALE[self.loss] if self.init_logit_scale is None else float(self.init_logit_scale)

    @property
    def logit_bias_init(self) -> float | None:
        return _INIT_BIAS[self.loss] if self.init_logit_bias is None else float(self.init_logit_bias)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TextTowerConfig":
        reject_unknown_fields(cls, values, "text-tower field(s)", ValueError)
        return cls(**values)


class TextTowerHead(Head):
    """The text tower of the two-tower image-text model (CLIP, SigLIP) as a head on the
    encoder's pooled vectors: a text transformer (``text``) and its projection (``text_proj``),
    the projection of pooled vectors (``image_proj``), and the learned logit scale (log t) and,
    for the sigmoid loss, bias b that score an image against a text.

    It is the classifier's counterpart for class *names*: ``forward(pooled)`` gives unit image
    embeddings [N, embed_dim], :meth:`encode_text` unit text embeddings, and :meth:`logits` the
    scores ``t <img, txt> (+ b)``. The image projection and the logit scalars belong here, not to
    the encoder: their shapes follow this head's settings (``embed_dim``, ``image_proj``,
    ``loss``), and the encoder stays a plain :class:`~navit.NaViT` whose weights load into any
    other head's model.
    """

    name = "text-tower"
    Config = TextTowerConfig
    pooled = True

    def __init__(self, config: TextTowerConfig, encoder: NaViTConfig) -> None:
        super().__init__()
        self.build_tower(config, encoder)

    def build_tower(self, config: TextTowerConfig, encoder: NaViTConfig) -> None:
        """Create the head's modules and parameters on ``self`` (an initialised module)."""
        if not config.image_proj and encoder.embed_dim != config.embed_dim:
            raise ValueError(f"text-tower image_proj=False needs the encoder's width {encoder.embed_dim} to be "
                             f"embed_dim={config.embed_dim}; set image_proj=True or embed_dim={encoder.embed_dim}")  # fmt: skip
        self.config = cfg = config
        self.text = TextTransformer(
            cfg.vocab_size, width=cfg.text_width, depth=cfg.text_depth, num_heads=cfg.text_heads,
            max_len=cfg.text_max_len, mlp_ratio=cfg.text_mlp_ratio, mlp_dim=cfg.text_mlp_dim,
            norm_eps=cfg.text_norm_eps, act=cfg.text_act, pool=cfg.text_pool,
        )  # fmt: skip
        self.image_proj = nn.Linear(encoder.embed_dim, cfg.embed_dim, bias=False) if cfg.image_proj else nn.Identity()
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=cfg.text_proj_bias)
        for proj in (self.image_proj, self.text_proj):
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        bias = cfg.logit_bias_init
        self.logit_bias = None if bias is None else nn.Parameter(torch.tensor(float(bias)))

    @property
    def num_classes(self) -> None:
        """None: it scores any class names (zero-shot)."""
        return None

    def tokenizer(self, **kwargs: Any):
        """The tokenizer of the text tower: a pretrained one attached to the model
        (``text_tokenizer``, loaded with it from its folder), else a :class:`ByteTokenizer`."""
        if getattr(self, "text_tokenizer", None) is not None:
            return self.text_tokenizer
        if self.config.vocab_size != ByteTokenizer.NUM_BYTES + 3:
            raise ValueError(f"vocab_size={self.config.vocab_size} is not the byte tokenizer's, and no tokenizer was "
                             "loaded with the model (put tokenizer.json beside its weights)")  # fmt: skip
        return ByteTokenizer(max_len=self.config.text_max_len, **kwargs)

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        """[N, embed_dim] unit vectors from the encoder's pooled vectors [N, D]."""
        return F.normalize(self.image_proj(pooled), dim=-1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.project_image(pooled)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, embed_dim] unit vectors, one per text (ids and mask [N, T], see :mod:`navit.text`)."""
        return F.normalize(self.text_proj(self.text(ids, mask)), dim=-1)

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
        """The configured loss (sigmoid or softmax, see :mod:`navit.contrastive`) with this head's
        scale and bias."""
        options = dict(logit_scale=self.logit_scale.exp(), valid=valid, chunk_size=chunk_size, group=group)
        if self.config.loss == "softmax":
            return softmax_contrastive_loss(img_emb, txt_emb, **options)
        return sigmoid_contrastive_loss(img_emb, txt_emb, logit_bias=self.logit_bias, **options)

    def no_weight_decay(self) -> set[str]:
        """1-D parameters (biases, norms, the logit scalars) and the text positions."""
        return {n for n, p in self.named_parameters() if p.dim() < 2 or n == "text.pos_embed"}

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.text.blocks)

    def flops(self, batch: PackedBatch) -> int:
        """The image projection, once per example (the texts: :meth:`text_flops`)."""
        proj = self.image_proj
        return 2 * batch.num_examples * proj.in_features * proj.out_features if isinstance(proj, nn.Linear) else 0

    def text_flops(self, text_shape: tuple[int, int]) -> int:
        """FLOPs of encoding texts whose ids are ``text_shape`` [N, T]: the text transformer on
        every position, padding included, and the projection once per text."""
        cfg = self.config
        (num_texts, length), width = text_shape, cfg.text_width
        hidden = cfg.text_mlp_dim or int(width * cfg.text_mlp_ratio)
        per_text = length * cfg.text_depth * (4 * width * width + 2 * width * hidden + 2 * length * width)
        return 2 * num_texts * (per_text + width * cfg.embed_dim)


HEADS: dict[str, type[Head]] = {
    ClassifierHead.name: ClassifierHead,
    SegmenterHead.name: SegmenterHead,
    TextTowerHead.name: TextTowerHead,
    DetectorHead.name: DetectorHead,
}


def head_class(spec: dict[str, Any]) -> type[Head]:
    """The registered head class a spec names."""
    name = spec.get("name")
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; available: {sorted(HEADS)}")
    return HEADS[name]


def build_head(spec: dict[str, Any], encoder: NaViTConfig) -> Head:
    """The head a spec (``{"name": ..., **config}``, see :meth:`Head.spec`) describes, for an
    encoder of config ``encoder``."""
    cls = head_class(spec)
    return cls(cls.Config.from_dict({k: v for k, v in spec.items() if k != "name"}), encoder)


def default_head(config: NaViTConfig) -> dict[str, Any] | None:
    """The head a bare :class:`NaViTConfig` implies: a classifier over its ``num_classes``, or
    none for ``num_classes=0`` (timm's convention)."""
    return {"name": ClassifierHead.name, "num_classes": config.num_classes} if config.num_classes else None


__all__ = ["HEADS", "LOSSES", "ClassifierHead", "DetectorHead", "Head", "HeadConfig", "SegmenterHead", "TextTowerConfig",
           "TextTowerHead", "build_head", "default_head", "head_class"]
