"""Classification: one label per example, a linear head on the pooled vector, top-k labels out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from navit.config import check_choices, option
from navit.model import NaViT
from navit.batch import PackedBatch
from navit.tasks.base import Task, TaskLoss


@dataclass
class ClassifyOptions:
    loss: str = option("softmax", "classification loss: softmax cross entropy, or one sigmoid per class",
                       choices=("softmax", "sigmoid"))  # fmt: skip
    label_smoothing: float = option(0.1, "label smoothing of the classification targets, in [0, 1)")

    def __post_init__(self) -> None:
        check_choices(self, "task option ")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str, smoothing: float) -> torch.Tensor:
    """[N] loss of each example: per example, not per token, so big images weigh no more."""
    if loss == "softmax":
        return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing, reduction="none")
    classes = logits.shape[-1]
    target = F.one_hot(labels, classes).float() * (1 - smoothing) + smoothing / classes
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").sum(-1)


@torch.no_grad()
def evaluate_labels(model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
    """Accuracy of ``model``'s arg-max over ``loader``'s batches (targets ``"label"``)."""
    model.eval()
    correct = examples = tokens = 0
    for item in loader:
        item = item.to(device)
        labels = item.targets["label"]
        correct += int((model(item.batch).argmax(-1) == labels).sum())
        examples += labels.numel()
        tokens += item.batch.num_real_tokens
    return {"accuracy": correct / max(1, examples), "tokens_per_example": tokens / max(1, examples),
            "examples": examples}  # fmt: skip


@torch.no_grad()
def predict_labels(scores: torch.Tensor, class_names: list[str], topk: int) -> list[dict[str, Any]]:
    """``{"labels": [{"label", "score"}, ...]}`` per row of ``scores``, best first."""
    values, indices = scores.float().cpu().topk(min(topk, scores.shape[-1]), dim=-1)
    return [
        {"labels": [{"label": class_names[j], "score": round(float(p), 6)} for p, j in zip(row_p, row_j)]}
        for row_p, row_j in zip(values.tolist(), indices.tolist())
    ]


class Classification(Task):
    name = "classify"
    Options = ClassifyOptions
    model_class = NaViT
    heads = ("classifier",)

    def targets(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"label": item["label"]}

    def loss(self, forward: Callable[..., Any], model: nn.Module, batch: PackedBatch, targets: dict[str, Any]) -> TaskLoss:
        labels = targets["label"]
        losses = per_example_loss(forward(batch), labels, self.options.loss, self.options.label_smoothing)
        return TaskLoss(losses.sum(), labels.numel())

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        return evaluate_labels(model, loader, device)

    def predict(
        self, model: nn.Module, batch: PackedBatch, *, topk: int = 5, inputs: list[Any] | None = None
    ) -> list[dict[str, Any]]:
        logits = model(batch).float()
        scores = logits.softmax(-1) if self.options.loss == "softmax" else logits.sigmoid()
        return predict_labels(scores, self.class_names, topk)
