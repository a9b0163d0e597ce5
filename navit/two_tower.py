"""Two-tower image-text model for contrastive pre-training (NaViT paper §2.4, §3.2).

The model is an encoder plus a head, as every navit model: the image tower is the
:class:`~navit.NaViT` encoder alone (``num_classes=0``), whose ``embed(batch)`` gives one pooled
vector per packed image, and the head is the registered ``text-tower`` head
(:class:`~navit.heads.TextTowerHead`): a text transformer, the projections of both sides to a
shared ``embed_dim`` (L2-normalised), and the learned logit scale and bias. Train with
:meth:`ImageTextModel.contrastive_loss` (the chunked losses of :mod:`navit.contrastive`).

It is saved as every model is: ``to_dict()`` is the encoder's config and ``head_spec()`` the
head's, ``{"name": "text-tower", **TextTowerConfig}``. The head's weights sit at the model's top
level (``text.*``, ``text_proj.*``, ``image_proj.*``, ``logit_scale``, ``logit_bias``) and the
encoder's under ``image.*``, as they always have, so older checkpoints and the SigLIP2 weight
names map unchanged; a config dict of the older flat layout (the encoder under ``"image"``, the
text settings beside it) is read by :meth:`ImageTextModel.from_dict`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from navit.batch import PackedBatch
from navit.config import NaViTConfig, resolve_config
from navit.heads import LOSSES, TextTowerConfig, TextTowerHead, head_class
from navit.model import NaViT

__all__ = ["ImageTextModel", "TextTowerConfig", "create_image_text_model", "upgrade_config", "LOSSES"]


def upgrade_config(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The encoder config and head spec of a config dict in the layout written before the text
    tower was a head: ``{"image": encoder config, embed_dim, loss, text_..., ...}``."""
    values = dict(values)
    return values.pop("image"), {"name": TextTowerHead.name, **values}


class ImageTextModel(TextTowerHead):
    """The NaViT encoder (``image``) with the ``text-tower`` head: images and texts projected to a
    shared, L2-normalised space.

    ``encoder`` is the image tower's :class:`NaViTConfig` (``num_classes=0``); ``head`` the
    text tower's spec (``{"name": "text-tower", ...}``) or :class:`TextTowerConfig`, by default
    one as wide as the encoder (:meth:`TextTowerConfig.for_encoder`). ``config`` is the head's
    config and ``image.config`` the encoder's.

    The model *is* its head with the encoder added (a subclass of :class:`TextTowerHead`), so the
    head's weights keep their names at the top level. ``logit_scale`` holds log t (CLIP
    convention); ``logit_bias`` is the SigLIP bias b, a parameter for the sigmoid loss and
    ``None`` for softmax. ``forward(batch, ids, mask)`` returns ``(img_emb, txt_emb)``.
    """

    def __init__(
        self, encoder: NaViTConfig, processor=None, head: dict[str, Any] | TextTowerConfig | None = None
    ) -> None:
        if not isinstance(encoder, NaViTConfig):
            raise TypeError(f"ImageTextModel takes the image tower's NaViTConfig, got {type(encoder).__name__}")
        if encoder.num_classes != 0:
            raise ValueError("the image tower of an image-text model has no head of its own: it needs "
                             f"num_classes=0, got num_classes={encoder.num_classes}")  # fmt: skip
        nn.Module.__init__(self)
        self.image = NaViT(encoder, processor)  # built first: parameter order (and optimizer states) as before
        self.build_tower(self.head_config(head, encoder), encoder)

    @staticmethod
    def head_config(head: dict[str, Any] | TextTowerConfig | None, encoder: NaViTConfig) -> TextTowerConfig:
        if head is None:
            return TextTowerConfig.for_encoder(encoder)
        if isinstance(head, TextTowerConfig):
            return head
        if head_class(head) is not TextTowerHead:
            raise ValueError(f"an image-text model's head is the {TextTowerHead.name!r} head, got {head.get('name')!r}")
        return TextTowerConfig.from_dict({k: v for k, v in head.items() if k != "name"})

    # -- building / saving ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The encoder's config as a JSON-able dict; with :meth:`head_spec`, what :meth:`from_dict`
        rebuilds the model from."""
        return self.image.to_dict()

    def head_spec(self) -> dict[str, Any]:
        """The text tower as ``{"name": "text-tower", **config}`` (see :mod:`navit.heads`)."""
        return self.spec()

    @classmethod
    def from_dict(cls, values: dict[str, Any], processor=None, head: dict[str, Any] | None = None) -> "ImageTextModel":
        """The model :meth:`to_dict` and :meth:`head_spec` describe; a config of the older flat
        layout (no head spec, the encoder under ``"image"``) is read as well."""
        if head is None and "image" in values:
            values, head = upgrade_config(values)
        return cls(NaViTConfig.from_dict(values), processor, head)

    @property
    def processor(self):
        """The image tower's :class:`navit.Processor`."""
        return self.image.processor

    @processor.setter
    def processor(self, processor) -> None:
        self.image.processor = processor

    def no_weight_decay(self) -> set[str]:
        """The image tower's exclusions, and the head's (1-D parameters, text positions, logit scalars)."""
        return {f"image.{n}" for n in self.image.no_weight_decay()} | super().no_weight_decay()

    def fsdp_units(self) -> list[nn.Module]:
        """Every transformer block of both towers."""
        return [*self.image.fsdp_units(), *super().fsdp_units()]

    def flops(self, batch: PackedBatch, text_shape: tuple[int, int], *, training: bool = False) -> int:
        """FLOPs (matmuls) of a forward, or a training step, over ``batch`` and texts whose ids
        are ``text_shape`` [N, T] (see :meth:`navit.NaViT.flops`)."""
        head = super().flops(batch) + self.text_flops(text_shape)
        return self.image.flops(batch, training=training) + (3 if training else 1) * head

    # -- encoders ------------------------------------------------------------------------------
    def encode_image(self, batch: PackedBatch) -> torch.Tensor:
        """[N, embed_dim] unit vectors, one per packed image, in input order."""
        return self.project_image(self.image.embed(batch))

    def forward(self, batch: PackedBatch, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(batch), self.encode_text(ids, mask)


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
    head = TextTowerConfig.for_encoder(
        image_cfg, loss=loss, embed_dim=embed_dim, text_width=text_width, text_depth=text_depth,
        text_heads=text_heads, text_mlp_ratio=text_mlp_ratio, text_max_len=text_max_len,
        init_logit_scale=init_logit_scale, init_logit_bias=init_logit_bias,
    )  # fmt: skip
    return ImageTextModel(image_cfg, head=head)
