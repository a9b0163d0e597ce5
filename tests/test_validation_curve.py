"""The validation loss during training: passes on a fixed sample, at the steps the options give,
in the metric records and the loss curves."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import TINY_TRAIN
from navit.cli import main
from navit.curves import validation_points
from navit.validation import ValidationLoss


class Counting(list):
    """A loader (a list of batches) that counts the passes made over it."""

    reads = 0

    def __iter__(self):
        self.reads += 1
        return super().__iter__()


class Item:
    def __init__(self, x, y):
        self.batch, self.targets = x, {"label": y}

    def to(self, device):
        return self


class MeanSquare:
    """A task whose loss is the sum of squared outputs minus labels, one term an example."""

    def loss(self, forward, model, batch, targets):
        out = forward(batch).squeeze(-1) - targets["label"]

        class Result:
            loss_sum, count = (out**2).sum(), out.numel()

        return Result


def test_passes_come_at_each_twentieth_or_every_n_steps_and_none_when_off():
    twentieths = ValidationLoss([], batches=2)
    assert [s for s in range(1, 101) if twentieths.due(s, s / 100)] == list(range(5, 101, 5))
    every = ValidationLoss([], batches=2, every=30)
    assert [s for s in range(10, 101, 10) if every.due(s, s / 100)] == [30, 60, 90]
    off = ValidationLoss([], batches=0)
    assert off(None, None, None, 50, 0.5, torch.device("cpu")) == {} and not off.due(100, 1.0)
    resumed = ValidationLoss([], batches=2, every=30)
    resumed.load_state_dict(every.state_dict())
    assert not resumed.due(90, 0.9) and resumed.due(120, 1.0)  # a resumed run measures where it left off
    with pytest.raises(ValueError, match="val_batches"):
        ValidationLoss([], batches=-1)


def test_the_loss_is_the_mean_over_the_same_sample_in_eval_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Dropout(0.9)).train()
    xs, ys = [torch.randn(4, 3) for _ in range(3)], [torch.randn(4) for _ in range(3)]
    loader = Counting(Item(x, y) for x, y in zip(xs, ys))
    passes = ValidationLoss(loader, batches=2, every=10)
    assert passes(model, model, MeanSquare(), 5, 0.05, torch.device("cpu")) == {"val_loss": None}
    first = passes(model, model, MeanSquare(), 10, 0.1, torch.device("cpu"))["val_loss"]
    with torch.no_grad():  # two batches only, dropout off
        expected = float(torch.cat([(model[0](x).squeeze(-1) - y) ** 2 for x, y in zip(xs[:2], ys[:2])]).mean())
    assert first == pytest.approx(expected, abs=1e-4) and model.training
    assert passes(model, model, MeanSquare(), 20, 0.2, torch.device("cpu"))["val_loss"] == first
    assert loader.reads == 1  # the sample is read once and kept
    # Validation data without the training targets (every item skipped by the loader): no figure.
    empty = ValidationLoss([], batches=2, every=10)
    assert empty(model, model, MeanSquare(), 10, 0.1, torch.device("cpu")) == {"val_loss": None}


def test_a_training_run_records_validation_loss_and_draws_it(tmp_path):
    data = tmp_path / "shapes"
    assert main(["data", "synth", "--out", str(data), "--num-images", "60"]) == 0
    assert main(["train", "--data", str(data), "--out", str(tmp_path), "--name", "run", *TINY_TRAIN, "--threads", "1",
                 "--max-steps", "12", "--log-every", "2", "--val-every", "4", "--val-batches", "1"]) == 0  # fmt: skip
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured = {r["step"]: r["val_loss"] for r in records if r["val_loss"] is not None}
    assert sorted(measured) == [4, 8, 12] and all(0 < v < 10 for v in measured.values())
    with open(run / "metrics.csv", newline="") as f:
        assert [row["val_loss"] for row in csv.DictReader(f)].count("") == 3  # steps 2, 6 and 10
    assert validation_points(records) == {"val_loss": sorted(measured.items())}
    assert (run / "loss_curves.png").stat().st_size > 10_000
