"""Training: ``build`` wires the components from a :class:`~navit.train_config.TrainConfig` (data:
:mod:`navit.train_data`; the starting model: :mod:`navit.start`; the task: :mod:`navit.tasks`; the
optimizer: :mod:`navit.optim`; checkpoints: :mod:`navit.train_state`; metrics: :mod:`navit.metrics`;
the run folder: :mod:`navit.run_folder`), ``train_step`` runs one step, ``train_loop`` repeats it
until the budget is spent, and ``finish`` validates and writes the summary."""

from __future__ import annotations

import gc
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from navit import distributed as D
from navit.metrics import MetricsLogger, Window
from navit.run_folder import new_run_folder, run_folder_of, write_config
from navit.start import starting_model
from navit.train_data import endless, epoch_size, make_loader, open_data, periodic_validation, skipped, validate
from navit.train_state import RNG, Progress, TrainState

if TYPE_CHECKING:
    from navit.tasks import Task, TaskLoss
    from navit.train_config import TrainConfig


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``; one line for anything else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch {torch.__version__} sees no CUDA device here; use cpu or auto")
    return device


@dataclass
class Run:
    """Everything a training run holds, built once by :func:`build`."""

    cfg: TrainConfig
    device: torch.device
    info: D.DistInfo
    task: Task
    model: nn.Module  # unwrapped: for checkpoints, the task's loss and FLOPs
    wrapped: nn.Module  # DDP / FSDP around ``model``
    forward: Callable[..., Any]  # ``wrapped``, compiled with --compile
    optimizer: torch.optim.Optimizer
    loader: Any
    val_source: Any
    val_loss: Any  # validation-loss passes during training (navit.validation)
    folder: Path
    total_examples: int
    metrics: MetricsLogger | None = None
    progress: Progress = field(default_factory=Progress)
    window: Window = field(default_factory=Window)  # sums since the last metrics record

    def __post_init__(self) -> None:  # what a checkpoint holds
        per_rank = {"loader": self.loader, "torch_rng": RNG(), "window": self.window, "val_loss": self.val_loss}
        self.state = TrainState(self.wrapped, self.optimizer, self.progress, per_rank, self.info, self.device)

    def budget(self) -> tuple[float, float, str]:
        """(done, total, unit) of what ends the run: steps, FLOPs or examples, each counted over
        all ranks, so that every rank stops at the same step."""
        optim = self.cfg.optim
        if optim.max_steps:
            return self.progress.step, optim.max_steps, "step"
        if optim.max_flops:
            done = self.progress.flops_base + self.progress.flops_all
            return done / 1e9, optim.max_flops / 1e9, "GFLOP"
        return self.progress.examples, self.total_examples, "ex"

    @property
    def finished(self) -> bool:
        done, total, _ = self.budget()
        return done >= total

    def fraction_done(self) -> float:
        done, total, _ = self.budget()
        return done / total

    def epochs(self) -> float:
        """Passes over the training data so far (for a stream of unknown length, those finished)."""
        if not self.total_examples:
            return float(self.loader.epoch)
        return round(self.progress.examples / self.total_examples * self.cfg.optim.epochs, 4)


# -- Building ------------------------------------------------------------------------------------


def build(cfg: TrainConfig, device: torch.device, info: D.DistInfo) -> Run:
    torch.manual_seed(cfg.run.seed)  # one initialisation on every rank (FSDP shards each rank's own)
    torch.set_num_threads(cfg.run.threads or max(1, (os.cpu_count() or 1) - cfg.data.workers))
    train_source, val_source = open_data(cfg)
    task = cfg.task.build(train_source.class_names)
    task.check_data(train_source, cfg.data.train)
    model = starting_model(cfg, task, train_source, info).to(device)
    D.check_wrappable(model, info, cfg.run.distributed)
    if info.enabled:  # then each rank its own randomness (stochastic depth, dropout)
        torch.manual_seed(cfg.run.seed + info.rank)

    # The run folder appears only once data and model are known to be usable (a resumed run's
    # config is rewritten once its checkpoint has loaded).
    if cfg.run.resume:
        folder = run_folder_of(cfg.run.resume)
    else:
        folder = D.broadcast_object(new_run_folder(cfg) if info.is_main else None, info)
        write_config(cfg, folder, info)

    total_examples = cfg.optim.total_examples(epoch_size(cfg, train_source))
    loader = make_loader(cfg, train_source, model.processor, task, info, total_examples)
    wrapped = D.wrap_model(model, info, cfg.run.distributed, device)
    return Run(
        cfg=cfg, device=device, info=info, task=task, model=model, wrapped=wrapped,
        forward=torch.compile(wrapped) if cfg.optim.compile else wrapped,
        optimizer=cfg.optim.optimizer(model, device), loader=loader, val_source=val_source, folder=folder,
        val_loss=periodic_validation(cfg, task, val_source, model.processor),
        total_examples=total_examples,
    )  # fmt: skip


def save(run: Run) -> None:
    """A checkpoint of the run (collective: every rank takes part, rank 0 writes)."""
    run.state.save(run.folder / "checkpoints", run.task, run.cfg.to_dict())


def resume(run: Run, path: str) -> None:
    """Continue from a checkpoint: weights, optimizer, data stream, metrics window, RNG and progress."""
    checkpoint = run.state.load(path)
    write_config(run.cfg, run.folder, run.info)
    if run.info.is_main:
        print(f"resumed from {checkpoint} at step {run.progress.step}")


# -- Stepping ------------------------------------------------------------------------------------


def sum_over_ranks(values: list[float], info: D.DistInfo, device: torch.device) -> list[float]:
    """Each of ``values`` summed over ranks, in one collective."""
    if not info.enabled:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def normalised(result: TaskLoss, total: int, world_size: int) -> torch.Tensor:
    """What to backpropagate: this rank's loss sum over the terms of all ranks (``total``),
    times the world size, so that DDP's averaging of gradients over ranks gives the gradient of
    the mean over every term of the step."""
    return result.loss_sum * world_size / max(total, 1)


def train_step(run: Run, item: Any) -> torch.Tensor | None:
    """One optimizer step on ``item``, its sums added to the metrics window; returns the gradient
    norm, or None for a skipped step."""
    cfg, info, progress = run.cfg, run.info, run.progress
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.optim.learning_rate(progress.step, run.fraction_done())
    batch = item.batch
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.optim.precision == "bf16"):
        result = run.task.loss(run.forward, run.model, batch, item.targets)
    flops = run.task.flops(run.model, batch, item.targets)
    # Every rank must agree on the terms, the examples, a skip and (for max_flops) the FLOPs.
    bad = 0 if torch.isfinite(result.loss_sum.detach()).all() else 1
    sums = sum_over_ranks([result.count, batch.num_examples, bad, flops if cfg.optim.max_flops else 0], info, run.device)
    total, examples, bad, flops_all = (int(v) for v in sums)
    run.optimizer.zero_grad(set_to_none=True)
    grad_norm = None
    if not bad:
        normalised(result, total, info.world_size).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(), cfg.optim.grad_clip)
        run.optimizer.step()
    elif cfg.run.nan_policy == "stop":
        raise FloatingPointError(
            f"non-finite loss at step {progress.step + 1}; stopping (use --nan-policy skip to skip such steps)"
        )
    else:
        print(f"warning: non-finite loss at step {progress.step + 1}; step skipped")
    progress.add(examples=examples, tokens=batch.num_real_tokens, flops=flops, flops_all=flops_all)
    run.window.add(examples=examples, count=total, loss_sum=result.loss_sum.item(), tokens=batch.num_real_tokens,
                   slots=batch.segment_ids.numel(), logs=result.logs)  # fmt: skip
    return grad_norm


def log(run: Run, grad_norm: torch.Tensor | None) -> dict[str, Any]:
    """The metrics record of the window (collective), logged by rank 0."""
    tokens, flops = run.progress.totals(run.info, run.device)
    seen = {"examples_seen": run.progress.examples, "tokens_seen": tokens, "train_flops": flops}
    record = run.window.record(run.info, run.device, step=run.progress.step, epoch=run.epochs(),
                               lr=run.optimizer.param_groups[0]["lr"], grad_norm=grad_norm, seen=seen)  # fmt: skip
    record.update(run.val_loss(run.forward, run.model, run.task, run.progress.step, run.fraction_done(), run.device))
    if run.metrics is not None:
        run.metrics.log(record)
    return record


def train_loop(run: Run) -> float:
    """Step until the budget is spent; returns the seconds it took."""
    cfg, info = run.cfg, run.info
    start, stream = time.perf_counter(), endless(run.loader)
    run.window.start = start
    _, total, unit = run.budget()
    done = lambda: min(run.budget()[0], total)  # noqa: E731
    run.model.train()
    with tqdm(total=total, initial=done(), desc="train", unit=unit, dynamic_ncols=True, mininterval=1.0,
              disable=not info.is_main) as bar:  # fmt: skip
        while not run.finished:
            item = next(stream).to(run.device)
            before = done()
            grad_norm = train_step(run, item)
            if run.progress.step % cfg.run.log_every == 0:
                record = log(run, grad_norm)
                bar.set_postfix(loss=f"{record['loss']:.3f}", ex_s=f"{record['examples_per_s']:.0f}",
                                pad=f"{100 * record['padding']:.1f}%")  # fmt: skip
                run.window.reset()
            bar.update(done() - before)
            if run.progress.step % cfg.run.save_every == 0 or run.finished:
                save(run)
    return time.perf_counter() - start


# -- The whole run -------------------------------------------------------------------------------


def finish(run: Run, train_seconds: float) -> dict[str, Any]:
    """Evaluate at every token budget, write the reports; returns the summary."""
    info, task = run.info, run.task
    lost = skipped(run.loader)
    if sum(lost.values()):
        print(f"rank {info.rank}: skipped {sum(lost.values())} unreadable examples: {lost}")
    # Every rank evaluates the same validation set (FSDP needs all ranks in each forward).
    inference = task.inference_model(run.model)
    evaluated = run.wrapped if inference is run.model else inference
    results = validate(run.cfg, evaluated, task, run.val_source, run.model.processor, run.device,
                       report=run.folder if info.is_main else None, title=f"{run.cfg.model.baseline} ({run.folder.name})")
    tokens, flops = run.progress.totals(info, run.device)
    summary = {
        "run_folder": str(run.folder),
        "steps": run.progress.step,
        "examples_seen": run.progress.examples,
        "epochs": run.epochs(),
        "tokens_seen": tokens,
        "train_flops": flops,
        "world_size": info.world_size,
        "train_seconds": round(train_seconds, 1),
        f"val_{task.metric}": results["native"][task.metric],
        f"{task.metric}_vs_tokens": results,
        "skipped_examples": dict(sum((Counter(s) for s in D.all_gather_object(lost, info)), Counter())),
        **{name: int(D.sum_over_ranks(count, info, run.device)) for name, count in task.counts().items()},
    }
    if info.is_main:
        for name in task.counts():
            if summary[name]:
                print(f"{name.replace('_', ' ')}: {summary[name]}")
        (run.folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate at each token budget, write the run folder; returns the summary.

    Runs alone or under ``torchrun`` (each rank trains on a disjoint shard; rank 0 logs and
    writes checkpoints).
    """
    device = pick_device(cfg.run.device)
    info = D.init_distributed(device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    try:
        run = build(cfg, device, info)
        if cfg.run.resume:
            resume(run, cfg.run.resume)
        if info.is_main:
            run.metrics = MetricsLogger(run.folder, resume_step=run.progress.step if cfg.run.resume else None)
        try:
            seconds = train_loop(run)
            return finish(run, seconds)
        finally:
            if run.metrics is not None:
                run.metrics.close()
    finally:
        # The DDP wrapper must be freed before the group: a Reducer that drops the last reference
        # to a gloo group does so holding the GIL, and can deadlock with a gloo worker thread that
        # needs the GIL to free its last finished collective.
        run = None
        gc.collect()
        D.shutdown()
