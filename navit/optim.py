"""The optimizer and its schedule: AdamW with the model's weight-decay exemptions, linear warm-up
and cosine decay, and what ends training (epochs, steps or FLOPs). The ``optim`` section of the
training config is declared here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from navit.config import check_choices, check_numbers, option


@dataclass
class OptimSection:
    epochs: float = option(10, "passes over the training examples (with token dropping too)")
    max_steps: int | None = option(None, "stop after this many steps instead (and schedule the learning rate over them)")
    max_flops: float | None = option(None, "stop after this many training FLOPs instead (over all ranks, as the "
                                     "model counts them; the learning rate is scheduled over them)")  # fmt: skip
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    min_lr: float = option(1e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = option(0.05, "AdamW weight decay (not on the parameters the model exempts)")
    warmup_steps: int = option(100, "steps of linear warm-up (at most a tenth of the run's steps)")
    grad_clip: float = option(1.0, "gradient-norm clipping")
    precision: str = option("fp32", "fp32, or bf16 autocast", choices=("fp32", "bf16"))
    compile: bool = option(False, "torch.compile the model")

    def __post_init__(self) -> None:
        check_choices(self, "")
        check_numbers(self)
        for name in ("lr", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_lr", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs <= 0 and not (self.max_steps or self.max_flops):
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.max_steps and self.max_flops:
            raise ValueError("give max_steps or max_flops, not both")
        if self.max_flops is not None and self.max_flops <= 0:
            raise ValueError(f"max_flops must be > 0, got {self.max_flops}")

    def total_examples(self, train_size: int) -> int:
        """Examples the run trains on: ``epochs`` passes over ``train_size`` examples."""
        return math.ceil(self.epochs * train_size)

    def optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        """AdamW over ``model``'s parameters, without weight decay on those it exempts."""
        no_decay = model.no_weight_decay()
        named = list(model.named_parameters())
        groups = [
            {"params": [p for n, p in named if n not in no_decay], "weight_decay": self.weight_decay},
            {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
        ]
        # fused: one kernel over all parameters
        return torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999), fused=device.type in ("cpu", "cuda"))

    def learning_rate(self, step: int, fraction_done: float) -> float:
        """Linear warm-up over ``warmup_steps``, times a cosine decay to ``min_lr`` over training.

        The warm-up takes at most a tenth of the run (its length read from ``step`` and
        ``fraction_done``): a short run, such as a few epochs over a few hundred clips, would
        otherwise decay before it reaches its peak learning rate."""
        steps = self.warmup_steps
        if fraction_done > 0:
            steps = min(steps, max(1, round(0.1 * step / fraction_done)))
        warmup = min(1.0, (step + 1) / max(1, steps))
        floor = self.min_lr / self.lr
        cosine = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction_done)))
        return self.lr * warmup * cosine
