"""The validation loss during training: the task's loss over a fixed sample of the validation
data (``val_batches`` packed batches, read once and kept), every ``val_every`` steps or, by
default, at each twentieth of the run; it joins the metric record as ``val_loss`` and the loss
curves (:mod:`navit.curves`) draw it beside the training loss, so overfitting, or a run that does
not learn, shows at a glance. Every rank runs the same pass at the same step (FSDP needs all
ranks in each forward); the sample is built by :func:`navit.train_data.periodic_validation`."""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

POINTS = 20  # passes in a run when ``val_every`` is 0


class ValidationLoss:
    """``val_loss`` for the metric records: ``batches`` of ``loader`` (0: no pass, no key), taken
    once and reused, so every point is measured on the same examples."""

    def __init__(self, loader: Iterable[Any], batches: int, every: int = 0, bf16: bool = False) -> None:
        if batches < 0 or every < 0:
            raise ValueError(f"val_batches and val_every must be >= 0, got {batches} and {every}")
        self.loader, self.batches, self.every, self.bf16 = loader, batches, every, bf16
        self.sample: list[Any] | None = None
        self.point = 0  # the last point measured: steps // every, or twentieths of the run

    def state_dict(self) -> dict[str, int]:  # checkpointed, so a resumed run measures at the same steps
        return {"point": self.point}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.point = int(state["point"])

    def due(self, step: int, fraction_done: float) -> bool:
        """Whether a pass is due at ``step``: a new multiple of ``every`` steps, or a new
        twentieth of the run (``every`` 0), since the last pass."""
        if not self.batches:
            return False
        point = step // self.every if self.every else math.floor(POINTS * fraction_done + 1e-9)
        if point <= self.point:
            return False
        self.point = point
        return True

    def __call__(self, forward: Callable[..., Any], model: nn.Module, task: Any, step: int, fraction_done: float,
                 device: torch.device) -> dict[str, float | None]:  # fmt: skip
        """``{"val_loss": ...}`` (None between passes, so every record has the key), or ``{}``
        when passes are off."""
        if not self.batches:
            return {}
        value = self.loss(forward, model, task, device) if self.due(step, fraction_done) else None
        return {"val_loss": None if value is None else round(value, 5)}

    def taken(self) -> list[Any]:
        """The sample: the first ``batches`` batches of the loader, read on the first pass."""
        if self.sample is None:
            stream = iter(self.loader)
            try:
                self.sample = list(itertools.islice(stream, self.batches))
            finally:  # a loader's workers end now, not when the generator is collected
                getattr(stream, "close", lambda: None)()
        return self.sample

    @torch.no_grad()
    def loss(self, forward: Callable[..., Any], model: nn.Module, task: Any, device: torch.device) -> float | None:
        """The task's mean loss over the sample, the model in eval mode (restored after); None
        when no validation example has the training targets (captions of zero-shot labels)."""
        training = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            for item in self.taken():
                item = item.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    result = task.loss(forward, model, item.batch, item.targets)
                total += float(result.loss_sum)
                count += result.count
        finally:
            model.train(training)
        return total / count if count else None
