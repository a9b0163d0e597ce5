"""Ops over item dicts (as big_vision's preprocessing ops): from a source's item to an example.

An op is a picklable callable ``op(item, rng) -> item``: ``rng`` is the item's own generator in
training (seeded by the run's seed, the epoch and the item's key, so results do not depend on the
loader's workers) and None at evaluation, where every op is deterministic. Each op changes the
keys it knows and keeps the others, so a new target is a new key: geometric ops move pictures,
clips, boxes and points together and record the map in ``item["geometry"]``
(:mod:`navit.ops.geometry`); ``tokenize`` makes ``item["example"]`` with the model's processor
(:mod:`navit.ops.tokens`). A task adds its own ops after these (:meth:`navit.tasks.Task.ops`) and
computes its targets from the transformed item. A new op is a class plus one line::

    register_op("jitter", ColourJitter)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from navit.ops.geometry import Affine, RandomCrop, RandomFlip
from navit.ops.resolution import RES_DISTS, RES_MODES, ResolutionSampler, SampleResolution
from navit.ops.tokens import DropTokens, KeepTokens, Tokenize
from navit.processor import Processor
from navit.token_drop import TokenDropper

Op = Callable[[dict[str, Any], "np.random.Generator | None"], dict[str, Any]]

OPS: dict[str, Callable[..., Op]] = {}


def register_op(name: str, factory: Callable[..., Op]) -> None:
    """Make ``factory`` (an op class) available as ``OPS[name]``."""
    OPS[name] = factory


register_op("crop", RandomCrop)
register_op("flip", RandomFlip)
register_op("resolution", SampleResolution)
register_op("tokenize", Tokenize)
register_op("drop", DropTokens)
register_op("keep", KeepTokens)


@dataclass(frozen=True)
class Chain:
    """Ops run in order."""

    ops: tuple[Op, ...]

    def __call__(self, item: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        for op in self.ops:
            item = op(item, rng)
        return item


def train_chain(processor: Processor, *, crop_min: float = 1.0, flip: bool = False,
                resolution: ResolutionSampler | None = None, frames_min: int = 1,
                dropper: TokenDropper | None = None, schedule: Any = None, extra: tuple[Op, ...] = ()) -> Chain:  # fmt: skip
    """Training: crop, flip, sample a resolution, tokenize, drop tokens, then ``extra`` (the task's)."""
    ops: list[Op] = [OPS["crop"](crop_min, 1.0)]
    if flip:
        ops.append(OPS["flip"]())
    ops.append(OPS["resolution"](resolution or ResolutionSampler()))
    ops.append(OPS["tokenize"](processor, frames_min=frames_min))
    if dropper is not None:
        ops.append(OPS["drop"](dropper, schedule))
    return Chain((*ops, *extra))


def eval_chain(processor: Processor, *, budget: int | None = None, keep: int | None = None,
               max_frames: int | None = None, extra: tuple[Op, ...] = ()) -> Chain:  # fmt: skip
    """Evaluation: tokenize at native resolution, or resized to ``budget`` tokens, or with all but
    ``keep`` tokens dropped; ``max_frames`` per clip; then ``extra``."""
    if budget is not None and keep is not None:
        raise ValueError("give budget (resize to it) or keep (drop tokens to it), not both")
    ops: list[Op] = [OPS["tokenize"](processor, budget=budget, max_frames=max_frames)]
    if keep is not None:
        ops.append(OPS["keep"](keep))
    return Chain((*ops, *extra))


__all__ = ["Affine", "Chain", "OPS", "Op", "RES_DISTS", "RES_MODES", "ResolutionSampler", "eval_chain",
           "register_op", "train_chain"]  # fmt: skip
