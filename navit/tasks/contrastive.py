"""Image-text contrastive training (CLIP / SigLIP losses), evaluated and used as zero-shot classification."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from navit import distributed as D
from navit.config import NaViTConfig, check_choices, option
from navit.heads import TextTowerConfig, TextTowerHead
from navit.batch import PackedBatch
from navit.processor import Processor
from navit.tasks.base import Task, TaskLoss
from navit.tasks.classify import evaluate_labels, predict_labels
from navit.two_tower import ImageTextModel
from navit.zeroshot import ZeroShotClassifier


@dataclass
class ContrastiveOptions:
    loss: str = option("softmax", "contrastive loss: softmax (CLIP) or sigmoid (SigLIP)", choices=("softmax", "sigmoid"))
    text_depth: int = option(2, "text transformer depth (its width is the image tower's)")
    text_max_len: int = option(64, "bytes per caption; longer captions are truncated (and counted)")
    chunk_size: int | None = option(None, "texts per similarity block (bounds memory); default: all at once")

    def __post_init__(self) -> None:
        check_choices(self, "task option ")
        for name in ("text_depth", "text_max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def checked_text(text: str, what: str) -> str:
    """``text``, or a clear error if it cannot be encoded (e.g. a lone surrogate from a broken file name)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} {text[:40]!r} is not valid Unicode text ({error.reason} at character "
                         f"{error.start})") from None  # fmt: skip
    return text


class Contrastive(Task):
    name = "contrastive"
    needs = {"caption": "captions"}
    data_hint = "use the built-in synthetic data or a manifest with a 'caption' column"
    Options = ContrastiveOptions
    model_class = ImageTextModel
    heads = (TextTowerHead.name,)

    def __init__(self, options: Any = None, class_names: list[str] | None = None) -> None:
        super().__init__(options, class_names)
        self.truncated_captions = 0

    def check_data(self, source: Any, spec: str) -> None:
        super().check_data(source, spec)
        self.check_eval_data(source, spec)

    def check_eval_data(self, source: Any, spec: str) -> None:
        """Evaluation is zero-shot classification: labels, and class names to make prompts of."""
        if "label" not in source.provides:
            raise ValueError(f"--task contrastive is evaluated as zero-shot classification, but data {spec!r} has "
                             "no labels: give validation data with labels (--val-data)")  # fmt: skip
        for name in source.class_names:
            checked_text(name, f"class name of data {spec!r}")

    def targets(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"caption": checked_text(item["caption"], "caption")}

    def eval_targets(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"label": item["label"]}  # evaluated as zero-shot classification

    def build_model(self, config: NaViTConfig, processor: Processor) -> nn.Module:
        options = self.options
        head = TextTowerConfig.for_encoder(config, loss=options.loss, text_depth=options.text_depth,
                                           text_max_len=options.text_max_len)  # fmt: skip
        return ImageTextModel(config.replace(num_classes=0), processor, head)

    def inference_model(self, model: nn.Module) -> nn.Module:
        return ZeroShotClassifier(model.eval(), model.tokenizer(), self.class_names)

    def loss(
        self, forward: Callable[..., Any], model: ImageTextModel, batch: PackedBatch, targets: dict[str, Any]
    ) -> TaskLoss:
        """The chunked contrastive loss over the examples of all ranks, as this rank's share.

        The ring loss ``L`` (:mod:`navit.contrastive`) is already the mean over every rank's
        examples, the same value on every rank, and each rank's autograd gives the full gradient
        for its own embeddings. The trainer backpropagates ``loss_sum * world_size / total``
        (``total``: the examples of all ranks), so ``loss_sum`` carries the gradient of
        ``L * total``, making that ``L * world_size``, which DDP's averaging over ranks turns back
        into the exact gradient of ``L``; its value is ``L * n`` (``n``: this rank's examples), so
        that the logged loss (sums over ranks divided by ``total``) is ``L``. The example count is
        the one collective here, which the ring needs anyway.
        """
        tokenizer = model.tokenizer()
        ids, mask = (t.to(batch.patches.device) for t in tokenizer.encode(targets["caption"]))
        self.truncated_captions += tokenizer.last_num_truncated
        self._text_shape = (id(batch), tuple(ids.shape))
        img, txt = forward(batch, ids, mask)
        dist = torch.distributed
        ranks = D.DistInfo(world_size=dist.get_world_size() if dist.is_initialized() else 1)
        group = dist.group.WORLD if ranks.enabled else None
        loss = model.contrastive_loss(img.float(), txt.float(), chunk_size=self.options.chunk_size, group=group)
        count = img.shape[0]
        total = int(D.sum_over_ranks(count, ranks, img.device))
        return TaskLoss(loss * total + (loss * (count - total)).detach(), count)

    def flops(self, model: ImageTextModel, batch: PackedBatch, targets: dict[str, Any]) -> int:
        """Both towers' training FLOPs; the text shape is that of the step's :meth:`loss` on ``batch``."""
        step, text_shape = getattr(self, "_text_shape", (None, None))
        assert step == id(batch), "flops is asked after loss, of the same batch"
        return model.flops(batch, text_shape, training=True)

    def counts(self) -> dict[str, int]:
        return {"truncated_captions": self.truncated_captions}

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        return evaluate_labels(model, loader, device)

    def predict(
        self, model: nn.Module, batch: PackedBatch, *, topk: int = 5, inputs: list[Any] | None = None
    ) -> list[dict[str, Any]]:
        return predict_labels(model(batch).float().softmax(-1), self.class_names, topk)
