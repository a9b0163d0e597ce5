"""Evaluation at several token budgets: the paper's "one model, any inference cost" curve.

Each image is resized, aspect kept, to as close to the budget as integer patch grids allow
(the square baseline instead squashes every image to the largest square grid within the budget).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from navit.data.loader import PackedLoader
from navit.data.transforms import ImagePipeline
from navit.model import NaViT


@torch.no_grad()
def accuracy(model: NaViT, loader: PackedLoader, device: torch.device) -> dict[str, float]:
    model.eval()
    correct = images = tokens = 0
    for item in loader:
        item = item.to(device)
        predictions = model(item.batch).argmax(-1)
        correct += int((predictions == item.labels).sum())
        images += item.labels.numel()
        tokens += item.batch.num_real_tokens
    return {"accuracy": correct / max(1, images), "tokens_per_image": tokens / max(1, images), "images": images}


def evaluate_budgets(
    model: NaViT,
    source,
    *,
    patch_size: int,
    max_tokens: int,
    budgets: list[int],
    square: bool = False,
    native_square_tokens: int | None = None,
    seq_len: int = 256,
    device: torch.device | str = "cpu",
    workers: int = 0,
) -> dict[str, dict[str, float]]:
    """Accuracy at native resolution (capped at ``max_tokens``) and at each token budget."""
    device = torch.device(device)
    settings: dict[str, dict[str, Any]] = {"native": {"square_tokens": native_square_tokens}}
    for budget in budgets:
        if square:
            settings[str(budget)] = {"square_tokens": math.isqrt(budget) ** 2}
        else:
            settings[str(budget)] = {"token_budget": budget}
    results = {}
    for name, options in settings.items():
        pipeline = ImagePipeline(patch_size=patch_size, max_tokens=max(max_tokens, *budgets), **options)
        if name == "native" and not square:
            pipeline = ImagePipeline(patch_size=patch_size, max_tokens=max_tokens)
        loader = PackedLoader(
            source,
            pipeline,
            seq_len=max(seq_len, pipeline.max_tokens),
            num_seqs=8,
            buffer_size=64,
            train=False,
            num_workers=workers,
        )
        results[name] = accuracy(model, loader, device)
    return results


def format_budget_table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| budget | tokens/image | accuracy |", "|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['tokens_per_image']:.1f} | {100 * row['accuracy']:.2f}% |")
    return "\n".join(lines)


def write_budget_report(results: dict[str, dict[str, float]], folder: str | Path, *, title: str) -> None:
    """Print the table and write ``eval.json`` and ``accuracy_vs_tokens.png`` to ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    print(f"\nValidation accuracy vs tokens per image, {title}:")
    print(format_budget_table(results))
    (folder / "eval.json").write_text(json.dumps(results, indent=2))
    budgets = [(row["tokens_per_image"], row["accuracy"]) for name, row in results.items() if name != "native"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if budgets:
        xs, ys = zip(*sorted(budgets))
        ax.plot(xs, [100 * y for y in ys], marker="o", label="token budget")
    native = results.get("native")
    if native:
        ax.scatter([native["tokens_per_image"]], [100 * native["accuracy"]], color="red", zorder=3, label="native")
    ax.set_xlabel("tokens per image")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_tokens.png", dpi=120)
    plt.close(fig)
