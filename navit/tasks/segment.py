"""Semantic segmentation at native resolution: a class for every pixel, from packed sequences.

Each image keeps its own resolution and aspect ratio and shares a sequence with others. The model
(:class:`Segmenter`) is the NaViT encoder with the linear decoder of Segmenter (the paper's
dense-prediction set-up, the ``segmenter`` head of :mod:`navit.heads`): every token's feature
becomes logits for its ``p × p`` pixels and every class. The loss is
the pixel cross entropy over real tokens only (padding, dropped tokens and the ignore label 255
carry none); targets are the mask, resized with nearest neighbour onto the image's patch grid and
carried per token through packing (``PackedBatch.fields["mask"]``). At evaluation and prediction
each image's logits are put back on its grid, resized (bilinear) to the image's own pixel size and
compared with its own mask there: mIoU, per-class IoU and pixel accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from navit.config import option
from navit.media.image import load_rgb
from navit.data.segmentation import IGNORE, palette, palette_mask
from navit.heads import SegmenterHead
from navit.model import TokenModel
from navit.batch import PackedBatch
from navit.tasks.base import Task, TaskLoss


@dataclass
class SegmentOptions:
    overlay_alpha: float = option(0.5, "predict: opacity of the class colours over the image in overlay PNGs")

    def __post_init__(self) -> None:
        if not 0 <= self.overlay_alpha <= 1:
            raise ValueError(f"overlay_alpha must be in [0, 1], got {self.overlay_alpha}")


class Segmenter(TokenModel):
    """The NaViT encoder with the ``segmenter`` head (a linear decoder per token): ``model(batch)``
    gives logits [B, L, p·p, classes] for the pixels of every token (in the patch's row-major
    order). Every token is normed (``final_norm="tokens"``); no pooling is built."""

    HEAD, TASK = SegmenterHead.name, "segmentation"

    def label_maps(self, logits: torch.Tensor, batch: PackedBatch, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Each example's class per pixel [H, W] (uint8) at ``sizes``; see :meth:`SegmenterHead.label_maps`."""
        return self.head.label_maps(logits, batch, sizes)


def confusion(prediction: torch.Tensor, truth: torch.Tensor, classes: int) -> torch.Tensor:
    """[classes, classes] counts of (true class, predicted class) over pixels not labelled 255."""
    truth, prediction = truth.flatten().long().cpu(), prediction.flatten().long().cpu()
    keep = truth != IGNORE
    return torch.bincount(truth[keep] * classes + prediction[keep], minlength=classes * classes).view(classes, classes)


def scores(counts: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """mIoU (over the classes present in the truth or the predictions), each class's IoU (None
    where neither has it) and pixel accuracy, from a confusion matrix."""
    counts = counts.double()
    hits = counts.diag()
    union = counts.sum(0) + counts.sum(1) - hits
    iou = hits / union.clamp(min=1)
    present = union > 0
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_accuracy": float(hits.sum() / counts.sum().clamp(min=1)),
        "class_iou": {name: (round(float(v), 6) if ok else None) for name, v, ok in zip(class_names, iou, present)},
    }


def overlay(picture: Image.Image, mask: np.ndarray, alpha: float) -> Image.Image:
    """The picture with each pixel's class colour blended over it (background, class 0, left clear)."""
    colors = np.asarray(palette(), dtype=np.float32).reshape(-1, 3)[mask]
    pixels = np.asarray(picture.convert("RGB"), dtype=np.float32)
    weight = np.where(mask[..., None] > 0, alpha, 0.0)
    return Image.fromarray(np.round(pixels * (1 - weight) + colors * weight).astype(np.uint8))


class Segmentation(Task):
    name = "segment"
    Options = SegmentOptions
    model_class = Segmenter
    heads = ("segmenter",)
    dense_keys = ("mask",)
    needs = {"mask": "masks"}
    data_hint = ("use synthetic-seg, a folder with images/ and masks/ (same stems, optional classes.txt) or a "
                 "manifest with path,mask columns")
    metric = "miou"
    writes_files = True

    def targets(self, item: dict[str, Any]) -> dict[str, Any]:
        return {}  # the mask travels with the tokens, as the example's "mask" field

    def eval_targets(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"mask": torch.from_numpy(np.asarray(item["mask"]).copy())}  # at the image's own size

    def loss(self, forward: Callable[..., Any], model: nn.Module, batch: PackedBatch, targets: dict[str, Any]) -> TaskLoss:
        """The pixel cross entropy summed over the labelled pixels of real tokens, and their count."""
        logits = forward(batch).float()  # [B, L, p², C]
        labels = batch.fields["mask"].masked_fill(~batch.token_mask[..., None], IGNORE)
        loss_sum = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return TaskLoss(loss_sum, int((labels != IGNORE).sum()))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, Any]:
        model.eval()
        segmenter = getattr(model, "module", model)  # label_maps is post-processing: DDP's wrapper lacks it
        classes = len(self.class_names)
        counts = torch.zeros(classes, classes, dtype=torch.long)
        examples = tokens = 0
        for item in loader:
            item = item.to(device)
            masks = item.targets["mask"]
            maps = segmenter.label_maps(model(item.batch), item.batch, [tuple(m.shape) for m in masks])
            for prediction, truth in zip(maps, masks):
                counts += confusion(prediction, truth, classes)
            examples += len(masks)
            tokens += item.batch.num_real_tokens
        return {**scores(counts, self.class_names), "tokens_per_example": tokens / max(1, examples),
                "examples": examples}  # fmt: skip

    @torch.no_grad()
    def predict(
        self, model: nn.Module, batch: PackedBatch, *, topk: int = 5, inputs: list[Any] | None = None
    ) -> list[dict[str, Any]]:
        """Per input: its class map at its own size (``"mask"``, uint8 [H, W]) and the share of
        its pixels in each class found (``"classes"``, largest first)."""
        if inputs is None:
            raise ValueError("segmentation predicts masks at each input's own size: pass the inputs")
        sizes = [_picture(x).size[::-1] for x in inputs]
        out = []
        for mask in model.label_maps(model(batch), batch, sizes):
            counts = torch.bincount(mask.flatten().long(), minlength=len(self.class_names)).double()
            order = [i for i in counts.argsort(descending=True).tolist() if counts[i] > 0]
            shares = {self.class_names[i]: round(float(counts[i] / counts.sum()), 6) for i in order}
            out.append({"mask": mask.numpy(), "classes": shares})
        return out

    def save_prediction(self, result: dict[str, Any], source: Any, out: Path, name: str) -> dict[str, Any]:
        """Write ``<name>_mask.png`` (a palette PNG of class indices, the input's size) and
        ``<name>_overlay.png`` into ``out``; the result names them instead of holding the mask."""
        out.mkdir(parents=True, exist_ok=True)
        mask = result["mask"]
        mask_path, overlay_path = out / f"{name}_mask.png", out / f"{name}_overlay.png"
        palette_mask(Image.fromarray(mask)).save(mask_path)
        overlay(_picture(source), mask, self.options.overlay_alpha).save(overlay_path)
        return {**result, "mask": str(mask_path), "overlay": str(overlay_path)}


def _picture(source: Any) -> Image.Image:
    return source if isinstance(source, Image.Image) else load_rgb(source)
