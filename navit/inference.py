"""Loading a trained model and predicting labels for image files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from navit.checkpoint import load_meta, load_weights, resolve_checkpoint
from navit.config import NaViTConfig
from navit.data.decode import load_rgb
from navit.data.transforms import ImagePipeline
from navit.model import NaViT
from navit.packing import pack
from navit.two_tower import ImageTextModel
from navit.zeroshot import ZeroShotClassifier


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A classifier and its metadata from a checkpoint, checkpoints folder or run folder.

    An image-text checkpoint comes back as a zero-shot classifier over its class names.
    """
    checkpoint = resolve_checkpoint(path)
    meta = load_meta(checkpoint)
    contrastive = meta.get("task") == "contrastive"
    model = ImageTextModel.from_dict(meta["model_config"]) if contrastive else NaViT(
        NaViTConfig.from_dict(meta["model_config"])
    )
    try:
        model.load_state_dict(load_weights(checkpoint))
    except RuntimeError as error:
        raise ValueError(f"weights in {checkpoint} do not match its config: {error}") from error
    if contrastive:
        model = ZeroShotClassifier(model.eval(), model.tokenizer(), meta["class_names"])
    return model.to(device).eval(), meta


def inference_pipeline(meta: dict[str, Any], budget: int | None) -> ImagePipeline:
    """Native resolution (or a token budget), or the square baseline the model was trained with."""
    max_tokens = max(meta["max_tokens"], budget or 0)
    square = meta.get("square_tokens")
    if square:
        side = int((budget or square) ** 0.5)
        return ImagePipeline(patch_size=meta["patch_size"], max_tokens=max_tokens, square_tokens=side * side)
    return ImagePipeline(patch_size=meta["patch_size"], max_tokens=max_tokens, token_budget=budget)


@dataclass
class Prediction:
    path: str
    labels: list[tuple[str, float]]  # (class name, probability), best first
    tokens: int
    error: str | None = None


@torch.no_grad()
def predict_files(
    model: NaViT, meta: dict[str, Any], paths: list[str], *, topk: int = 5, budget: int | None = None
) -> list[Prediction]:
    """Top-k labels per file; a file that cannot be read gets an error and the rest go on."""
    pipeline = inference_pipeline(meta, budget)
    names = meta["class_names"]
    tokens, ok, results = [], [], {}
    for i, path in enumerate(paths):
        try:
            tokens.append(pipeline(load_rgb(path)))
            ok.append(i)
        except Exception as error:  # reported per file
            results[i] = Prediction(str(path), [], 0, error=str(error))
    if tokens:
        device = next(model.parameters()).device
        batch = pack(tokens, max(t.num_tokens for t in tokens) * 4, max_images_per_seq=16).batch
        probs = model(batch.to(device)).float().softmax(-1).cpu()
        k = min(topk, probs.shape[-1])
        values, indices = probs.topk(k, dim=-1)
        for row, i in enumerate(ok):
            labels = [(names[j], float(p)) for p, j in zip(values[row].tolist(), indices[row].tolist())]
            results[i] = Prediction(str(paths[i]), labels, tokens[row].num_tokens)
    return [results[i] for i in range(len(paths))]
