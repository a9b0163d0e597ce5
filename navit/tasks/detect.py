"""Object detection at native resolution: boxes and classes from packed sequences (``--task detect``).

Each image keeps its own resolution and aspect ratio and shares a sequence with others. The model
(:class:`Detector`) is the NaViT encoder with OWL-ViT's head (``detector`` in :mod:`navit.heads`):
every token predicts one box, starting from its own patch of its example's grid, and a sigmoid
score per class. Training assigns each ground-truth box one token of its own example
(:mod:`navit.tasks.detect_assign`, option ``assign``: the token whose patch holds the box's
centre, or DETR's Hungarian matching), then sums a sigmoid focal loss over every token and class
and the L1 and GIoU losses of the assigned boxes; the trainer divides by the number of boxes over
all ranks. Boxes follow crop, flip, resolution sampling and the patch grid through
``item["boxes"]`` (:mod:`navit.ops.geometry`); a box a crop leaves less than ``min_visible`` of is
dropped; token dropping leaves the targets alone.

Evaluation maps every prediction back to the input's own pixels and scores it with COCO's mAP as
``pycocotools`` computes it (AP, AP50, AP75, AP small / medium / large; the ``detect`` extra).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from navit.batch import PackedBatch
from navit.boxes import cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from navit.config import NaViTConfig, check_choices, option
from navit.data.segmentation import palette
from navit.heads import DetectorHead
from navit.media.image import load_rgb
from navit.model import TokenModel
from navit.processor import Processor
from navit.tasks.base import Task, TaskLoss
from navit.tasks.detect_assign import ASSIGNMENTS, FOCAL_ALPHA, FOCAL_GAMMA, centre_match, match

#: COCO's metrics, as pycocotools orders its ``stats``.
COCO_METRICS = ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


@dataclass
class DetectOptions:
    threshold: float = option(0.3, "predict: smallest score of a box that is reported")
    min_visible: float = option(0.3, "training: a box a random crop leaves less than this share of its area is dropped")
    class_weight: float = option(2.0, "weight of the focal class loss (and of its Hungarian matching cost)")
    l1_weight: float = option(5.0, "weight of the L1 box loss (and of its Hungarian matching cost)")
    giou_weight: float = option(2.0, "weight of the generalised-IoU box loss (and of its Hungarian matching cost)")
    max_detections: int = option(100, "evaluation: boxes kept per image (COCO's limit is 100)")
    assign: str = option("centre", "which token learns each box: hungarian (DETR's matching) or centre (the token "
                         "whose patch holds the box's centre)", choices=ASSIGNMENTS)  # fmt: skip

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1 or not 0 <= self.min_visible <= 1:
            raise ValueError(f"threshold and min_visible must be in [0, 1], got {self.threshold}, {self.min_visible}")
        if min(self.class_weight, self.l1_weight, self.giou_weight) < 0 or self.max_detections < 1:
            raise ValueError("loss weights must be >= 0 and max_detections >= 1")
        check_choices(self, "task option ")


class Detector(TokenModel):
    """The NaViT encoder with the ``detector`` head: ``model(batch)`` gives ``{"boxes": [B, L, 4],
    "logits": [B, L, classes]}``, a box (cx, cy, w, h as shares of the example's canvas) and class
    logits for every token. Every token is normed (``final_norm="tokens"``); no pooling is built.
    :meth:`detect` turns outputs into boxes in each input's own pixels."""

    HEAD, TASK = DetectorHead.name, "detection"

    def __init__(self, config: NaViTConfig, processor: Processor | None = None, head: dict[str, Any] | None = None) -> None:
        super().__init__(config, processor, head)
        self.head.reset_parameters()

    def forward_head(self, tokens: torch.Tensor, batch: PackedBatch, *, pre_logits: bool = False) -> Any:
        return tokens if pre_logits else self.head(tokens, batch)

    def outputs(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        tokens = self.forward_features(batch)
        return {"tokens": tokens, **self.head(tokens, batch)}

    @torch.no_grad()
    def detect(self, inputs: PackedBatch | Sequence[Any], sizes: Sequence[tuple[int, int]] | None = None, *,
               threshold: float = 0.3, topk: int = 100) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        """Boxes of each input in its own pixels: ``{"boxes": [k, 4] (x1, y1, x2, y2), "scores":
        [k], "labels": [k]}`` per input, best first, at most ``topk`` scoring ``threshold`` or
        more. ``inputs`` is a batch the processor made, with each input's ``sizes`` (width,
        height), or the inputs themselves (paths, PIL images, [C, H, W] tensors)."""
        if isinstance(inputs, PackedBatch):
            if sizes is None:
                raise ValueError("detect(batch, sizes): give each input's (width, height) to map boxes back to it")
            batch = inputs
        else:
            pictures = [load_rgb(x) if isinstance(x, (str, Path)) else x for x in inputs]
            sizes = [p.size if isinstance(p, Image.Image) else (p.shape[-1], p.shape[-2]) for p in pictures]
            batch = self.processor(pictures)
        batch = batch.to(self.patch_embed.weight.device)
        found = decode(self(batch), batch, self.patch_size_of(), topk=topk, threshold=threshold)
        out = []
        for (boxes, scores, labels, canvas), (width, height) in zip(found, sizes, strict=True):
            scale = torch.tensor([width / canvas[0], height / canvas[1]] * 2, device=boxes.device)
            out.append({"boxes": clip_to(boxes * scale, width, height), "scores": scores, "labels": labels})
        return out

    def patch_size_of(self) -> int:
        return self.config.patch_size


def clip_to(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    limit = torch.tensor([width, height, width, height], device=boxes.device, dtype=boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), limit)


def decode(out: dict[str, torch.Tensor], batch: PackedBatch, patch_size: int, *, topk: int,
           threshold: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]]:  # fmt: skip
    """Per example, in input order: its best (token, class) pairs, at most ``topk`` scoring at
    least ``threshold``, as (boxes [k, 4] x1, y1, x2, y2 in the example's canvas pixels, scores
    [k], labels [k], the canvas (width, height))."""
    scores_all = out["logits"].float().sigmoid()  # [B, L, C]
    boxes_all = cxcywh_to_xyxy(out["boxes"].float())
    owner = batch.token_example()
    grids = batch.grid_sizes.flatten(0, 1)[batch.example_slots()][:, -2:].tolist()  # [N] (rows, cols)
    classes = scores_all.shape[-1]
    found = []
    for j, (rows, cols) in enumerate(grids):
        mine = owner == j
        scores = scores_all[mine].flatten()
        best = scores.topk(min(topk, scores.numel()))
        keep = best.values >= threshold
        values, index = best.values[keep], best.indices[keep]
        canvas = (cols * patch_size, rows * patch_size)
        scale = torch.tensor([canvas[0], canvas[1]] * 2, device=values.device, dtype=values.dtype)
        found.append((boxes_all[mine][index // classes] * scale, values, index % classes, canvas))
    return found


# ------------------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class BoxTargets:
    """The task's op: the boxes the geometric ops carried into the example's pixels, less those
    a crop left under ``min_visible`` of, as (cx, cy, w, h) shares of the example's canvas."""

    min_visible: float = 0.0

    def __call__(self, item: dict[str, Any], rng: Any) -> dict[str, Any]:
        boxes = np.asarray(item.get("boxes", np.zeros((0, 4))), dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(item.get("box_labels", np.zeros(0)), dtype=np.int64).reshape(-1)
        visible = np.asarray(item.get("box_visible", np.ones(len(boxes))), dtype=np.float64)
        if not len(labels) == len(boxes) == len(visible):
            raise ValueError(f"{len(boxes)} boxes but {len(labels)} box_labels and {len(visible)} visible shares")
        keep = visible >= self.min_visible
        width, height = item["canvas"]
        shares = torch.from_numpy(boxes[keep] / [width, height, width, height]).float()
        return {**item, "det_boxes": xyxy_to_cxcywh(shares), "det_labels": torch.from_numpy(labels[keep])}


# ------------------------------------------------------------------------------------------------
# Matching and loss


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """RetinaNet's focal loss per element (alpha 0.25, gamma 2)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = FOCAL_ALPHA * targets + (1 - FOCAL_ALPHA) * (1 - targets)
    return alpha_t * ce * (1 - p_t) ** FOCAL_GAMMA


def _as_list(values: Any) -> list[torch.Tensor]:
    return list(values) if values is not None else []


# ------------------------------------------------------------------------------------------------
# COCO mAP


def coco_map(truths: list[tuple[np.ndarray, np.ndarray]], detections: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
             class_names: list[str]) -> dict[str, float | None]:  # fmt: skip
    """COCO's box metrics as pycocotools computes them: ``truths`` per image (boxes [m, 4] x1, y1,
    x2, y2, labels [m]), ``detections`` per image (boxes [k, 4], scores [k], labels [k]), all in
    the image's own pixels. Sizes small / medium / large are by box area. A metric with no
    ground truth in its range is None (``map`` and the AP at fixed IoU are then 0)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError("COCO mAP needs pycocotools: pip install 'torch-navit[detect]'") from error
    images, annotations, results = [], [], []
    for image_id, ((boxes, labels), (found, scores, classes)) in enumerate(zip(truths, detections, strict=True), 1):
        images.append({"id": image_id})
        for (x1, y1, x2, y2), label in zip(np.asarray(boxes).tolist(), np.asarray(labels).tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})  # fmt: skip
        for (x1, y1, x2, y2), score, label in zip(np.asarray(found).tolist(), np.asarray(scores).tolist(),
                                                   np.asarray(classes).tolist()):  # fmt: skip
            results.append({"image_id": image_id, "category_id": int(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(score)})  # fmt: skip
    if not results:
        return {name: (0.0 if annotations else None) for name in COCO_METRICS}
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations,
                         "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}  # fmt: skip
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [float(v) for v in evaluation.stats[:6]]
    return {name: (round(v, 6) if v >= 0 else (0.0 if i < 3 else None))
            for i, (name, v) in enumerate(zip(COCO_METRICS, stats))}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The task


class Detection(Task):
    name = "detect"
    Options = DetectOptions
    model_class = Detector
    heads = ("detector",)
    needs = {"boxes": "boxes"}
    data_hint = ("use synthetic-det, a COCO folder (annotations.json and images/) or a COCO instances JSON; "
                 "see docs/detection.md")  # fmt: skip
    metric = "map"
    writes_files = True  # with --out: each input drawn with its boxes
    out_optional = True  # without it, boxes are JSON only

    def check_data(self, source: Any, spec: str) -> None:
        super().check_data(source, spec)
        if not source.class_names:
            raise ValueError(f"--task detect needs class names, but data {spec!r} lists none: a COCO JSON names them "
                             "in 'categories'")  # fmt: skip

    def ops(self, train: bool) -> list[Any]:
        return [BoxTargets(self.options.min_visible if train else 0.0)]

    def targets(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"boxes": item["det_boxes"], "labels": item["det_labels"]}

    def eval_targets(self, item: dict[str, Any]) -> dict[str, Any]:
        """The training targets, and what maps the example's pixels back to the input's: the
        inverse of the geometry (sx, sy, tx, ty) and the input's size."""
        back = item["geometry"].inverse()
        width, height = item["canvas"]
        corner = back.points(np.array([[width, height]]))[0]
        return {**self.targets(item), "to_input": torch.tensor([back.sx, back.sy, back.tx, back.ty]),
                "input_size": torch.tensor(corner)}  # fmt: skip

    def loss(self, forward: Callable[..., Any], model: nn.Module, batch: PackedBatch, targets: dict[str, Any]) -> TaskLoss:
        """Focal loss over every real token and class, L1 and GIoU over the matched boxes, summed;
        the count is this rank's number of boxes."""
        out = forward(batch)
        mask = batch.token_mask
        logits, boxes, owner = out["logits"].float()[mask], out["boxes"].float()[mask], batch.token_example()[mask]
        gt = [b.to(logits.device) for b in _as_list(targets.get("boxes"))]
        labels = [t.to(logits.device).long() for t in _as_list(targets.get("labels"))]
        sizes = torch.tensor([len(b) for b in gt], device=logits.device, dtype=torch.long)
        gt_boxes = torch.cat(gt) if gt else logits.new_zeros(0, 4)
        gt_labels = torch.cat(labels) if labels else owner.new_zeros(0)
        gt_owner = torch.repeat_interleave(torch.arange(len(gt), device=logits.device), sizes)
        o = self.options
        if o.assign == "centre":
            cells, grids = batch.coords[mask][:, -2:], batch.token_grid_sizes()[mask][:, -2:]
            tokens, truths = centre_match(cells, grids, owner, gt_boxes, gt_owner)
        else:
            tokens, truths = match(logits, boxes, owner, gt_boxes, gt_labels, gt_owner,
                                   (o.class_weight, o.l1_weight, o.giou_weight))  # fmt: skip
        onehot = torch.zeros_like(logits)
        onehot[tokens, gt_labels[truths]] = 1.0
        focal = sigmoid_focal_loss(logits, onehot).sum()
        l1 = (boxes[tokens] - gt_boxes[truths]).abs().sum()
        giou = (1 - generalized_box_iou(cxcywh_to_xyxy(boxes[tokens]), cxcywh_to_xyxy(gt_boxes[truths])).diagonal()).sum()
        count = int(gt_boxes.shape[0])
        per_box = max(1, count)
        logs = {name: value.item() / per_box for name, value in (("loss_class", focal.detach()), ("loss_l1", l1.detach()),
                                                                  ("loss_giou", giou.detach()))}  # fmt: skip
        return TaskLoss(o.class_weight * focal + o.l1_weight * l1 + o.giou_weight * giou, count, logs)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, Any]:
        model.eval()
        detector = getattr(model, "module", model)  # decoding is post-processing: DDP's wrapper lacks it
        truths, detections = [], []
        tokens = 0
        for item in loader:
            item = item.to(device)
            found = decode(model(item.batch), item.batch, detector.config.patch_size, topk=self.options.max_detections)
            targets = item.targets
            for j, (boxes, scores, labels, _) in enumerate(found):
                sx, sy, tx, ty = targets["to_input"][j].tolist()
                width, height = targets["input_size"][j].tolist()
                shift = torch.tensor([sx, sy, sx, sy], device=boxes.device), torch.tensor([tx, ty, tx, ty], device=boxes.device)
                detections.append(tuple(t.cpu().numpy() for t in (clip_to(boxes * shift[0] + shift[1], width, height), scores, labels)))
                truth = cxcywh_to_xyxy(targets["boxes"][j].float().cpu()) * torch.tensor([width, height] * 2)
                truths.append((truth.numpy(), targets["labels"][j].cpu().numpy()))
            tokens += item.batch.num_real_tokens
        scores = coco_map(truths, detections, self.class_names)
        return {**scores, "tokens_per_example": tokens / max(1, len(truths)), "examples": len(truths)}

    @torch.no_grad()
    def predict(
        self, model: nn.Module, batch: PackedBatch, *, topk: int = 5, inputs: list[Any] | None = None
    ) -> list[dict[str, Any]]:
        """Per input: ``"boxes"``, ``[{"label", "score", "box": [x1, y1, x2, y2]}]`` in the input's
        own pixels (its EXIF orientation applied), best first, scoring ``threshold`` or more."""
        if inputs is None:
            raise ValueError("detection predicts boxes in each input's own pixels: pass the inputs")
        sizes = [_picture(x).size for x in inputs]
        out = []
        for found in model.detect(batch, sizes, threshold=self.options.threshold, topk=topk):
            boxes = [{"label": self.class_names[int(c)], "score": round(float(s), 6),
                      "box": [round(float(v), 2) for v in b]}
                     for b, s, c in zip(found["boxes"], found["scores"], found["labels"])]  # fmt: skip
            out.append({"boxes": boxes})
        return out

    def save_prediction(self, result: dict[str, Any], source: Any, out: Path, name: str) -> dict[str, Any]:
        """Write ``<name>_boxes.png``: the input with its boxes drawn and labelled."""
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}_boxes.png"
        draw_boxes(_picture(source), result["boxes"], self.class_names).save(path)
        return {**result, "drawing": str(path)}


def draw_boxes(picture: Image.Image, boxes: list[dict[str, Any]], class_names: list[str]) -> Image.Image:
    """``picture`` with each box outlined in its class's colour and labelled with its score."""
    canvas = picture.convert("RGB").copy()
    paint = ImageDraw.Draw(canvas)
    colors = np.asarray(palette(), dtype=np.int64).reshape(-1, 3)
    for found in boxes:
        index = class_names.index(found["label"]) if found["label"] in class_names else 0
        color = tuple(int(v) for v in colors[1 + index % 254])
        x1, y1, x2, y2 = found["box"]
        paint.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=color, width=2)
        paint.text((x1 + 2, y1 + 1), f"{found['label']} {found['score']:.2f}", fill=color)
    return canvas


def _picture(source: Any) -> Image.Image:
    return source if isinstance(source, Image.Image) else load_rgb(source)
