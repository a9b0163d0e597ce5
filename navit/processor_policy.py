"""The training run's processor: how its baseline (``navit``, ``square`` or ``frame``) and data
options turn the model into the preprocessing that training, evaluation and prediction share."""

from __future__ import annotations

import math
from typing import Any

from navit.config import NaViTConfig
from navit.processor import Processor
from navit.train_data import mean_tokens


def square_tokens(source: Any, processor: Processor) -> int:
    """The square grid with about the mean token count ``processor`` gives ``source``'s images."""
    return max(1, round(math.sqrt(mean_tokens(source, processor)))) ** 2


def make_processor(cfg: Any, config: NaViTConfig, train_source: Any, style: Processor | None) -> Processor:
    """The model's preprocessing: the way of resizing and normalising of ``style`` (fine-tuning:
    the starting checkpoint's processor) with this run's budget and frames; the square baseline
    sees as many tokens per image on average, the frame baseline one frame per clip."""
    d = cfg.data
    kept = {}
    if style is not None:
        kept = dict(grid_rule=style.grid_rule, resample=style.resample, reducing_gap=style.reducing_gap,
                    mean=style.mean, std=style.std)  # fmt: skip
    native = Processor.for_model(config, max_tokens=d.max_tokens, fps=d.fps, frame_stride=d.frame_stride,
                                 max_frames=d.max_frames, **kept)  # fmt: skip
    if cfg.model.baseline == "square":
        return native.replace(grid_rule="square", max_tokens=cfg.model.square_tokens or square_tokens(train_source, native))
    if cfg.model.baseline == "frame":
        if "video" not in train_source.provides:
            raise ValueError("--baseline frame sees one frame per clip, but the training data has no clips")
        return native.replace(max_frames=1)
    return native
