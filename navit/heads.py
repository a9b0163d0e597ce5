"""Heads: what a task puts on the encoder's outputs, one registry line each.

The encoder (:class:`navit.NaViT`) gives per-token features [B, L, D] and, through its pooling,
one pooled vector per example [N, D]. A head reads one of the two (``pooled``) and turns it into
the task's outputs. Each head has a small config dataclass, so a model is saved as its encoder
config plus a head *spec*, ``{"name": ..., **head config}``, which :func:`build_head` turns back
into the same head. Adding a head is a class here and a line in :data:`HEADS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from navit.batch import PackedBatch
from navit.config import NaViTConfig, check_numbers, reject_unknown_fields


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
    Config: ClassVar[type[HeadConfig]]
    pooled: ClassVar[bool]
    config: HeadConfig

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def spec(self) -> dict[str, Any]:
        """``{"name": ..., **config}``: what :func:`build_head` rebuilds this head from."""
        return {"name": self.name, **self.config.to_dict()}

    def flops(self, batch: PackedBatch) -> int:
        """Matmul FLOPs of a forward over ``batch`` (2 per multiply-add)."""
        raise NotImplementedError


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


HEADS: dict[str, type[Head]] = {
    ClassifierHead.name: ClassifierHead,
    SegmenterHead.name: SegmenterHead,
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


__all__ = ["HEADS", "ClassifierHead", "Head", "HeadConfig", "SegmenterHead", "build_head", "default_head", "head_class"]
