"""Image-text contrastive training (CLIP / SigLIP losses), evaluated and used as zero-shot classification."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from navit import distributed as D
from navit.config import NaViTConfig, check_choices, option
from navit.batch import PackedBatch
from navit.processor import Processor
from navit.tasks.base import StepLoss, Task
from navit.tasks.classify import evaluate_labels, predict_labels
from navit.two_tower import ImageTextConfig, ImageTextModel, create_image_text_model
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
    Options = ContrastiveOptions
    model_class = ImageTextModel

    def __init__(self, options: Any = None, class_names: list[str] | None = None) -> None:
        super().__init__(options, class_names)
        self.truncated_captions = 0

    def check_data(self, source: Any, spec: str) -> None:
        try:
            source.caption(0)
        except (AttributeError, ValueError) as error:
            raise ValueError(
                f"--task contrastive needs captions, but data {spec!r} has none ({error}); use the "
                "built-in synthetic data or a manifest with a 'caption' column"
            ) from error
        self.check_eval_data(source, spec)

    def check_eval_data(self, source: Any, spec: str) -> None:
        """Evaluation is zero-shot classification: labels, and class names to make prompts of."""
        for name in source.class_names:
            checked_text(name, f"class name of data {spec!r}")

    def targets(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"caption": checked_text(item["caption"], "caption")}

    def eval_targets(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"label": item["label"]}  # evaluated as zero-shot classification

    def build_model(self, config: NaViTConfig, processor: Processor) -> nn.Module:
        options = self.options
        model = create_image_text_model(
            config.replace(num_classes=0), loss=options.loss, text_depth=options.text_depth,
            text_max_len=options.text_max_len,
        )  # fmt: skip
        model.processor = processor
        return model

    def model_from_dict(self, values: dict[str, Any], processor: Processor) -> nn.Module:
        return ImageTextModel(ImageTextConfig.from_dict(values), processor)

    def model_to_dict(self, model: nn.Module) -> dict[str, Any]:
        return model.to_dict()

    def inference_model(self, model: nn.Module) -> nn.Module:
        return ZeroShotClassifier(model.eval(), model.tokenizer(), self.class_names)

    def loss(
        self, forward: Callable[..., Any], model: ImageTextModel, batch: PackedBatch, targets: dict[str, Any],
        info: D.DistInfo, device: torch.device,
    ) -> StepLoss:  # fmt: skip
        """The chunked contrastive loss over the examples of all ranks (every rank gets its value).

        Each rank receives the full gradient for its own embeddings; DDP's averaging over ranks
        is undone by the world-size factor, as for classification.
        """
        tokenizer = model.tokenizer()
        ids, mask = (t.to(device) for t in tokenizer.encode(targets["caption"]))
        self.truncated_captions += tokenizer.last_num_truncated
        img, txt = forward(batch, ids, mask)
        group = torch.distributed.group.WORLD if info.enabled else None
        loss = model.contrastive_loss(img.float(), txt.float(), chunk_size=self.options.chunk_size, group=group)
        examples = int(D.sum_over_ranks(img.shape[0], info, device))
        return StepLoss(loss * info.world_size, loss.detach() * img.shape[0], examples,
                        model.flops(batch, tuple(ids.shape), training=True))  # fmt: skip

    def counts(self) -> dict[str, int]:
        return {"truncated_captions": self.truncated_captions}

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        return evaluate_labels(model, loader, device)

    def predict(
        self, model: nn.Module, batch: PackedBatch, *, topk: int = 5, inputs: list[Any] | None = None
    ) -> list[dict[str, Any]]:
        return predict_labels(model(batch).float().softmax(-1), self.class_names, topk)
