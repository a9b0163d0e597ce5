"""Evaluation at several token budgets: the paper's "one model, any inference cost" curve.

Each example is resized by the model's processor, aspect kept, to as close to the budget as
integer patch grids allow (a square-baseline processor squashes every image to the largest
square grid within the budget). The task computes the metric.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from navit.data.loader import PackedLoader
from navit.ops import eval_chain
from navit.packing import PackingConfig
from navit.processor import Processor
from navit.tasks import Task


def evaluate_budgets(
    model: nn.Module,
    task: Task,
    source: Any,
    processor: Processor,
    *,
    budgets: list[int],
    frames: list[int] = (),
    by: str = "resize",
    seq_len: int = 256,
    device: torch.device | str = "cpu",
    workers: int = 0,
) -> dict[str, dict[str, float]]:
    """The task's metric at native resolution (capped at the processor's ``max_tokens``), at each
    token budget and, for data with clips, at each number of frames per clip, keyed
    ``"native"``, ``str(budget)`` and ``f"{n} frames"``. A budget is met ``by`` resizing each
    example to it, or by dropping all but that many of its native tokens."""
    if by not in ("resize", "drop"):
        raise ValueError(f"by={by!r}; expected 'resize' or 'drop'")
    if by == "drop" and budgets and task.dense_keys:  # a dropped patch has no prediction to score
        raise ValueError(f"by='drop' cannot evaluate the {task.name!r} task: its dropped patches would have no "
                         "prediction to score; meet the budgets by resizing (--by resize)")
    device = torch.device(device)
    settings = [("native", {})] + [(str(b), {"budget" if by == "resize" else "keep": b}) for b in budgets]
    if "video" in source.provides:
        settings += [(f"{n} frames", {"max_frames": n}) for n in frames]
    results = {}
    for name, options in settings:
        budget = options.get("budget")
        chain = eval_chain(processor, **options, extra=tuple(task.ops(train=False)))
        packing = PackingConfig(seq_len=max(seq_len, processor.max_tokens, budget or 0), num_seqs=8, buffer_size=64)
        loader = PackedLoader(source, chain, targets=task.eval_targets, packing=packing, train=False,
                              num_workers=workers)  # fmt: skip
        results[name] = task.evaluate(model, loader, device)
    return results


def format_budget_table(results: dict[str, dict[str, float]], metric: str = "accuracy") -> str:
    lines = [f"| budget | tokens/example | {metric} |", "|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['tokens_per_example']:.1f} | {100 * row[metric]:.2f}% |")
    return "\n".join(lines)


def write_budget_report(
    results: dict[str, dict[str, float]], folder: str | Path, *, title: str, metric: str = "accuracy"
) -> None:
    """Print the table and write ``eval.json`` and ``{metric}_vs_tokens.png`` to ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    print(f"\nValidation {metric} vs tokens per example, {title}:")
    print(format_budget_table(results, metric))
    (folder / "eval.json").write_text(json.dumps(results, indent=2))
    budgets = [(row["tokens_per_example"], row[metric]) for name, row in results.items() if name.isdigit()]
    frames = [(int(name.split()[0]), row[metric]) for name, row in results.items() if name.endswith(" frames")]
    fig, axes = plt.subplots(1, 2 if frames else 1, figsize=(9 if frames else 5, 3.5), squeeze=False)
    ax = axes[0, 0]
    if budgets:
        xs, ys = zip(*sorted(budgets))
        ax.plot(xs, [100 * y for y in ys], marker="o", label="token budget")
    native = results.get("native")
    if native:
        ax.scatter([native["tokens_per_example"]], [100 * native[metric]], color="red", zorder=3, label="native")
    ax.set_xlabel("tokens per example")
    ax.set_title(title, fontsize=9)
    if frames:
        xs, ys = zip(*sorted(frames))
        axes[0, 1].plot(xs, [100 * y for y in ys], marker="o")
        axes[0, 1].set_xlabel("frames per clip")
        axes[0, 1].set_xscale("log", base=2)
    for each in axes[0]:
        each.set_ylabel(f"validation {metric} (%)")
        each.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / f"{metric}_vs_tokens.png", dpi=120)
    plt.close(fig)
