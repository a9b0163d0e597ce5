"""Zero-shot classification with an image-text model (CLIP-style prompt ensembling).

Each class name is turned into prompts with a few templates ("a photo of a {}."), the prompts are
embedded by the text tower, and a class's weight is the re-normalised mean of its prompts' unit
embeddings. An image's logits are its cosine similarities to the class weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from navit.text import ByteTokenizer

if TYPE_CHECKING:
    from navit.batch import PackedBatch
    from navit.two_tower import ImageTextModel

__all__ = ["DEFAULT_TEMPLATES", "class_prompts", "zero_shot_weights", "zero_shot_logits"]

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
)


def _readable(name: str) -> str:
    """``"tall_ellipse"`` -> ``"tall ellipse"``: underscores to spaces, whitespace collapsed."""
    return " ".join(str(name).replace("_", " ").split())


def class_prompts(class_names: Sequence[str], templates: Sequence[str] | None = None) -> list[list[str]]:
    """One list of prompts per class: every template filled with the readable class name."""
    templates = DEFAULT_TEMPLATES if templates is None else tuple(templates)
    if isinstance(class_names, str):
        raise TypeError("class_names must be a list of names, not one string")
    if not templates:
        raise ValueError("templates must not be empty")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"each template must contain '{{}}' exactly once, got {t!r}")
    return [[t.replace("{}", _readable(name)) for t in templates] for name in class_names]


@torch.no_grad()
def zero_shot_weights(
    model: torch.nn.Module,
    tokenizer: ByteTokenizer,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    *,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Class weights [C, D]: mean of each class's normalised prompt embeddings, re-normalised.

    ``model`` is anything with ``encode_text(ids, mask)`` (an :class:`~navit.two_tower.ImageTextModel`);
    its train/eval mode is left as it is. Prompts are encoded ``batch_size`` at a time on the
    device of the model's parameters.
    """
    prompts = class_prompts(class_names, templates)
    if not prompts:
        raise ValueError("class_names must not be empty")
    flat = [p for per_class in prompts for p in per_class]
    device = next(model.parameters()).device
    chunks, truncated = [], 0
    for start in range(0, len(flat), batch_size):
        ids, mask = tokenizer.encode(flat[start : start + batch_size])
        truncated += tokenizer.last_num_truncated
        chunks.append(F.normalize(model.encode_text(ids.to(device), mask.to(device)).float(), dim=-1))
    if truncated:
        warnings.warn(f"{truncated} of {len(flat)} zero-shot prompts are longer than the text tower's "
                      f"{tokenizer.max_len} tokens and were cut: class names that differ only after the cut "
                      "get the same weights", stacklevel=2)  # fmt: skip
    emb = torch.cat(chunks).view(len(prompts), len(prompts[0]), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def zero_shot_logits(img_emb: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [N, C] of images [N, D] to class weights [C, D] (both re-normalised)."""
    if img_emb.ndim != 2 or weights.ndim != 2 or img_emb.shape[1] != weights.shape[1]:
        raise ValueError(
            f"expected img_emb [N, D] and weights [C, D], got {tuple(img_emb.shape)} and {tuple(weights.shape)}"
        )
    return F.normalize(img_emb, dim=-1) @ F.normalize(weights.to(img_emb.dtype), dim=-1).T


class ZeroShotClassifier(nn.Module):
    """Classifies packed images by similarity to class-name prompts (for evaluation)."""

    def __init__(self, model: ImageTextModel, tokenizer: ByteTokenizer, class_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("weights", zero_shot_weights(model, tokenizer, class_names))

    @property
    def processor(self):
        """The image tower's :class:`navit.Processor`."""
        return self.model.processor

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Cosine similarities times the model's learned temperature, so softmax is meaningful."""
        scale = self.model.logit_scale.exp()
        return scale * zero_shot_logits(self.model.encode_image(batch), self.weights)
