"""Training: build the parts, step, loop, evaluate.

Data (``navit.data``), the model and its processor, the task (``navit.tasks``), checkpoints
(``navit.checkpoint``) and metrics (``navit.metrics``) know nothing about each other; ``build``
wires them from a :class:`~navit.train_config.TrainConfig`, ``train_step`` runs one step and
``train_loop`` repeats it until the configured number of examples has been seen.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
import yaml
from torch import nn
from tqdm import tqdm

from navit import distributed as D
from navit import pretrained
from navit.checkpoint import load_meta, load_train_state, load_weights, resolve_checkpoint, save_checkpoint
from navit.config import NaViTConfig
from navit.data.loader import LoaderBatch, PackedLoader
from navit.data.sources import open_source, shard, split_holdout, with_class_names
from navit.data.transforms import ExampleTransform
from navit.evaluate import evaluate_budgets, write_budget_report
from navit.inference import checkpoint_meta
from navit.metrics import MetricsLogger
from navit.model import inflate_weights
from navit.processor import Processor
from navit.tasks import TASKS, StepLoss, Task
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
class Progress:
    """How far training has come; saved in every checkpoint. ``tokens`` and ``flops`` are the
    totals over all ranks up to the last checkpoint (``base``) plus this rank's since."""

    step: int = 0
    examples: int = 0  # over all ranks
    tokens_base: int = 0
    flops_base: int = 0
    tokens: int = 0  # this rank, since the start or the resume
    flops: int = 0
    flops_all: int = 0  # every rank's, since the start or the resume (counted only for max_flops)

    def totals(self, info: D.DistInfo, device: torch.device) -> tuple[int, int]:
        """(real tokens, training FLOPs) over all ranks (a collective under torchrun)."""
        tokens = self.tokens_base + int(D.sum_over_ranks(self.tokens, info, device))
        flops = self.flops_base + int(D.sum_over_ranks(self.flops, info, device))
        return tokens, flops


@dataclass
class Run:
    """Everything a training run holds, built once by :func:`build`."""

    cfg: TrainConfig
    device: torch.device
    info: D.DistInfo
    task: Task
    model: nn.Module  # unwrapped: for checkpoints, loss parameters, FLOPs
    wrapped: nn.Module  # DDP / FSDP around ``model``
    forward: Callable[..., Any]  # ``wrapped``, compiled with --compile
    optimizer: torch.optim.Optimizer
    loader: PackedLoader
    val_source: Any
    folder: Path
    total_examples: int
    metrics: MetricsLogger | None = None
    progress: Progress = field(default_factory=Progress)
    window: "Window" = field(default_factory=lambda: Window())  # sums since the last metrics record

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


# ------------------------------------------------------------------------------------------------
# Building


def open_data(cfg: TrainConfig) -> tuple[Any, Any]:
    """(training source, validation source); validation labels are matched to the training
    classes by name, so a validation folder that lacks a class shifts nothing."""
    source = open_source(cfg.data.train)
    if not cfg.data.val:
        return split_holdout(source, cfg.data.val_fraction, cfg.data.split_seed)
    return source, with_class_names(open_source(cfg.data.val), source.class_names, f"--val-data {cfg.data.val}")


def square_tokens(source: Any, processor: Processor, sample: int = 256) -> int:
    """The square grid with about the mean token count the native processor gives (sampled)."""
    step = max(1, len(source) // sample)
    counts = []
    for index in range(0, len(source), step):
        try:
            image = source.load(index)
        except Exception:  # unreadable images are the loader's to count and report
            continue
        rows, cols = processor.grid(image.height, image.width)
        counts.append(rows * cols)
    if not counts:
        raise ValueError(f"none of the {len(source)} training images sampled could be read")
    return max(1, round(math.sqrt(sum(counts) / len(counts)))) ** 2


class Start(NamedTuple):
    """A checkpoint to fine-tune from: its image model's config and processor, and its weights
    (an image tower's also without their ``image.`` prefix)."""

    path: str
    config: NaViTConfig
    processor: Processor
    weights: dict[str, torch.Tensor]


def start_from(path: str, arch: str | None = None) -> Start:
    """Read a navit run or checkpoint, or a pretrained SigLIP2 or timm model, to fine-tune from."""
    if pretrained.kind(path, arch) is not None:
        return Start(path, *pretrained.image_tower(path, arch))
    checkpoint = resolve_checkpoint(path)
    meta = load_meta(checkpoint)
    if "processor" not in meta:
        raise ValueError(f"{checkpoint} was written by an older navit; fine-tune from a newer checkpoint")
    model = meta["model"]
    weights = load_weights(checkpoint)
    weights.update({k.removeprefix("image."): v for k, v in weights.items() if k.startswith("image.")})
    return Start(path, NaViTConfig.from_dict(model.get("image", model)), Processor.from_dict(meta["processor"]), weights)


def model_config(cfg: TrainConfig, train_source: Any, start: Start | None) -> NaViTConfig:
    """The configured model, or fine-tuning, the starting checkpoint's (``model.args`` on top);
    for data with clips an image model (2 axes) takes tubelets of two frames instead (3 axes)."""
    config = cfg.model_config()
    if start is not None:
        if not cfg.run.resume:
            print(f"init_from: the model is {start.path}'s ({start.config.embed_dim} wide, {start.config.depth} deep)")
        config = start.config.replace(**cfg.model.args)
    if getattr(train_source, "has_video", False) and config.num_axes == 2:
        print("the data has clips: the model takes tubelets of 2 frames (num_axes=3, temporal_patch_size=2)")
        config = config.replace(num_axes=3, temporal_patch_size=2)
    return config


def make_processor(cfg: TrainConfig, config: NaViTConfig, train_source: Any, start: Start | None) -> Processor:
    """The model's preprocessing: the starting checkpoint's way of resizing and normalising (when
    fine-tuning) with this run's budget and frames; the square baseline sees as many tokens per
    image on average, the frame baseline one frame per clip."""
    d = cfg.data
    style = {}
    if start is not None:
        p = start.processor
        style = dict(grid_rule=p.grid_rule, resample=p.resample, reducing_gap=p.reducing_gap, mean=p.mean, std=p.std)
    native = Processor.for_model(config, max_tokens=d.max_tokens, fps=d.fps, frame_stride=d.frame_stride,
                                 max_frames=d.max_frames, **style)  # fmt: skip
    if cfg.model.baseline == "square":
        return native.replace(grid_rule="square", max_tokens=cfg.model.square_tokens or square_tokens(train_source, native))
    if cfg.model.baseline == "frame":
        if not getattr(train_source, "has_video", False):
            raise ValueError("--baseline frame sees one frame per clip, but the training data has no clips")
        return native.replace(max_frames=1)
    return native


def initialise_from(model: nn.Module, start: Start) -> None:
    """Fine-tuning: every weight of the starting checkpoint whose name and shape match (an image
    tower's weights also load into a classifier); an image model's weights are inflated for a
    clip model (:func:`navit.model.inflate_weights`)."""
    weights = start.weights
    tower = getattr(model, "image", model)
    if start.config.num_axes == 2 and tower.config.num_axes == 3:
        print(f"init_from: inflating the image model of {start.path} to tubelets of {tower.config.temporal_patch_size} frames")
        prefix = "image." if tower is not model else ""
        inflated = inflate_weights({k: v for k, v in weights.items() if not k.startswith("image.")}, start.config, tower.config)
        weights = {prefix + k: v for k, v in inflated.items()}
    own = model.state_dict()
    usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"no weight of {start.path} fits the model (names or shapes differ everywhere)")
    model.load_state_dict(usable, strict=False)
    skipped = sorted(set(own) - set(usable))
    if skipped:
        print(f"init_from: {len(usable)} tensors loaded, re-initialised {skipped}")


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    no_decay = model.no_weight_decay()
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n not in no_decay], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
    ]
    # fused: one kernel over all parameters (about 3x faster than foreach on CPU for ViT-Ti).
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(0.9, 0.999), fused=device.type in ("cpu", "cuda"))


def new_run_folder(cfg: TrainConfig) -> Path:
    name = cfg.run.name or time.strftime(f"{cfg.model.baseline}-%Y%m%d-%H%M%S")
    folder = Path(cfg.run.out) / name
    try:
        folder.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise ValueError(f"run folder {folder} exists: give another --name, or --resume {folder} to continue it") from None
    return folder


def run_folder_of(path: str | Path) -> Path:
    """The run folder of a run, checkpoints or checkpoint path (a checkpoint saved outside a
    run, by ``navit.save_model``, is its own folder)."""
    path = Path(path)
    if (path / "config.yaml").exists():
        return path
    checkpoint = resolve_checkpoint(path)
    run = checkpoint.parent.parent
    return run if (run / "config.yaml").exists() else checkpoint


def build(cfg: TrainConfig, device: torch.device, info: D.DistInfo) -> Run:
    torch.manual_seed(cfg.run.seed)  # one initialisation on every rank (FSDP shards each rank's own)
    torch.set_num_threads(cfg.run.threads or max(1, (os.cpu_count() or 1) - cfg.data.workers))
    train_source, val_source = open_data(cfg)
    task = TASKS[cfg.task.name](cfg.task.options, list(train_source.class_names))
    task.check_data(train_source, cfg.data.train)
    # A fine-tuned run resumes with the architecture and preprocessing it was fine-tuned with,
    # read from its own checkpoint (the weights come with the resume): its source may be gone.
    source = (cfg.run.resume, None) if cfg.run.resume else (cfg.model.init_from, cfg.model.init_arch)
    start = start_from(*source) if cfg.model.init_from else None
    config = model_config(cfg, train_source, start)
    processor = D.broadcast_object(make_processor(cfg, config, train_source, start) if info.is_main else None, info)
    model = task.build_model(config, processor)
    if start is not None and not cfg.run.resume:
        initialise_from(model, start)
    model.to(device)
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

    total_examples = cfg.total_examples(len(train_source))
    loader = PackedLoader(
        shard(train_source, info.rank, info.world_size) if info.enabled else train_source,
        ExampleTransform(processor, cfg.resolution(), crop_scale=(cfg.data.crop_min, 1.0), flip=cfg.data.flip,
                         dense_keys=task.dense_keys, frames_min=min(cfg.data.frames_min, processor.max_frames)),  # fmt: skip
        targets=task.targets,
        seq_len=cfg.packing.seq_len,
        num_seqs=cfg.packing.num_seqs,
        max_examples_per_seq=cfg.packing.max_examples_per_seq,
        buffer_size=cfg.packing.buffer_size,
        train=True,
        seed=cfg.run.seed,
        num_workers=cfg.data.workers,
        dropper=cfg.dropper(),
        drop_schedule=cfg.drop_schedule(),
        total_examples=total_examples // info.world_size,
        fail_fast=cfg.data.fail_fast,
    )
    wrapped = D.wrap_model(model, info, cfg.run.distributed, device)
    return Run(
        cfg=cfg, device=device, info=info, task=task, model=model, wrapped=wrapped,
        forward=torch.compile(wrapped) if cfg.optim.compile else wrapped,
        optimizer=make_optimizer(model, cfg, device), loader=loader, val_source=val_source, folder=folder,
        total_examples=total_examples,
    )  # fmt: skip


def write_config(cfg: TrainConfig, folder: Path, info: D.DistInfo) -> None:
    """``config.yaml``: the run's options, a template for new runs (so without ``resume``)."""
    if info.is_main:
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg.with_options({"resume": None}).to_dict(), sort_keys=False))


# ------------------------------------------------------------------------------------------------
# Checkpoints


def save(run: Run) -> None:
    """Gathering full states is collective: every rank takes part, rank 0 writes."""
    info, progress = run.info, run.progress
    weights = D.full_model_state(run.wrapped, info)
    optimizer_state = D.full_optimizer_state(run.wrapped, run.optimizer, info)
    loader_states = D.all_gather_object(run.loader.state_dict(), info)
    rng_states = D.all_gather_object(torch.get_rng_state(), info)
    windows = D.all_gather_object(run.window.state(), info)
    tokens, flops = progress.totals(info, run.device)
    if not info.is_main:
        return
    meta = {
        **checkpoint_meta(run.task, run.model, run.model.processor),
        "step": progress.step,
        "examples_seen": progress.examples,
        "tokens_seen": tokens,
        "train_flops": flops,
        "loader": loader_states,
        "window": windows,
        "world_size": info.world_size,
        "config": run.cfg.to_dict(),
    }
    train_state = {"optimizer": optimizer_state, "torch_rng": rng_states}
    save_checkpoint(run.folder / "checkpoints", f"step_{progress.step:08d}", weights, meta, train_state)


def resume(run: Run, path: str) -> None:
    """Continue from a checkpoint: weights, optimizer, data stream, RNG and progress."""
    info = run.info
    checkpoint = resolve_checkpoint(path)
    meta = load_meta(checkpoint)
    state = load_train_state(checkpoint)
    try:
        D.load_full_state(run.wrapped, run.optimizer, load_weights(checkpoint), state["optimizer"])
    except ValueError as error:  # the options given changed the model
        raise ValueError(f"cannot resume {checkpoint}: {error}; resume without changing model options") from None
    loader_states = meta["loader"]
    if len(loader_states) == info.world_size:
        torch.set_rng_state(state["torch_rng"][info.rank])
        run.loader.load_state_dict(loader_states[info.rank])
        if "window" in meta:
            run.window = Window(**meta["window"][info.rank])
    else:  # another world size: shards differ, so start the saved epoch afresh
        run.loader.epoch = int(loader_states[0]["epoch"])
        if info.is_main:
            print(f"resuming {len(loader_states)}-rank data state on {info.world_size} rank(s): "
                  f"epoch {run.loader.epoch} restarts")  # fmt: skip
    run.progress = Progress(step=int(meta["step"]), examples=int(meta["examples_seen"]),
                            tokens_base=int(meta["tokens_seen"]), flops_base=int(meta["train_flops"]))  # fmt: skip
    write_config(run.cfg, run.folder, info)
    if info.is_main:
        print(f"resumed from {checkpoint} at step {run.progress.step}")


# ------------------------------------------------------------------------------------------------
# Stepping


def learning_rate(cfg: TrainConfig, step: int, fraction_done: float) -> float:
    """Linear warm-up over ``warmup_steps``, times a cosine decay to ``min_lr`` over training."""
    optim = cfg.optim
    warmup = min(1.0, (step + 1) / max(1, optim.warmup_steps))
    floor = optim.min_lr / optim.lr
    cosine = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction_done)))
    return optim.lr * warmup * cosine


def all_finite(loss: torch.Tensor, info: D.DistInfo, device: torch.device) -> bool:
    """Whether the loss is finite on every rank (a skip must be agreed by all)."""
    bad = 0 if torch.isfinite(loss).item() else 1
    return D.sum_over_ranks(bad, info, device) == 0


def train_step(run: Run, item: LoaderBatch) -> tuple[StepLoss, torch.Tensor | None]:
    """One optimizer step on ``item``; (its loss, the gradient norm, or None for a skipped step)."""
    cfg = run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, run.progress.step, run.fraction_done())
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.optim.precision == "bf16")
    with autocast:
        result = run.task.loss(run.forward, run.model, item.batch, item.targets, run.info, run.device)
    run.optimizer.zero_grad(set_to_none=True)
    grad_norm = None
    if all_finite(result.loss, run.info, run.device):
        result.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(), cfg.optim.grad_clip)
        run.optimizer.step()
    elif cfg.run.nan_policy == "stop":
        raise FloatingPointError(
            f"non-finite loss at step {run.progress.step + 1}; stopping (use --nan-policy skip to skip such steps)"
        )
    else:
        print(f"warning: non-finite loss at step {run.progress.step + 1}; step skipped")
    progress = run.progress
    progress.step += 1
    progress.examples += result.examples
    progress.tokens += item.batch.num_real_tokens
    progress.flops += result.flops
    if cfg.optim.max_flops:  # ranks count different FLOPs: all must see one total to stop at one step
        progress.flops_all += int(D.sum_over_ranks(result.flops, run.info, run.device))
    return result, grad_norm


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


class Window:
    """Sums between two metric records (saved with checkpoints, so that a resumed run records
    what an uninterrupted one would)."""

    SUMS = ("examples", "tokens", "slots", "steps", "loss_sum")

    def __init__(self, **sums: float) -> None:
        self.examples = self.tokens = self.slots = self.steps = 0
        self.loss_sum = self.seconds_before = 0.0  # seconds_before: training time before a resume
        self.__dict__.update(sums)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.start

    def state(self) -> dict[str, float]:
        return {**{name: getattr(self, name) for name in self.SUMS}, "seconds_before": self.elapsed()}

    def add(self, result: StepLoss, item: LoaderBatch) -> None:
        self.steps += 1
        self.examples += result.examples
        self.tokens += item.batch.num_real_tokens
        self.slots += item.batch.segment_ids.numel()
        self.loss_sum += result.loss_sum.item()

    def record(self, run: Run, grad_norm: torch.Tensor | None) -> dict[str, Any]:
        """The metrics record (collective: sums over ranks)."""
        info, device = run.info, run.device
        elapsed = self.elapsed()
        tokens = D.sum_over_ranks(self.tokens, info, device)
        slots = D.sum_over_ranks(self.slots, info, device)
        tokens_seen, flops = run.progress.totals(info, device)
        return {
            "step": run.progress.step,
            "epoch": round(run.progress.examples / max(1, run.total_examples) * run.cfg.optim.epochs, 4),
            "loss": round(D.sum_over_ranks(self.loss_sum, info, device) / max(1, self.examples), 5),
            "lr": run.optimizer.param_groups[0]["lr"],
            "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
            "examples_per_s": round(self.examples / elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1),
            "padding": round(1 - tokens / slots, 5),
            "examples_per_batch": round(self.examples / self.steps / info.world_size, 2),
            "examples_seen": run.progress.examples,
            "tokens_seen": tokens_seen,
            "train_flops": flops,
        }


def train_loop(run: Run) -> float:
    """Step until the configured examples (or steps) are done; returns the seconds it took."""
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
            result, grad_norm = train_step(run, item)
            run.window.add(result, item)
            if run.progress.step % cfg.run.log_every == 0:
                record = run.window.record(run, grad_norm)
                if run.metrics is not None:
                    run.metrics.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", ex_s=f"{record['examples_per_s']:.0f}",
                                pad=f"{100 * record['padding']:.1f}%")  # fmt: skip
                run.window = Window()
            bar.update(done() - before)
            if run.progress.step % cfg.run.save_every == 0 or run.finished:
                save(run)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# The whole run


def finish(run: Run, train_seconds: float) -> dict[str, Any]:
    """Evaluate at every token budget, write the reports; returns the summary."""
    info, task = run.info, run.task
    skipped = sum(run.loader.skipped.values())
    if skipped:
        print(f"rank {info.rank}: skipped {skipped} unreadable examples: {dict(run.loader.skipped)}")
    # Every rank evaluates the same validation set (FSDP needs all ranks in each forward).
    inference = task.inference_model(run.model)
    evaluated = run.wrapped if inference is run.model else inference
    results = evaluate_budgets(
        evaluated, task, run.val_source, run.model.processor, budgets=run.cfg.eval.budgets,
        frames=run.cfg.eval.frames, seq_len=run.cfg.packing.seq_len, device=run.device, workers=run.cfg.data.workers,
    )  # fmt: skip
    tokens, flops = run.progress.totals(info, run.device)
    summary = {
        "run_folder": str(run.folder),
        "steps": run.progress.step,
        "examples_seen": run.progress.examples,
        "epochs": round(run.progress.examples / max(1, run.total_examples) * run.cfg.optim.epochs, 4),
        "tokens_seen": tokens,
        "train_flops": flops,
        "world_size": info.world_size,
        "train_seconds": round(train_seconds, 1),
        f"val_{task.metric}": results["native"][task.metric],
        f"{task.metric}_vs_tokens": results,
        "skipped_examples": dict(sum((Counter(s) for s in D.all_gather_object(dict(run.loader.skipped), info)),
                                     Counter())),  # fmt: skip
        **{name: int(D.sum_over_ranks(count, info, run.device)) for name, count in task.counts().items()},
    }
    if info.is_main:
        for name in task.counts():
            if summary[name]:
                print(f"{name.replace('_', ' ')}: {summary[name]}")
        write_budget_report(results, run.folder, title=f"{run.cfg.model.baseline} ({run.folder.name})", metric=task.metric)
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
