"""Where training starts from: a fresh model of the configured preset, or the weights of a run,
a checkpoint or a pretrained SigLIP2 / timm model (fine-tuning), an image model's inflated for
clips. The ``model`` section of the training config is declared here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from navit import distributed as D
from navit import pretrained
from navit.checkpoint import load_meta, load_weights, resolve_checkpoint
from navit.config import NaViTConfig, check_choices, check_numbers, list_models, option, resolve_config
from navit.model import inflate_weights
from navit.processor import Processor
from navit.processor_policy import make_processor


@dataclass
class ModelSection:
    name: str = option("navit_mini16", f"model preset: {', '.join(list_models())}")
    args: dict[str, Any] = option({}, "model config fields to override, KEY=VALUE (e.g. depth=6 rope=true)")
    baseline: str = option("navit", "navit: native aspect ratio (and duration); square: the ViT baseline, every "
                           "image squashed to a square grid of the same mean token count; frame: clips seen as one "
                           "frame each", choices=("navit", "square", "frame"))  # fmt: skip
    square_tokens: int | None = option(None, "square baseline: tokens per image, a square number (default: the "
                                       "square grid nearest the mean token count at native aspect ratio)")  # fmt: skip
    init_from: str | None = option(None, "run or checkpoint to start from (fine-tuning), or a pretrained model: a "
                                   "Hugging Face SigLIP2 folder, a timm NaFlexViT folder or weights file; every "
                                   "weight whose name and shape match is loaded")  # fmt: skip
    init_arch: str | None = option(None, "timm model name of a bare timm weights file given to --init-from, e.g. "
                                   "naflexvit_base_patch16_gap (a timm folder's config.json names it)")  # fmt: skip

    def __post_init__(self) -> None:
        check_choices(self, "")
        check_numbers(self)
        square = self.square_tokens
        if square is not None and (square < 1 or math.isqrt(square) ** 2 != square):
            raise ValueError(f"square_tokens={square} must be a square number (e.g. 16, 36, 64)")
        if square is not None and self.baseline != "square":
            raise ValueError(f"square_tokens={square} sizes the square baseline: add --baseline square")
        self.config()

    def config(self) -> NaViTConfig:
        """The model's :class:`~navit.NaViTConfig`: the preset with ``args`` on top."""
        return resolve_config(self.name, **self.args)


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


def model_config(cfg: Any, train_source: Any, start: Start | None) -> NaViTConfig:
    """The configured model, or fine-tuning, the starting checkpoint's (``model.args`` on top);
    for data with clips an image model (2 axes) takes tubelets of two frames instead (3 axes),
    fed as their frame sum and frame difference (``tubelet_input="sum-difference"``, unless
    ``model.args`` says otherwise): with the raw frames the model could not fit small sets of
    real clips labelled by motion."""
    config = cfg.model.config()
    if start is not None:
        if not cfg.run.resume:
            print(f"init_from: the model is {start.path}'s ({start.config.embed_dim} wide, {start.config.depth} deep)")
        config = start.config.replace(**cfg.model.args)
    if "video" in train_source.provides and config.num_axes == 2:
        tubelet_input = cfg.model.args.get("tubelet_input", "sum-difference")
        print(f"the data has clips: the model takes tubelets of 2 frames (num_axes=3, temporal_patch_size=2, "
              f"tubelet_input={tubelet_input})")  # fmt: skip
        config = config.replace(num_axes=3, temporal_patch_size=2, tubelet_input=tubelet_input)
    return config


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


def starting_model(cfg: Any, task: Any, train_source: Any, info: D.DistInfo) -> nn.Module:
    """``task``'s model for the run, with its processor, fresh or from ``--init-from``.

    A fine-tuned run resumes with the architecture and preprocessing it was fine-tuned with, read
    from its own checkpoint (the weights come with the resume): its source may be gone. Rank 0
    decides the processor (the square baseline samples the data) and every rank takes it.
    """
    source = (cfg.run.resume, None) if cfg.run.resume else (cfg.model.init_from, cfg.model.init_arch)
    start = start_from(*source) if cfg.model.init_from else None
    config = model_config(cfg, train_source, start)
    style = start.processor if start is not None else None
    processor = D.broadcast_object(make_processor(cfg, config, train_source, style) if info.is_main else None, info)
    model = task.build_model(config, processor)
    if start is not None and not cfg.run.resume:
        initialise_from(model, start)
    return model
