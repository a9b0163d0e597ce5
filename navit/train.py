"""The training loop: one readable function, wired from small parts.

Data (``navit.data``), model (``navit.model``), checkpoints (``navit.checkpoint``) and metrics
(``navit.metrics``) know nothing about each other; ``train`` connects them.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from navit import distributed as D
from navit.checkpoint import (
    load_meta,
    load_train_state,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from navit.config import reject_unknown_fields, resolve_config
from navit.data.loader import DropSchedule, LoaderBatch, PackedLoader
from navit.data.sources import open_source, shard, split_holdout
from navit.data.transforms import ImagePipeline, ResolutionSampler
from navit.evaluate import evaluate_budgets, write_budget_report
from navit.metrics import MetricsLogger
from navit.model import NaViT
from navit.token_drop import BetaRate, ConstantRate, ResolutionRate, TokenDropper, UniformRate
from navit.two_tower import ImageTextModel, create_image_text_model
from navit.zeroshot import ZeroShotClassifier

DROP_KINDS = ("none", "constant", "uniform", "beta", "resolution")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``config.yaml`` in the run folder."""

    # data
    data: str = "synthetic:5000"
    val_data: str | None = None
    val_fraction: float = 0.2
    # model
    model: str = "navit_ti16"
    model_args: dict[str, Any] = field(
        default_factory=lambda: dict(embed_dim=128, depth=4, num_heads=4, pos_mode="absolute")
    )
    baseline: str = "navit"  # "navit" (native aspect) or "square" (ViT baseline: squash to a square)
    task: str = "classify"  # "classify" (labels) or "contrastive" (image-caption pairs)
    text_depth: int = 2  # contrastive: text transformer depth (width = image width)
    text_max_len: int = 64  # contrastive: bytes per caption, longer ones are truncated (counted)
    chunk_size: int | None = None  # contrastive: texts per similarity block (bounded memory)
    # packing and resolution
    max_tokens: int = 64
    seq_len: int = 256
    seqs_per_batch: int = 4
    max_images_per_seq: int = 32
    buffer_size: int = 128
    res_mode: str = "native"
    res_min: int = 64
    res_max: int = 256
    res_dist: str = "truncnorm"
    crop_min: float = 1.0
    flip: bool = True
    # token dropping
    drop: str = "none"
    drop_rate: float = 0.25
    drop_max: float = 0.5
    drop_schedule: str = "constant"
    drop_schedule_end: float = 1.0
    # optimisation
    epochs: int = 10
    max_steps: int | None = None
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    loss: str = "softmax"
    precision: str = "fp32"
    compile: bool = False
    # run
    nan_policy: str = "stop"  # on a non-finite loss: "stop" the run or "skip" the step
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2, sharded weights)
    seed: int = 0
    workers: int = 1
    threads: int | None = None  # torch threads; default: the cores the loader workers leave free
    device: str = "auto"
    out: str = "runs"
    name: str | None = None
    resume: str | None = None
    init_from: str | None = None
    eval_budgets: list[int] = field(default_factory=lambda: [16, 36, 64])
    log_every: int = 10
    save_every: int = 200
    fail_fast: bool = False

    def __post_init__(self) -> None:
        choices = {
            "baseline": ("navit", "square"),
            "task": ("classify", "contrastive"),
            "drop": DROP_KINDS,
            "loss": ("softmax", "sigmoid"),
            "precision": ("fp32", "bf16"),
            "nan_policy": ("stop", "skip"),
            "distributed": D.STRATEGIES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {allowed}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_tokens > self.seq_len:
            raise ValueError(f"max_tokens={self.max_tokens} exceeds seq_len={self.seq_len}")
        if any(b < 1 or b > self.seq_len for b in self.eval_budgets):
            raise ValueError(f"eval_budgets {self.eval_budgets} must lie in [1, seq_len={self.seq_len}]")
        for name in ("max_tokens", "seqs_per_batch", "max_images_per_seq", "buffer_size", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # Build the small parts now, so an impossible setting fails before any work starts.
        model = resolve_config(self.model, **{**self.model_args, "num_classes": 1})
        resolution = ResolutionSampler(self.res_mode, self.res_min, self.res_max, self.res_dist)
        if resolution.mode != "native" and resolution.min_res < model.patch_size:
            raise ValueError(
                f"res_min={self.res_min} px is smaller than the patch size {model.patch_size}: "
                "such images would be a fraction of one patch; raise res_min"
            )
        make_dropper(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        reject_unknown_fields(cls, values, "training option(s)", ValueError)
        return cls(**values)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_dropper(cfg: TrainConfig) -> TokenDropper | None:
    rates = {
        "none": None,
        "constant": lambda: ConstantRate(cfg.drop_rate),
        "uniform": lambda: UniformRate(0.0, cfg.drop_max),
        "beta": lambda: BetaRate(cfg.drop_rate, cfg.drop_max),
        "resolution": lambda: ResolutionRate(0.0, cfg.drop_max, 16, cfg.max_tokens),
    }[cfg.drop]
    return None if rates is None else TokenDropper(rates(), seed=cfg.seed)


def make_pipeline(cfg: TrainConfig, patch_size: int, *, square_tokens: int | None) -> ImagePipeline:
    return ImagePipeline(
        patch_size=patch_size,
        max_tokens=cfg.max_tokens,
        resolution=ResolutionSampler(cfg.res_mode, cfg.res_min, cfg.res_max, cfg.res_dist),
        square_tokens=square_tokens,
        crop_scale=(cfg.crop_min, 1.0),
        flip=cfg.flip,
    )


def mean_native_tokens(source, pipeline: ImagePipeline, sample: int = 256) -> float:
    """Mean tokens per image of the NaViT pipeline (eval geometry), from a sample of images."""
    step = max(1, len(source) // sample)
    counts = []
    for index in range(0, len(source), step):
        try:
            image = source.load(index)
        except Exception:  # unreadable images are the loader's to count and report
            continue
        rows, cols = pipeline.grid_for(image.height, image.width, None)
        counts.append(rows * cols)
    if not counts:
        raise ValueError(f"none of the {len(source)} training images sampled could be read")
    return sum(counts) / len(counts)


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, reduction: str = "mean"
) -> torch.Tensor:
    """Per image (not per token), so big images do not weigh more than small ones."""
    if cfg.loss == "softmax":
        return F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing, reduction=reduction)
    classes = logits.shape[-1]
    target = F.one_hot(labels, classes).float()
    target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / classes
    per_image = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").sum(-1)
    return per_image.sum() if reduction == "sum" else per_image.mean()


def warmup_cosine(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_lr``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def run_folder(cfg: TrainConfig) -> Path:
    if cfg.resume:
        path = Path(cfg.resume)
        return path if (path / "config.yaml").exists() else resolve_checkpoint(path).parent.parent
    name = cfg.name or time.strftime(f"{cfg.baseline}-%Y%m%d-%H%M%S")
    folder = Path(cfg.out) / name
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """A classifier, or for ``task='contrastive'`` an image-text two-tower model."""
    if cfg.task == "contrastive":
        model = create_image_text_model(
            cfg.model, loss=cfg.loss, image_overrides=cfg.model_args,
            text_depth=cfg.text_depth, text_max_len=cfg.text_max_len,
        )  # fmt: skip
    else:
        model = NaViT(resolve_config(cfg.model, **{**cfg.model_args, "num_classes": num_classes}))
    if cfg.init_from:  # fine-tuning: take every weight whose name and shape match
        weights = load_weights(resolve_checkpoint(cfg.init_from))
        own = model.state_dict()
        usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(usable, strict=False)
        skipped = sorted(set(own) - set(usable))
        if skipped:
            print(f"init_from: {len(usable)} tensors loaded, re-initialised {skipped}")
    return model


def check_captions(source, spec: str) -> None:
    """Image-text training needs a caption per image: fail now, not in every worker."""
    try:
        source.caption(0)
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"--task contrastive needs captions, but data {spec!r} has none ({error}); use the "
            "built-in synthetic data or a manifest with a 'caption' column"
        ) from error


def endless(loader: PackedLoader) -> Iterator[LoaderBatch]:
    """Batches across epochs. Under torchrun every rank runs the same number of *steps*, whatever
    its shard packs into, so no rank waits at an epoch end for a collective that never comes."""
    while True:
        fresh, produced = loader.at_epoch_start, False
        for item in loader:
            produced = True
            yield item
        if fresh and not produced:
            raise RuntimeError(
                f"no image of the training data could be loaded in epoch {loader.epoch - 1}: "
                f"{dict(loader.skipped)}"
            )


def planned_steps(cfg: TrainConfig, train_source, native: ImagePipeline, square_tokens: int | None,
                  world_size: int) -> int:
    """Steps for ``cfg.epochs`` over the global training set, from the mean tokens per image."""
    if cfg.max_steps:
        return cfg.max_steps
    tokens = square_tokens or mean_native_tokens(train_source, native, sample=64)
    per_seq = min(cfg.max_images_per_seq, cfg.seq_len / tokens)
    return math.ceil(cfg.epochs * len(train_source) / (world_size * cfg.seqs_per_batch * per_seq))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate at each token budget, write the run folder; returns the summary.

    Runs alone or under ``torchrun`` (each rank trains on a disjoint shard; rank 0 logs and
    writes checkpoints).
    """
    device = pick_device(cfg.device)
    info = D.init_distributed(device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    try:
        return _train(cfg, device, info)
    finally:
        # The DDP wrapper (in _train's frame) must be freed before the group: a Reducer that drops
        # the last reference to a gloo group does so holding the GIL, and can deadlock with a
        # gloo worker thread that needs the GIL to free its last finished collective.
        gc.collect()
        D.shutdown()


def _train(cfg: TrainConfig, device: torch.device, info: D.DistInfo) -> dict[str, Any]:
    torch.manual_seed(cfg.seed + info.rank)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) - cfg.workers))
    source = open_source(cfg.data)
    if cfg.val_data:
        train_source, val_source = source, open_source(cfg.val_data)
    else:
        train_source, val_source = split_holdout(source, cfg.val_fraction, cfg.seed)
    class_names = list(source.class_names)
    if cfg.task == "contrastive":
        check_captions(train_source, cfg.data)
    model = build_model(cfg, len(class_names)).to(device)
    contrastive = isinstance(model, ImageTextModel)
    patch = (model.config.image if contrastive else model.config).patch_size
    tokenizer = model.tokenizer() if contrastive else None

    native = make_pipeline(cfg, patch, square_tokens=None)
    square_tokens = None
    if cfg.baseline == "square":
        # Same mean token count as NaViT sees at native resolution, but every image squashed.
        square_tokens = max(1, round(math.sqrt(mean_native_tokens(train_source, native)))) ** 2
    pipeline = make_pipeline(cfg, patch, square_tokens=square_tokens)
    total_steps = D.broadcast_object(
        planned_steps(cfg, train_source, native, square_tokens, info.world_size) if info.is_main else None, info
    )

    # The run folder appears only once data and model are known to be usable.
    folder = D.broadcast_object(run_folder(cfg) if info.is_main else None, info)
    if info.is_main:
        (folder / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

    loader = PackedLoader(
        shard(train_source, info.rank, info.world_size) if info.enabled else train_source,
        pipeline,
        seq_len=cfg.seq_len,
        num_seqs=cfg.seqs_per_batch,
        max_images_per_seq=cfg.max_images_per_seq,
        buffer_size=cfg.buffer_size,
        train=True,
        seed=cfg.seed,
        num_workers=cfg.workers,
        dropper=make_dropper(cfg),
        drop_schedule=DropSchedule(cfg.drop_schedule, 1.0, cfg.drop_schedule_end),
        total_images=cfg.epochs * len(train_source) // info.world_size,
        fail_fast=cfg.fail_fast,
        captions=contrastive,
    )

    wrapped = D.wrap_model(model, info, cfg.distributed, device)
    no_decay = {n for n, p in model.named_parameters() if p.dim() < 2 or "pos_embed" in n or "probe" in n}
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0},
    ]
    # fused: one kernel over all parameters (about 3x faster than foreach on CPU for ViT-Ti).
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg, total_steps))

    step = 0
    if cfg.resume:
        checkpoint = resolve_checkpoint(cfg.resume)
        meta = load_meta(checkpoint)
        state = load_train_state(checkpoint)
        D.load_full_state(wrapped, optimizer, load_weights(checkpoint), state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader_states = meta["loader"]
        if len(loader_states) == info.world_size:
            torch.set_rng_state(state["torch_rng"][info.rank])
            loader.load_state_dict(loader_states[info.rank])
        else:  # another world size: shards differ, so start the saved epoch afresh
            loader.epoch = int(loader_states[0]["epoch"])
            if info.is_main:
                print(f"resuming {len(loader_states)}-rank data state on {info.world_size} rank(s): "
                      f"epoch {loader.epoch} restarts")
        step = int(meta["step"])
        if info.is_main:
            print(f"resumed from {checkpoint} at step {step}")

    forward = torch.compile(wrapped) if cfg.compile else wrapped
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    metrics = MetricsLogger(folder, resume=bool(cfg.resume)) if info.is_main else None

    def checkpoint_now() -> None:
        # Gathering full states is collective: every rank takes part, rank 0 writes.
        weights = D.full_model_state(wrapped, info)
        optimizer_state = D.full_optimizer_state(wrapped, optimizer, info)
        loader_states = D.all_gather_object(loader.state_dict(), info)
        rng_states = D.all_gather_object(torch.get_rng_state(), info)
        if not info.is_main:
            return
        meta = {
            "step": step,
            "task": cfg.task,
            "model_config": model.config.to_dict(),
            "class_names": class_names,
            "loader": loader_states,
            "world_size": info.world_size,
            "square_tokens": square_tokens,
            "patch_size": patch,
            "max_tokens": cfg.max_tokens,
        }
        train_state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "torch_rng": rng_states}
        save_checkpoint(folder / "checkpoints", f"step_{step:08d}", weights, meta, train_state)

    start = time.perf_counter()
    window = {"images": 0, "tokens": 0, "slots": 0, "loss_sum": 0.0, "time": time.perf_counter()}
    stream = endless(loader)
    model.train()
    with tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0,
              disable=not info.is_main) as bar:
        while step < total_steps:
            item = next(stream).to(device)
            if contrastive:
                ids, mask = (t.to(device) for t in tokenizer.encode(item.captions))
                with autocast:
                    img, txt = forward(item.batch, ids, mask)
                loss, loss_sum, images = global_contrastive_loss(model, img, txt, cfg, info, device)
            else:
                with autocast:
                    logits = forward(item.batch)
                loss, loss_sum, images = global_loss(logits, item.labels, cfg, info, device)
            if not all_finite(loss, info, device):
                if cfg.nan_policy == "stop":
                    raise FloatingPointError(
                        f"non-finite loss at step {step + 1}; stopping (use --nan-policy skip to skip such steps)"
                    )
                print(f"warning: non-finite loss at step {step + 1}; step skipped")
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                bar.update(1)
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            window["images"] += images
            window["tokens"] += item.batch.num_real_tokens
            window["slots"] += item.batch.segment_ids.numel()
            window["loss_sum"] += loss_sum.item()
            if step % cfg.log_every == 0:
                elapsed = time.perf_counter() - window["time"]
                tokens = D.sum_over_ranks(window["tokens"], info, device)
                slots = D.sum_over_ranks(window["slots"], info, device)
                loss_total = D.sum_over_ranks(window["loss_sum"], info, device)
                record = {
                    "step": step,
                    "epoch": loader.epoch,
                    "loss": round(loss_total / window["images"], 5),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": round(float(grad_norm), 4),
                    "images_per_s": round(window["images"] / elapsed, 2),
                    "tokens_per_s": round(tokens / elapsed, 1),
                    "padding": round(1 - tokens / slots, 5),
                    "images_per_batch": round(window["images"] / cfg.log_every / info.world_size, 2),
                }
                if metrics is not None:
                    metrics.log(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    img_s=f"{record['images_per_s']:.0f}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    pad=f"{100 * record['padding']:.1f}%",
                )
                window = {"images": 0, "tokens": 0, "slots": 0, "loss_sum": 0.0, "time": time.perf_counter()}
            bar.update(1)
            if step % cfg.save_every == 0 or step == total_steps:
                checkpoint_now()
    train_seconds = time.perf_counter() - start
    skipped = sum(loader.skipped.values())
    if skipped:
        print(f"rank {info.rank}: skipped {skipped} unreadable images: {dict(loader.skipped)}")

    # Every rank evaluates the same validation set (FSDP needs all ranks in each forward);
    # rank 0 reports.
    results = evaluate_budgets(
        ZeroShotClassifier(model, tokenizer, class_names) if contrastive else wrapped,
        val_source,
        patch_size=patch,
        max_tokens=cfg.max_tokens,
        budgets=cfg.eval_budgets,
        square=cfg.baseline == "square",
        native_square_tokens=square_tokens,
        seq_len=cfg.seq_len,
        device=device,
        workers=cfg.workers,
    )
    summary = {
        "run_folder": str(folder),
        "steps": step,
        "world_size": info.world_size,
        "train_seconds": round(train_seconds, 1),
        "val_accuracy": results["native"]["accuracy"],
        "accuracy_vs_tokens": results,
        "skipped_images": dict(loader.skipped),
    }
    if info.is_main:
        write_budget_report(results, folder, title=f"{cfg.baseline} ({folder.name})")
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        metrics.close()
    return summary


def global_contrastive_loss(
    model: ImageTextModel, img: torch.Tensor, txt: torch.Tensor, cfg: TrainConfig, info: D.DistInfo,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The chunked contrastive loss over the images of all ranks (every rank gets its value).

    Each rank receives the full gradient for its own embeddings; DDP's averaging over ranks is
    undone by the world-size factor, as for classification.
    """
    group = torch.distributed.group.WORLD if info.enabled else None
    loss = model.contrastive_loss(img.float(), txt.float(), chunk_size=cfg.chunk_size, group=group)
    images = int(D.sum_over_ranks(img.shape[0], info, device))
    return loss * info.world_size, loss.detach() * img.shape[0], images


def global_loss(
    logits: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, info: D.DistInfo, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(loss to backpropagate, local loss sum, images in the step on all ranks).

    Ranks hold different numbers of images, so each normalises its sum by the global count;
    DDP then averages gradients over ranks, which the world-size factor undoes. The gradient is
    exactly that of the mean loss over every image of the step.
    """
    loss_sum = classification_loss(logits, labels, cfg, reduction="sum")
    images = int(D.sum_over_ranks(labels.numel(), info, device))
    return loss_sum * info.world_size / images, loss_sum, images


def all_finite(loss: torch.Tensor, info: D.DistInfo, device: torch.device) -> bool:
    """Whether the loss is finite on every rank (a skip must be agreed by all)."""
    bad = 0 if torch.isfinite(loss).item() else 1
    return D.sum_over_ranks(bad, info, device) == 0
