"""Tasks are plug-ins: a new one is its own module plus a registry line, and trains end to end."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN

from navit.cli import main
from navit.config import NaViTConfig, option
from navit.inference import load_checkpoint
from navit.model import NaViT
from navit.tasks import TASKS, StepLoss, Task, get_task
from navit.tasks.classify import global_mean


@dataclass
class AspectOptions:
    scale: float = option(1.0, "multiplier of the log aspect ratio to predict")


class Aspect(Task):
    """A toy regression task defined outside the package: predict the log aspect ratio."""

    name = "aspect"
    Options = AspectOptions
    metric = "within_half"

    def targets(self, item):
        return {"log_aspect": self.options.scale * math.log(item["image"].width / item["image"].height)}

    def build_model(self, config, processor):
        return NaViT(config.replace(num_classes=1), processor)

    def model_from_dict(self, values, processor):
        return NaViT(NaViTConfig.from_dict(values), processor)

    def loss(self, forward, model, batch, targets, info, device):
        error = (forward(batch)[:, 0].float() - targets["log_aspect"].float()) ** 2
        loss, examples = global_mean(error.sum(), error.numel(), info, device)
        return StepLoss(loss, error.sum().detach(), examples, model.flops(batch, training=True))

    @torch.no_grad()
    def evaluate(self, model, loader, device):
        model.eval()
        hits = examples = tokens = 0
        for item in loader:
            error = (model(item.batch)[:, 0] - item.targets["log_aspect"]).abs()
            hits += int((error < 0.5).sum())
            examples += error.numel()
            tokens += item.batch.num_real_tokens
        return {"within_half": hits / examples, "tokens_per_example": tokens / examples, "examples": examples}

    @torch.no_grad()
    def predict(self, model, batch, *, topk=5, inputs=None):
        return [{"log_aspect": round(float(v), 4)} for v in model(batch)[:, 0]]


def test_a_new_task_trains_evaluates_saves_and_predicts_through_the_cli(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(TASKS, "aspect", Aspect)  # the one registry line
    assert main(["train", "--task", "aspect", "--scale", "2", "--data", "synthetic:40", "--out", str(tmp_path),
                 "--name", "a", "--max-steps", "3", *TINY_TRAIN]) == 0  # fmt: skip
    run = Path(tmp_path) / "a"
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["val_within_half"] <= 1 and (run / "within_half_vs_tokens.png").exists()
    model, task, meta = load_checkpoint(run)
    assert isinstance(task, Aspect) and task.options.scale == 2.0 and model.head.out_features == 1
    image = tmp_path / "x.png"
    from navit.synthetic.shapes import SyntheticShapes

    SyntheticShapes(1).load(0).save(image)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), "--json", str(image)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row) == {"path", "tokens", "error", "log_aspect"} and math.isfinite(row["log_aspect"])


def test_task_options_are_checked_by_their_task():
    with pytest.raises(ValueError, match="unknown task 'detect'"):
        get_task("detect")
    with pytest.raises(ValueError, match=r"unknown option\(s\) of task 'classify' \['text_depth'\]"):
        get_task("classify", {"text_depth": 2})
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        get_task("classify", {"label_smoothing": 1.5})
    assert get_task("contrastive", {"loss": "sigmoid"}, ["a"]).options.loss == "sigmoid"
