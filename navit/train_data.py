"""The data side of training: sources, the training loader and validation, from the data options.

This module is the one boundary between the trainer and the data pipeline: the trainer opens the
sources, asks for a loader and iterates it with :func:`endless`, and validates with
:func:`validate`; everything about sources, transforms, token dropping and packing stays behind
these functions. The ``data``, ``packing`` and ``eval`` sections of the training config are
declared here, next to the code that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from navit import distributed as D
from navit.config import check_choices, check_numbers, option
from navit.data.labels import with_class_names
from navit.data.registry import open_source
from navit.data.loader import LoaderBatch, PackedLoader
from navit.data.stream import IndexedSource, Subset, epoch_order, first_items, num_items, split_holdout
from navit.evaluate import evaluate_budgets, write_budget_report
from navit.ops import RES_DISTS, RES_MODES, ResolutionSampler, eval_chain, train_chain
from navit.ops.geometry import picture_size
from navit.packing import PackingConfig
from navit.processor import Processor
from navit.token_drop import BetaRate, ConstantRate, DropSchedule, ResolutionRate, TokenDropper, UniformRate
from navit.validation import ValidationLoss

DROP_KINDS = ("none", "constant", "uniform", "beta", "resolution")
def _at_least(section: Any, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(section, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(section, name)}")


@dataclass
class DataSection:
    train: str = option("synthetic:5000", "training data: a built-in set, a folder, a manifest or shards (see docs/data.md)")
    val: str | None = option(None, "validation data (same forms); default: a share of the training data, chosen by "
                             "a hash of each item's key")  # fmt: skip
    val_fraction: float = option(0.2, "share of the training data held out for validation when --val-data is not given")
    split_seed: int = option(0, "seed of that held-out split (kept apart from --seed, so runs of several seeds "
                             "are measured on the same validation images)")  # fmt: skip
    recipe: str | None = option(None, "options for a kind of data, set before the options given with it (which "
                                "win): small-video (a few hundred clips; see docs/video.md)")  # fmt: skip
    classes: str | None = option(None, "a file of class names, one per line, in label order (for shards without "
                                 "an index.json or classes.txt; other data: the classes to use, matched by name)")  # fmt: skip
    num_examples: int | None = option(None, "examples in one epoch of a stream that does not say (shards without an "
                                      "index.json); without it such data trains for --max-steps or --max-flops")  # fmt: skip
    max_tokens: int = option(64, "most tokens of one example in training and native-resolution evaluation (the "
                             "quick-start budget; Processor's own default, for models built in Python, is larger); "
                             "larger images are scaled down, aspect kept")  # fmt: skip
    res_mode: str = option("native", "resolution sampling: native (as is), side (sample the side) or area "
                           "(sample the area)", choices=RES_MODES)  # fmt: skip
    res_min: int = option(64, "smallest sampled side in pixels (res_mode side/area)")
    res_max: int = option(256, "largest sampled side in pixels (res_mode side/area)")
    res_dist: str = option("truncnorm", "distribution of sampled sides: uniform, or a normal biased to low "
                           "resolution truncated to the range", choices=RES_DISTS)  # fmt: skip
    res_mean: float = option(0.0, "centre of the truncated normal as a share of the range (0: res_min, "
                             "0.5: the middle, 1: res_max); its spread is half the range")  # fmt: skip
    fps: float | None = option(Processor.fps, "clips: frames per second to sample, by the timestamps of decoded frames "
                               "(default: every frame)")  # fmt: skip
    frame_stride: int = option(Processor.frame_stride, "clips: then keep every n-th of those frames")
    max_frames: int = option(Processor.max_frames, "clips: most frames per clip in training, and the frames taken at evaluation")
    frames_min: int = option(1, "clips: fewest frames per clip in training (drawn uniformly up to max_frames)")
    crop_min: float = option(1.0, "random crops keep at least this share of the area (1: no cropping)")
    flip: bool = option(True, "random horizontal flips in training")
    drop: str = option("none", "token dropping: none, constant rate, uniform, beta-distributed or "
                       "resolution-dependent rates", choices=DROP_KINDS)  # fmt: skip
    drop_rate: float = option(0.25, "drop rate (constant) or mean rate (beta)")
    drop_max: float = option(0.5, "largest drop rate (uniform, beta); resolution: the mean rate at max_tokens "
                             "(the mean grows from 0 at 16 tokens; rates are drawn around it, up to 0.9)")  # fmt: skip
    drop_schedule: str = option("constant", "how the drop rates move over training", choices=DropSchedule.KINDS)
    drop_schedule_start: float = option(1.0, "multiplier of the drop rates at the start of training")
    drop_schedule_end: float = option(1.0, "multiplier of the drop rates at the end of training (linear, sigmoid)")
    drop_tube: bool = option(False, "clips: drop whole tubes (the same row and column at every time)")
    workers: int = option(1, "data-loader worker processes")
    fail_fast: bool = option(False, "stop at the first unreadable file instead of skipping and counting it")

    def __post_init__(self) -> None:
        """Check the options and build the small parts once, so an impossible setting fails now."""
        check_choices(self, "")
        check_numbers(self)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 1 <= self.frames_min <= self.max_frames:
            raise ValueError(f"frames_min={self.frames_min} must be in [1, max_frames={self.max_frames}]")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        _at_least(self, 1, "max_tokens")
        _at_least(self, 0, "workers")
        _at_least(self, 1, "frame_stride")
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {self.num_examples}")
        self.resolution_sampler()
        self.token_dropper(seed=0)
        self.drop_rate_schedule()

    def resolution_sampler(self) -> ResolutionSampler:
        return ResolutionSampler(self.res_mode, self.res_min, self.res_max, self.res_dist, self.res_mean)

    def token_dropper(self, seed: int) -> TokenDropper | None:
        rates = {
            "none": None,
            "constant": lambda: ConstantRate(self.drop_rate),
            "uniform": lambda: UniformRate(0.0, self.drop_max),
            "beta": lambda: BetaRate(self.drop_rate, self.drop_max),
            "resolution": lambda: ResolutionRate(0.0, self.drop_max, min(16, self.max_tokens - 1), self.max_tokens),
        }[self.drop]
        return None if rates is None else TokenDropper(rates(), seed=seed, tube=self.drop_tube)

    def drop_rate_schedule(self) -> DropSchedule:
        return DropSchedule(self.drop_schedule, self.drop_schedule_start, self.drop_schedule_end)


@dataclass
class PackingSection(PackingConfig):
    """The ``packing`` section: :class:`navit.packing.PackingConfig`, numbers read as numbers."""

    def __post_init__(self) -> None:
        check_numbers(self)
        super().__post_init__()


@dataclass
class EvalSection:
    budgets: list[int] = option([16, 36, 64], "tokens per example to evaluate at after training, besides native")
    frames: list[int] = option([1, 4, 16], "clips: frames per clip to evaluate at after training, besides native")
    val_every: int = option(0, "steps between validation-loss passes during training, at the next metric record "
                            "(0: at each twentieth of the run); drawn in loss_curves.png")  # fmt: skip
    val_batches: int = option(4, "validation batches (of 8 sequences) in each such pass, the same ones every time "
                              "(0: no passes)")  # fmt: skip

    def __post_init__(self) -> None:
        check_choices(self, "")
        check_numbers(self)
        if any(b < 1 for b in self.budgets + self.frames):
            raise ValueError(f"budgets {self.budgets} and frames {self.frames} must be >= 1")
        _at_least(self, 0, "val_every", "val_batches")


def open_data(cfg: Any) -> tuple[Any, Any]:
    """(training source, validation source) of a training config; validation labels are matched
    to the training classes by name, so a validation folder that lacks a class shifts nothing."""
    source = with_classes(open_source(cfg.data.train), cfg.data.classes)
    if not cfg.data.val:
        return split_holdout(source, cfg.data.val_fraction, cfg.data.split_seed)
    val = with_classes(open_source(cfg.data.val), cfg.data.classes)
    return source, with_class_names(val, source.class_names, f"--val-data {cfg.data.val}")


def with_classes(source: Any, path: str | None) -> Any:
    """``source`` with the class names of the file ``path`` (one per line): a source that reads
    labels by name (shards) takes them as its list, any other is matched to them by name."""
    if path is None:
        return source
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except OSError as error:
        raise FileNotFoundError(f"--classes {path}: {error.strerror or error}") from error
    if not names:
        raise ValueError(f"--classes {path} lists no class names")
    if hasattr(source, "with_classes"):
        return source.with_classes(names)
    return with_class_names(source, names, f"data with --classes {path}")


def mean_tokens(source: Any, processor: Processor, sample: int = 256) -> float:
    """The mean token count ``processor`` gives the first ``sample`` examples of ``source``'s
    first epoch (unreadable ones are the loader's to count and report)."""
    counts = []
    for record in first_items(source, sample):
        if record.item is None:
            continue
        try:
            width, height = picture_size(record.item)
        except Exception:
            continue
        rows, cols = processor.grid(height, width)
        counts.append(rows * cols)
    if not counts:
        raise ValueError(f"none of the first {sample} training examples could be read")
    return sum(counts) / len(counts)


def epoch_size(cfg: Any, source: Any) -> int:
    """Examples in one epoch of the training data (``num_examples``, or what the source knows); a
    stream of unknown length is trained for ``max_steps`` or ``max_flops`` (then 0: epochs are
    passes, counted as they end)."""
    size = cfg.data.num_examples or num_items(source)
    if size is None and not (cfg.optim.max_steps or cfg.optim.max_flops):
        raise ValueError(f"data {cfg.data.train!r} is a stream of unknown length: give --num-examples, --max-steps "
                         "or --max-flops")  # fmt: skip
    return size or 0


def make_loader(cfg: Any, source: Any, processor: Processor, task: Any, info: D.DistInfo, total_examples: int) -> PackedLoader:
    """The training loader of this rank: its parts of ``source`` (under ``torchrun``), augmented,
    token-dropped and packed as the config says, with ``task``'s ops and targets."""
    d = cfg.data
    chain = train_chain(processor, crop_min=d.crop_min, flip=d.flip, resolution=d.resolution_sampler(),
                        frames_min=min(d.frames_min, processor.max_frames), dropper=d.token_dropper(cfg.run.seed),
                        schedule=d.drop_rate_schedule(), extra=tuple(task.ops(train=True)))  # fmt: skip
    size = d.num_examples or num_items(source)
    return PackedLoader(source, chain, targets=task.targets, packing=cfg.packing, train=True, seed=cfg.run.seed,
                        num_workers=d.workers, rank=info.rank, world_size=info.world_size,
                        epochs=total_examples / size if size else None, fail_fast=d.fail_fast)  # fmt: skip


def endless(loader: PackedLoader) -> Iterator[LoaderBatch]:
    """Batches across epochs. Under torchrun every rank runs the same number of *steps*, whatever
    its shard packs into, so no rank waits at an epoch end for a collective that never comes."""
    while True:
        fresh, produced = loader.at_epoch_start, False
        for item in loader:
            produced = True
            yield item
        if fresh and not produced:
            raise ValueError(
                f"no example of the training data could be loaded in epoch {loader.epoch - 1}: "
                f"{dict(loader.skipped)}"
            )


def restart_epoch(loader: PackedLoader, saved: dict[str, Any]) -> int:
    """Resuming another world size's loader state: the shards differ, so the saved epoch starts
    afresh; returns that epoch."""
    loader.epoch = int(saved["epoch"])
    return loader.epoch


def skipped(loader: PackedLoader) -> dict[str, int]:
    """Unreadable examples this rank's loader skipped, by reason."""
    return dict(loader.skipped)


def validate(cfg: Any, model: torch.nn.Module, task: Any, source: Any, processor: Processor, device: torch.device,
             report: Path | None = None, title: str = "") -> dict[str, dict[str, Any]]:  # fmt: skip
    """Evaluate ``model`` on ``source`` natively and at each budget of the config's ``eval``
    section; with ``report``, write the report (``eval.json`` and the plot) into that folder."""
    results = evaluate_budgets(
        model, task, source, processor, budgets=cfg.eval.budgets, frames=cfg.eval.frames,
        seq_len=cfg.packing.seq_len, device=device, workers=cfg.data.workers,
    )  # fmt: skip
    if report is not None:
        write_budget_report(results, report, title=title, metric=task.metric)
    return results


def periodic_validation(cfg: Any, task: Any, source: Any, processor: Processor) -> ValidationLoss:
    """The validation-loss passes during training (:mod:`navit.validation`): the task's training
    targets of ``source``'s examples as evaluation reads them, in a seeded order (an indexed
    source, such as a class folder, is shuffled, so the sample holds every class). Read in the
    loader's workers: a video decoded in the training process would leave FFmpeg's scaler
    threads in the next worker it forks, which then hangs."""
    if not cfg.eval.val_batches:  # passes off: no loader to build
        return ValidationLoss([], 0)
    if isinstance(source, IndexedSource):
        source = Subset(source, epoch_order(len(source), 0, cfg.data.split_seed, shuffle=True))
    packing = PackingConfig(seq_len=max(cfg.packing.seq_len, processor.max_tokens), num_seqs=8, buffer_size=64)
    loader = PackedLoader(source, eval_chain(processor, extra=tuple(task.ops(train=False))), targets=task.targets,
                          packing=packing, train=False, num_workers=cfg.data.workers)  # fmt: skip
    return ValidationLoss(loader, cfg.eval.val_batches, cfg.eval.val_every, bf16=cfg.optim.precision == "bf16")
