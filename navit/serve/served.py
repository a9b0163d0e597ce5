"""The model a server holds: inputs to examples, and a packed batch to one JSON-able output per input.

Predictions go through the model's task (``task.predict``, the function ``navit predict --json``
uses), so any registered task is served without a change here: arrays in its outputs become
base64 PNGs (2-D uint8, such as segmentation masks) or lists. Embeddings are the model's pooled
vectors, or ``encode_image`` / ``encode_text`` for an image-text model.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import inspect
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from navit.batch import Example, PackedBatch


class ServedModel:
    """A model with its task (None: embeddings only), ready for packed batches on ``device``."""

    def __init__(self, model: nn.Module, task: Any, name: str, device: torch.device | str = "cpu") -> None:
        self.model = model.eval()
        self.task = task
        self.inference = task.inference_model(model).eval() if task is not None else self.model
        self.name = name
        self.device = torch.device(device)
        self.processor = model.processor
        if self.processor is None:
            raise ValueError(f"model {name} has no processor (it takes packed examples only), so it cannot be served")
        # Options a request may set beyond topk: keywords of the task's predict, or (as a detector's
        # threshold) fields of its options, which a request overrides on a copy of the task.
        accepted = inspect.signature(task.predict).parameters if task is not None else {}
        self.predict_keywords = tuple(k for k in accepted if k not in ("self", "model", "batch", "topk", "inputs"))
        options = getattr(task, "options", None)
        fields = {f.name for f in dataclasses.fields(options)} if dataclasses.is_dataclass(options) else set()
        self.option_fields = tuple(k for k in ("threshold",) if k in fields and k not in self.predict_keywords)
        self.predict_options = (*self.predict_keywords, *self.option_fields)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", arch: str | None = None) -> "ServedModel":
        """A navit checkpoint (its task from its metadata) or a pretrained SigLIP2 / timm folder
        (a classifier when it has classes, else embeddings only)."""
        from navit import pretrained
        from navit.inference import load_checkpoint

        name = Path(path).name or str(path)
        if pretrained.kind(path, arch) is None:
            model, task, _ = load_checkpoint(path, device)
            return cls(model, task, name, device)
        model = pretrained.load_pretrained(path, arch).to(device)
        task = None
        if getattr(model, "num_classes", 0) and getattr(model, "pool", None) is not None:
            from navit.tasks.classify import Classification

            names = getattr(model, "class_names", None) or [str(i) for i in range(model.num_classes)]
            task = Classification(None, names)
        return cls(model, task, name, device)

    # -- what the model is -----------------------------------------------------------------------
    @property
    def image_encoder(self) -> Any:
        """What gives image embeddings: the image-text model (``encode_image``), a model that
        pools (``embed``), or None (a segmenter reads tokens and pools nothing)."""
        if hasattr(self.model, "encode_image"):
            return self.model
        return self.model if getattr(self.model, "pool", None) is not None else None

    @property
    def text_encoder(self) -> Any:
        has = hasattr(self.model, "encode_text") and callable(getattr(self.model, "tokenizer", None))
        return self.model if has else None

    def describe(self) -> dict[str, Any]:
        """The ``/v1/models`` entry of this model."""
        return {
            "id": self.name,
            "object": "model",
            "owned_by": "navit",
            "task": self.task.name if self.task is not None else None,
            "class_names": self.task.class_names if self.task is not None else [],
            "processor": self.processor.to_dict(),
            "predict_options": ["budget", "topk", *self.predict_options],
            "embeddings": self.image_encoder is not None,
            "text_embeddings": self.text_encoder is not None,
        }

    # -- inputs ----------------------------------------------------------------------------------
    def to_example(self, picture: Any, budget: int | None, name: str) -> Example:
        """One decoded picture (or clip object) as the model's tokens, as ``navit predict`` makes them."""
        return self.processor.to_example(picture, budget=budget, name=name)

    def warm_up(self) -> None:
        """One small forward of each kind, so the first request pays no first-call costs."""
        example = self.to_example(Image.new("RGB", (64, 48), (128, 128, 128)), None, "warm-up")
        from navit.packing import pack

        batch = pack([example], max(self.processor.max_tokens, example.num_tokens)).batch
        if self.task is not None:
            self.predict(batch, [Image.new("RGB", (64, 48))], {"topk": 1})
        if self.image_encoder is not None:
            self.embed(batch)

    # -- forwards --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: PackedBatch, sources: list[Any], options: dict[str, Any]) -> list[dict[str, Any]]:
        """The task's output for each example of ``batch`` (in its input order), JSON-able."""
        if self.task is None:
            raise ValueError(f"model {self.name} has no task to predict with; ask /v1/embeddings")
        task = self.task
        overrides = {k: options.pop(k) for k in self.option_fields if k in options}
        if overrides:
            task = copy.copy(task)
            task.options = dataclasses.replace(task.options, **overrides)
        outputs = task.predict(self.inference, batch.to(self.device), inputs=sources, **options)
        return [jsonable(output) for output in outputs]

    @torch.no_grad()
    def embed(self, batch: PackedBatch) -> list[list[float]]:
        encoder = self.image_encoder
        if encoder is None:
            raise ValueError(f"model {self.name} pools no vectors (its head reads tokens), so it gives no embeddings")
        batch = batch.to(self.device)
        vectors = encoder.encode_image(batch) if hasattr(encoder, "encode_image") else encoder.embed(batch)
        return vectors.float().cpu().tolist()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> list[list[float]]:
        encoder = self.text_encoder
        if encoder is None:
            raise ValueError(f"model {self.name} has no text tower; give images")
        ids, mask = encoder.tokenizer().encode(texts)
        return encoder.encode_text(ids.to(self.device), mask.to(self.device)).float().cpu().tolist()

    def text_tokens(self, text: str) -> int:
        ids, mask = self.text_encoder.tokenizer().encode([text])
        return int(mask.sum())


def jsonable(value: Any) -> Any:
    """A task output as JSON: 2-D uint8 arrays (label maps) as base64 palette PNGs, other arrays
    as lists, numpy scalars as numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim == 2 and value.dtype == np.uint8:
            return png_base64(value)
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def png_base64(labels: np.ndarray) -> str:
    """A map of class indices as a base64 palette PNG (pixel values are the indices)."""
    from navit.data.segmentation import palette_mask

    buffer = io.BytesIO()
    palette_mask(Image.fromarray(labels)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
