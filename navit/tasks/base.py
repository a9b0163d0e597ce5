"""What every task provides: its head, targets, loss, metric and prediction output.

A task turns data items into targets (in loader workers), builds the model with its head, computes
the loss of a step (over all ranks under ``torchrun``), evaluates, and formats predictions. The
training loop, the loader and the CLI only talk to this interface, so adding a task is a module
of its own plus one line in :data:`navit.tasks.TASKS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from navit import distributed as D
from navit.config import NaViTConfig, numbers, reject_unknown_fields
from navit.batch import PackedBatch
from navit.processor import Processor


@dataclass
class StepLoss:
    """One step's loss: what to backpropagate, the local sum (for logging), the global count and
    the FLOPs of this rank's forward and backward (the model's ``flops(..., training=True)``)."""

    loss: torch.Tensor  # normalised so that DDP's gradient averaging gives the global mean
    loss_sum: torch.Tensor  # detached sum over this rank's examples
    examples: int  # examples in the step on all ranks
    flops: int  # training FLOPs on this rank


class Task:
    """Base class of the tasks. Subclasses set ``name`` and ``Options`` (a dataclass of the
    task's own settings, the ``task`` section of a training config) and implement the methods
    that raise ``NotImplementedError``."""

    name: ClassVar[str]
    Options: ClassVar[type]
    #: The class of the models :meth:`build_model` returns (how ``save_model`` tells a model's task).
    model_class: ClassVar[type[nn.Module]]
    #: Item keys holding label images aligned with the image (segmentation masks): they go
    #: through the same crop, flip and grid and become per-token fields of the example.
    dense_keys: ClassVar[tuple[str, ...]] = ()
    #: The metric that ``evaluate`` reports and reports are ranked by.
    metric: ClassVar[str] = "accuracy"
    #: Whether predictions are files (masks) that ``navit predict`` writes with :meth:`save_prediction`.
    writes_files: ClassVar[bool] = False

    def __init__(self, options: Any = None, class_names: list[str] | None = None) -> None:
        self.options = options if options is not None else self.Options()
        self.class_names = list(class_names or [])

    @classmethod
    def options_from_dict(cls, values: dict[str, Any]) -> Any:
        reject_unknown_fields(cls.Options, values, f"option(s) of task {cls.name!r}", ValueError)
        return cls.Options(**numbers(cls.Options, values))

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    # -- data ----------------------------------------------------------------------------------
    def check_data(self, source: Any, spec: str) -> None:
        """Raise a clear error now if ``source`` lacks what training needs."""

    def check_eval_data(self, source: Any, spec: str) -> None:
        """Raise a clear error now if ``source`` lacks what evaluation needs (by default, what
        training needs)."""
        self.check_data(source, spec)

    def targets(self, item: dict[str, Any]) -> dict[str, Any]:
        """The task's training targets of one data item (runs in loader workers; plain values)."""
        raise NotImplementedError

    def eval_targets(self, item: dict[str, Any]) -> dict[str, Any]:
        """The targets ``evaluate`` reads (by default the training targets)."""
        return self.targets(item)

    # -- model ---------------------------------------------------------------------------------
    def build_model(self, config: NaViTConfig, processor: Processor) -> nn.Module:
        """A fresh model with this task's head."""
        raise NotImplementedError

    def model_from_dict(self, values: dict[str, Any], processor: Processor) -> nn.Module:
        """Rebuild a model from what ``model_to_dict`` wrote into a checkpoint."""
        raise NotImplementedError

    def model_to_dict(self, model: nn.Module) -> dict[str, Any]:
        return model.config.to_dict()

    def inference_model(self, model: nn.Module) -> nn.Module:
        """What evaluation and prediction run: by default the model itself."""
        return model

    # -- training ------------------------------------------------------------------------------
    def loss(
        self, forward: Callable[..., Any], model: nn.Module, batch: PackedBatch, targets: dict[str, Any],
        info: D.DistInfo, device: torch.device,
    ) -> StepLoss:  # fmt: skip
        """The step's loss; ``forward`` is the (possibly wrapped or compiled) model to call."""
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        """What the task counted in this process's training steps, for the run's summary (e.g.
        truncated captions); summed over ranks there."""
        return {}

    # -- evaluation and prediction -------------------------------------------------------------
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """``{metric: ..., "tokens_per_example": ..., "examples": ...}`` over ``loader``."""
        raise NotImplementedError

    def predict(
        self, model: nn.Module, batch: PackedBatch, *, topk: int = 5, inputs: list[Any] | None = None
    ) -> list[dict[str, Any]]:
        """One output per example of ``batch``, in input order (``inputs``: what each example was
        made from, a path or an image, for tasks whose outputs live at the input's own size)."""
        raise NotImplementedError

    def save_prediction(self, result: dict[str, Any], source: Any, out: Any, name: str) -> dict[str, Any]:
        """Write what a prediction holds beyond JSON into folder ``out`` (files named after
        ``name``) and return it JSON-able; only for tasks that set ``writes_files``."""
        return result
