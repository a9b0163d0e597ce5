"""Extension points used from outside the package, as a user's plug-in would: each registers with
one line and nothing under ``navit/`` changes.

1. A source that streams item dicts from a Python generator under a ``toy://`` scheme: it trains,
   and a run stopped mid-epoch resumes with the same losses as one that ran through.
2. A box-regression task with its own head and its own op that carries boxes through crop, flip
   and resize: the box lands on exactly the patches that hold a white rectangle.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from navit import NaViT, NaViTConfig, Processor, load_model
from navit.cli import main
from navit.data.registry import register_source, unregister_source
from navit.data.stream import IndexedSource, Part, Record, holdout_side
from navit.heads import HEADS, Head, HeadConfig
from navit.ops import OPS, ResolutionSampler, register_op, train_chain
from navit.tasks import TASKS, Task, TaskLoss, get_task, register_task

# ------------------------------------------------------------------------------------------------
# 1. A generator source


class ToyStream:
    """``toy://N``: N pictures, dark or light (the label), made by a Python generator. It has no
    length and no random access: each epoch is ``num_parts`` partitions that ranks and loader
    lanes share out, and a part is read by running its generator (from a position: skipping)."""

    class_names = ["dark", "light"]
    provides = frozenset({"image", "label"})

    def __init__(self, count: int, num_parts: int = 4) -> None:
        self.count, self.num_parts = count, num_parts

    @classmethod
    def from_spec(cls, spec: str) -> "ToyStream":
        return cls(int(spec.removeprefix("toy://")))

    def parts(self, epoch: int, rank: int, world_size: int, *, shuffle: bool, seed: int, size: int) -> list[Part]:
        order = list(range(self.num_parts))
        if shuffle:
            random.Random(f"{seed}:{epoch}").shuffle(order)
        mine = order[rank::world_size]
        return [Part(f"toy part {p}", i / len(mine), p) for i, p in enumerate(mine)]

    def _generate(self, part: int):
        for i in range(part, self.count, self.num_parts):
            rng = random.Random(i)
            label = i % 2
            shade = rng.randrange(150, 255) if label else rng.randrange(0, 100)
            size = (16 * rng.randrange(1, 5), 16 * rng.randrange(1, 5))
            yield Record(f"toy-{i}", f"toy #{i}", {"image": Image.new("RGB", size, (shade,) * 3), "label": label})

    def read(self, part: Part, start: int = 0):
        yield from itertools.islice(self._generate(part.spec), start, None)


@pytest.fixture
def toy_scheme():
    register_source("toy", ToyStream.from_spec, scheme=True, form="toy://N")  # the one registry line
    yield
    unregister_source("toy")


def losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def test_a_generator_source_trains_and_resumes_mid_epoch_with_the_same_losses(toy_scheme, tmp_path):
    # 96 pictures in 4 parts over 2 loader lanes; 12 steps of 2 x 64 tokens cross several epochs.
    # No --val-data: a fifth of the stream is held out by a hash of each item's key, as it is read.
    args = ["train", "--data", "toy://96", "--max-steps", "12", "--save-every", "3",
            "--log-every", "1", "--workers", "2", "--seq-len", "64", "--num-seqs", "2", "--max-tokens", "16",
            "--buffer-size", "24", "--budgets", "--out", str(tmp_path), "--model-args", "depth=1", "embed_dim=32",
            "num_heads=2"]  # fmt: skip
    assert main([*args, "--name", "through"]) == 0
    reference = losses(tmp_path / "through")
    assert sorted(reference) == list(range(1, 13))
    held_out = json.loads((tmp_path / "through" / "eval.json").read_text())["native"]["examples"]
    assert held_out == sum(holdout_side(f"toy-{i}", 0.2, 0) for i in range(96)) > 0
    # The same run stopped after its checkpoint at step 6 (mid-epoch: the buffer holds examples).
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "through", stopped)
    checkpoints = stopped / "checkpoints"
    for later in [p for p in checkpoints.iterdir() if p.name.startswith("step_") and p.name != "step_00000006"]:
        shutil.rmtree(later)
    (checkpoints / "latest").write_text("step_00000006")
    meta = json.loads((checkpoints / "step_00000006" / "meta.json").read_text())
    assert any(state["buffer"] for state in meta["loader"]), "the stop falls mid-epoch, examples waiting"
    assert main(["train", "--resume", str(stopped)]) == 0
    assert losses(stopped) == reference


# ------------------------------------------------------------------------------------------------
# 2. A box-regression task: its own head, its own op, its own source


class Rectangles(IndexedSource):
    """``rects:N``: dark pictures of any aspect ratio with one white rectangle at ``toy_box``
    (x1, y1, x2, y2 in the picture's pixels)."""

    class_names = ["rectangle"]
    provides = frozenset({"image", "label", "toy_box"})

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def item(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng(index)
        width, height = int(rng.integers(48, 200)), int(rng.integers(48, 200))
        x1, y1 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x2, y2 = int(rng.integers(x1 + 12, width + 1)), int(rng.integers(y1 + 12, height + 1))
        image = Image.new("RGB", (width, height))
        ImageDraw.Draw(image).rectangle((x1, y1, x2 - 1, y2 - 1), fill=(255, 255, 255))
        return {"image": image, "label": 0, "toy_box": np.array([x1, y1, x2, y2], float)}


class BoxHead(Head, torch.nn.Linear):
    """Four numbers in [0, 1] per example from its pooled vector: the box over the example's canvas."""

    name, Config, pooled = "toy-box", HeadConfig, True

    def __init__(self, config: HeadConfig, encoder: NaViTConfig) -> None:
        torch.nn.Linear.__init__(self, encoder.embed_dim, 4)
        self.config = config

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return super().forward(pooled).sigmoid()

    def flops(self, batch) -> int:
        return 2 * batch.num_examples * self.in_features * 4


@dataclass(frozen=True)
class CarryToyBox:
    """The task's op: ``toy_box`` moved wherever crop, flip and resize took the pixels (the
    geometry they recorded), as a share of the example's canvas."""

    def __call__(self, item: dict[str, Any], rng) -> dict[str, Any]:
        width, height = item["canvas"]
        box = item["geometry"].boxes(item["toy_box"])[0].clip(0, [width, height, width, height])
        return {**item, "toy_target": box / [width, height, width, height]}


@dataclass
class BoxOptions:
    pass


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    wide = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    tall = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = wide * tall
    area = lambda x: (x[:, 2] - x[:, 0]).clamp(min=0) * (x[:, 3] - x[:, 1]).clamp(min=0)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


class BoxTask(Task):
    name, Options, model_class, metric = "toy-box", BoxOptions, NaViT, "box_iou"
    heads = ("toy-box",)
    needs = {"toy_box": "boxes"}

    def ops(self, train: bool) -> list[Any]:
        return [CarryToyBox()]

    def targets(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"box": torch.tensor(item["toy_target"], dtype=torch.float32)}

    def build_model(self, config: NaViTConfig, processor) -> torch.nn.Module:
        return NaViT(config, processor, head={"name": "toy-box", "num_classes": 4})

    def loss(self, forward, model, batch, targets) -> TaskLoss:
        boxes = targets["box"]
        return TaskLoss((forward(batch).float() - boxes).abs().sum(), boxes.numel())

    @torch.no_grad()
    def evaluate(self, model, loader, device) -> dict[str, float]:
        model.eval()
        scores, tokens = [], 0
        for item in loader:
            item = item.to(device)
            scores.append(iou(model(item.batch).float(), item.targets["box"]))
            tokens += item.batch.num_real_tokens
        scores = torch.cat(scores)
        return {"box_iou": float(scores.mean()), "tokens_per_example": tokens / len(scores), "examples": len(scores)}

    @torch.no_grad()
    def predict(self, model, batch, *, topk=5, inputs=None):
        return [{"box": row} for row in model(batch).float().tolist()]


@pytest.fixture
def box_task():
    register_source("rects", lambda spec: Rectangles(int(spec.split(":")[1])), scheme=True, form="rects:N")
    HEADS["toy-box"] = BoxHead
    register_op("carry-toy-box", CarryToyBox)
    register_task(BoxTask)
    yield
    unregister_source("rects")
    for registry in (HEADS, OPS, TASKS):
        registry.pop("toy-box", None), registry.pop("carry-toy-box", None)


def test_a_task_op_carries_boxes_onto_exactly_the_patches_that_hold_them(box_task):
    source, p = Rectangles(24), 8
    chain = train_chain(Processor(patch_size=p, max_tokens=300, resample="box"), crop_min=0.5, flip=True,
                        resolution=ResolutionSampler(res_mode="side", res_min=48, res_max=160),
                        extra=tuple(get_task("toy-box").ops(train=True)))  # fmt: skip
    mirrored = set()
    for index in range(len(source)):
        item = chain(source.item(index), np.random.default_rng(index))
        example, (width, height) = item["example"], item["canvas"]
        mirrored.add(item["geometry"].sx < 0)
        box = item["toy_target"] * [width, height, width, height]  # in the example's pixels
        rows, cols = example.grid
        edges_x, edges_y = np.arange(cols + 1) * p, np.arange(rows + 1) * p
        wide = np.clip(np.minimum(edges_x[1:], box[2]) - np.maximum(edges_x[:-1], box[0]), 0, None) / p
        tall = np.clip(np.minimum(edges_y[1:], box[3]) - np.maximum(edges_y[:-1], box[1]), 0, None) / p
        brightness = ((example.patches.view(rows, cols, -1, 3).mean((-1, -2)) + 1) / 2).numpy()
        assert np.abs(tall[:, None] * wide[None, :] - brightness).max() < 0.15, f"item {index}: the box left its pixels"
    assert mirrored == {True, False}, "flipped and unflipped items were both checked"


def test_the_box_task_trains_saves_and_loads_with_its_own_head(box_task, tmp_path):
    args = ["train", "--task", "toy-box", "--data", "rects:96", "--val-data", "rects:16", "--epochs", "6",
            "--log-every", "4", "--budgets", "16", "--seq-len", "128", "--num-seqs", "2", "--max-tokens", "64",
            "--workers", "0", "--lr", "3e-3", "--warmup-steps", "5", "--out", str(tmp_path), "--name", "boxes",
            "--model-args", "depth=2", "embed_dim=64", "num_heads=4"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "boxes" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], "the box head learns"
    summary = json.loads((tmp_path / "boxes" / "summary.json").read_text())
    assert summary["val_box_iou"] > 0.3
    model = load_model(tmp_path / "boxes")
    assert isinstance(model.head, BoxHead) and model.head_spec()["name"] == "toy-box"
    boxes = model(model.processor([Image.new("RGB", (64, 32))]))
    assert boxes.shape == (1, 4) and bool(((boxes >= 0) & (boxes <= 1)).all())
