"""Models saved and loaded together with their task, class names and preprocessing; prediction.

A checkpoint's ``meta.json`` holds everything needed to rebuild and feed the model: the task and
its options, the model config, the class names and the :class:`~navit.processor.Processor`.
"""

from __future__ import annotations

import glob
import inspect
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from navit.checkpoint import load_meta, load_weights, resolve_checkpoint, write_checkpoint
from navit.data.files import walk
from navit.media import is_media_name
from navit.packing import pack
from navit.processor import Processor
from navit.tasks import Task, get_task, task_of


def checkpoint_meta(task: Task, model: nn.Module, processor: Processor) -> dict[str, Any]:
    """The part of ``meta.json`` that rebuilds the model and its preprocessing: the task, the
    model's config (for a NaViT, its encoder's), its head (``{"name": ..., **config}``, or None)."""
    return {
        "task": task.name,
        "task_options": task.options_dict(),
        "model": task.model_to_dict(model),
        "head": task.head_to_dict(model),
        "class_names": task.class_names,
        "processor": processor.to_dict(),
    }


def save_model(
    model: nn.Module, folder: str | Path, *, class_names: list[str] | None = None, task: Task | str | None = None
) -> Path:
    """Save ``model``, its task, processor and class names as a checkpoint folder that
    :func:`load_model` reads. The task is by default the one that builds models of ``model``'s
    class (a :class:`navit.NaViT` classifies, a segmenter segments, an image-text model is
    contrastive) with its default options; pass a :class:`~navit.tasks.Task` to keep its options
    and class names (e.g. a classifier trained with one sigmoid per class)."""
    if not isinstance(task, Task):
        task = get_task(task or task_of(model))
    classes = model.num_classes  # None: the model takes any class names (zero-shot)
    names = list(class_names if class_names is not None else task.class_names or map(str, range(classes or 0)))
    if classes is not None and len(names) != classes:
        raise ValueError(f"the model has {classes} classes but {len(names)} class names were given")
    task = type(task)(task.options, names)
    meta = checkpoint_meta(task, model, model.processor)
    with torch.device("meta"):  # what load_model will build, without memory
        expected = build_from_meta(task, meta, model.processor).state_dict()
    weights = model.state_dict()
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in expected.items()}:
        differ = sorted(set(weights) ^ set(expected)) or [k for k in weights if weights[k].shape != expected[k].shape]
        raise ValueError(f"a {type(model).__name__} does not load back as task {task.name!r}'s model (weights "
                         f"{differ[:3]} differ); pass the task it belongs to")  # fmt: skip
    return write_checkpoint(folder, weights, meta)


def build_from_meta(task: Task, meta: dict[str, Any], processor: Processor) -> nn.Module:
    """The (untrained) model a checkpoint's metadata describes. Checkpoints written before heads
    were saved have no ``"head"``: the task's model class builds the head its config implies."""
    head = meta.get("head")
    # A plug-in task written before heads were saved rebuilds its model from the config alone.
    if head is None or "head" not in inspect.signature(task.model_from_dict).parameters:
        return task.model_from_dict(meta["model"], processor)
    return task.model_from_dict(meta["model"], processor, head)


def _upgrade(meta: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints written before the processor was saved: derive it from the old fields."""
    if "processor" in meta or "model_config" not in meta:
        return meta
    config = meta["model_config"]
    image = config.get("image", config)
    square = meta.get("square_tokens")
    processor = Processor(patch_size=meta["patch_size"], channels=image.get("in_chans", 3),
                          max_tokens=square or meta["max_tokens"], grid_rule="square" if square else "native")  # fmt: skip
    return {**meta, "model": config, "task_options": {}, "processor": processor.to_dict()}


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Task, dict[str, Any]]:
    """(trained model in eval mode, its task, the checkpoint's metadata) from a checkpoint
    folder or file in it, a checkpoints folder or a run folder."""
    checkpoint = resolve_checkpoint(path)
    meta = _upgrade(load_meta(checkpoint))
    missing = [key for key in ("task", "model", "class_names", "processor") if key not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata {checkpoint / 'meta.json'} lacks {missing}")
    task = get_task(meta["task"], meta.get("task_options"), meta["class_names"])
    model = build_from_meta(task, meta, Processor.from_dict(meta["processor"]))
    try:
        model.load_state_dict(load_weights(checkpoint))
    except RuntimeError as error:
        raise ValueError(f"weights in {checkpoint} do not match its config: {error}") from error
    return model.to(device).eval(), task, meta


def load_model(path: str | Path, device: torch.device | str = "cpu", *, arch: str | None = None) -> nn.Module:
    """A trained model, ready for inference, from a run folder, checkpoint folder or file, or a
    pretrained model (see :mod:`navit.pretrained`): a local Hugging Face SigLIP2 NaFlex folder, a
    timm NaFlexViT folder, or a timm weights file with its model name ``arch``.

    ``model.processor`` turns files, PIL images and tensors into its batches exactly as in
    training and evaluation; ``model(batch)`` gives logits over ``model.class_names``, one row per
    input. An image-text model comes back as a zero-shot classifier over its class names. A
    pretrained SigLIP2 model comes back as it is: the vision model's ``model(batch)`` is one
    pooled vector per input; the two-tower model has ``encode_image``, ``encode_text`` and its
    folder's tokenizer (``model.tokenizer()``). A timm model gives its logits, or with no
    classifier its pooled vectors.
    """
    from navit import pretrained

    if pretrained.kind(path, arch) is not None:
        return pretrained.load_pretrained(path, arch).to(device)
    model, task, _ = load_checkpoint(path, device)
    inference = task.inference_model(model).to(device).eval()
    inference.class_names = task.class_names
    return inference


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Files, folders (their image and video files, recursively through links, sorted; hidden
    entries skipped, as the training loader does) and globs (their image and video files), in the
    order given. A path that exists is taken as it is, even with glob characters in its name.

    A pattern that matches nothing stays in the list, so its error is reported in place.
    """
    paths: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            paths.extend(os.path.join(folder, name) for folder, names in walk(pattern) for name in names
                         if is_media_name(name))  # fmt: skip
        elif glob.has_magic(pattern) and not os.path.exists(pattern):
            found = [p for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p) and is_media_name(p)]
            paths.extend(found or [pattern])
        else:
            paths.append(pattern)
    return paths


@torch.no_grad()
def predict_files(
    model: nn.Module, task: Task, paths: list[str], *, topk: int = 5, budget: int | None = None,
    batch_size: int = 32, out: str | Path | None = None,
) -> Iterable[dict[str, Any]]:  # fmt: skip
    """One result per path, in order and batch by batch: ``{"path", "tokens", "error"}`` and the
    task's outputs (``"labels"``; for segmentation the ``"mask"`` and ``"overlay"`` files it writes
    into ``out``, named after each input, and the share of each class). A file that cannot be
    read gets an ``error`` and the rest go on."""
    if task.writes_files and out is None and not getattr(task, "out_optional", False):
        raise ValueError(f"a {task.name} model writes its predictions as files: give an output folder (--out)")
    processor = model.processor
    device = next(model.parameters()).device
    names = output_names(paths)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        results: list[dict[str, Any]] = []
        examples, rows = [], []
        for path in chunk:
            try:
                examples.append(processor.to_example(path, budget=budget, name=path))
                rows.append(len(results))
                results.append({"path": path, "tokens": examples[-1].num_tokens, "error": None})
            except Exception as error:  # reported per file
                results.append({"path": path, "tokens": 0, "error": str(error)})
        if examples:
            seq_len = max(processor.max_tokens, budget or 0)
            batch = pack(examples, seq_len).batch.to(device)
            inputs = [chunk[row] for row in rows]
            for row, output in zip(rows, task.predict(model, batch, topk=topk, inputs=inputs)):
                if task.writes_files and out is not None:
                    output = task.save_prediction(output, chunk[row], Path(out), names[start + row])
                results[row].update(output)
        yield from results


def output_names(paths: list[str]) -> list[str]:
    """A distinct file-name stem per path: its own, numbered (-2, -3, ...) when already taken."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = name = Path(path).stem
        number = 1
        while name in taken:
            number += 1
            name = f"{stem}-{number}"
        taken.add(name)
        names.append(name)
    return names
