"""Training FLOPs of one example, for setting experiments' compute budgets."""

from __future__ import annotations

import math

import torch

from navit.model import NaViT
from navit.packing import pack
from navit.batch import Example


def example_flops(cfg, tokens: int) -> int:
    """Training FLOPs of one example of ``tokens`` tokens under ``cfg``'s model (alone in a
    sequence of exactly its length, no padding; the classifier head left out)."""
    config = cfg.model_config().replace(num_classes=0)
    side = math.isqrt(tokens)
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(tokens // side), indexing="ij"), -1).reshape(-1, 2)
    example = Example(torch.zeros(len(coords), config.patch_dim), coords, (side, tokens // side))
    return NaViT(config).flops(pack([example], len(coords)).batch, training=True)
