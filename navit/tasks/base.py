"""What every task provides: its head, targets, loss, metric and prediction output.

A task turns data items into targets (in loader workers), builds the model with its head, computes
the loss of this process's part of a step (:class:`TaskLoss`; the trainer normalises it over
ranks), evaluates, and formats predictions. The
training loop, the loader and the CLI only talk to this interface, so adding a task is a module
of its own plus one line in :data:`navit.tasks.TASKS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from navit.config import NaViTConfig, numbers, reject_unknown_fields
from navit.batch import PackedBatch
from navit.processor import Processor


@dataclass
class TaskLoss:
    """This process's part of a step's loss. The trainer sums ``count`` over ranks (``total``) and
    backpropagates ``loss_sum * world_size / total``: with DDP averaging gradients over ranks,
    that is the gradient of the mean over every term of the step; the loss it logs is the sum of
    ``loss_sum`` over ranks and steps divided by that of ``count``."""

    loss_sum: torch.Tensor  # scalar with gradient: the sum of this rank's terms
    count: int  # this rank's number of terms (examples; labelled pixels for segmentation)
    logs: dict[str, float] = field(default_factory=dict)  # more values to log, averaged over steps and ranks


class Task:
    """Base class of the tasks. Subclasses set ``name`` and ``Options`` (a dataclass of the
    task's own settings, the ``task`` section of a training config) and implement the methods
    that raise ``NotImplementedError``."""

    name: ClassVar[str]
    Options: ClassVar[type]
    #: The class of the models :meth:`build_model` returns (how ``save_model`` tells a model's
    #: task). It provides ``to_dict()``, ``head_spec()``, ``from_dict(values, processor, head)``
    #: and ``num_classes`` (None for a model that takes any class names), as :class:`navit.NaViT`.
    model_class: ClassVar[type[nn.Module]]
    #: The heads (:mod:`navit.heads`) this task's models may carry; None: any.
    heads: ClassVar[tuple[str, ...] | None] = None
    #: Item keys the task trains on (checked against a source's ``provides``), with the word
    #: for each in messages, and what data to give instead.
    needs: ClassVar[dict[str, str]] = {"label": "labels"}
    data_hint: ClassVar[str] = "use a folder with one sub-folder per class, a manifest with a label column or shards"
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
        """Raise a clear error now if ``source``'s items lack a key that training needs."""
        missing = [word for key, word in self.needs.items() if key not in source.provides]
        if missing:
            raise ValueError(f"--task {self.name} needs {' and '.join(missing)}, but data {spec!r} has none: "
                             f"{self.data_hint}")  # fmt: skip
        if "label" in self.needs and not source.class_names:
            raise ValueError(f"--task {self.name} needs class names, but data {spec!r} lists none: give --classes FILE "
                             "(one name per line), or a classes.txt or index.json beside the shards")  # fmt: skip

    def check_eval_data(self, source: Any, spec: str) -> None:
        """Raise a clear error now if ``source`` lacks what evaluation needs (by default, what
        training needs)."""
        self.check_data(source, spec)

    def ops(self, train: bool) -> list[Any]:
        """The task's own ops over item dicts (:mod:`navit.ops`), run after the built-in ones
        (crop, flip, resolution, tokenize, dropping), in training or evaluation."""
        return []

    def targets(self, item: dict[str, Any]) -> dict[str, Any]:
        """The task's training targets of one transformed item (runs in loader workers; plain values)."""
        raise NotImplementedError

    def eval_targets(self, item: dict[str, Any]) -> dict[str, Any]:
        """The targets ``evaluate`` reads (by default the training targets)."""
        return self.targets(item)

    # -- model ---------------------------------------------------------------------------------
    def build_model(self, config: NaViTConfig, processor: Processor) -> nn.Module:
        """A fresh model with this task's head: by default ``model_class`` over the task's classes."""
        return self.model_class(config.replace(num_classes=len(self.class_names)), processor)

    def model_from_dict(self, values: dict[str, Any], processor: Processor, head: dict[str, Any] | None = None) -> nn.Module:
        """Rebuild a model from what :meth:`model_to_dict` and :meth:`head_to_dict` wrote into a
        checkpoint (``head`` None: the head the model class builds from ``values``)."""
        if head is not None and self.heads is not None and head.get("name") not in self.heads:
            raise ValueError(f"task {self.name!r} takes a model with a {' or '.join(map(repr, self.heads))} head, "
                             f"not {head.get('name')!r}; pass the task the model belongs to")  # fmt: skip
        return self.model_class.from_dict(values, processor, head)

    def model_to_dict(self, model: nn.Module) -> dict[str, Any]:
        """The model's config (for a NaViT, its encoder's), as a JSON-able dict."""
        return model.to_dict()

    def head_to_dict(self, model: nn.Module) -> dict[str, Any] | None:
        """The model's head as ``{"name": ..., **config}`` (see :mod:`navit.heads`), None for none."""
        return model.head_spec()

    def inference_model(self, model: nn.Module) -> nn.Module:
        """What evaluation and prediction run: by default the model itself."""
        return model

    # -- training ------------------------------------------------------------------------------
    def loss(self, forward: Callable[..., Any], model: nn.Module, batch: PackedBatch, targets: dict[str, Any]) -> TaskLoss:
        """This process's loss on ``batch``; ``forward`` is the (possibly wrapped or compiled)
        model to call, ``model`` the bare one. No collective: the trainer sums over ranks."""
        raise NotImplementedError

    def flops(self, model: nn.Module, batch: PackedBatch, targets: dict[str, Any]) -> int:
        """FLOPs of the training step (forward and backward) on ``batch``, as the model counts them."""
        return model.flops(batch, training=True)

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
