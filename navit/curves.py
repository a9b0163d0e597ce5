"""Loss curves: ``loss_curves.png`` in a run folder, drawn from its ``metrics.jsonl`` (and its
``summary.json``, once the run has validated), so a run that does not learn shows at a glance.

The left panel is the training loss of every metric record and its running mean, against the
step; the validation loss of the passes during training (``val_loss`` of a record, see
:mod:`navit.validation`) and any other ``val_*`` figures of the records are drawn on their
steps, and the final validation figures of ``summary.json`` head the panel. The right panel is
the learning rate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = "loss_curves.png"


def read_records(folder: str | Path) -> list[dict[str, Any]]:
    """The metric records of a run folder (a line cut short by a crash is skipped)."""
    path = Path(folder) / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r.get("step"), (int, float)) and isinstance(r.get("loss"), (int, float))]


def running_mean(values: list[float], width: int) -> list[float]:
    """Mean of the last ``width`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def validation_points(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``val_*`` key -> its (step, value) points: the records where it was measured (a number)."""
    keys = sorted({k for r in records for k in r if k.startswith("val_")})
    points = {key: [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))] for key in keys}
    return {key: values for key, values in points.items() if values}


def plot_loss_curves(folder: str | Path) -> Path | None:
    """Write ``loss_curves.png`` into ``folder``; None (and nothing written) without records."""
    records = read_records(folder)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    left.plot(steps, losses, color="tab:blue", alpha=0.35, label="training loss (each record)")
    left.plot(steps, running_mean(losses, 5), color="tab:blue", label="training loss (mean of 5 records)")
    for key, points in validation_points(records).items():
        label = "validation loss" if key == "val_loss" else key.replace("_", " ")
        left.plot(*zip(*points), marker="o", color="tab:red" if key == "val_loss" else None, label=label)
    summary = _summary(folder)
    title = "loss"
    for key, value in summary.items():
        if key.startswith("val_") and isinstance(value, (int, float)):
            title += f" (final {key.replace('_', ' ')}: {value:.4g})"
    left.set(xlabel="step", ylabel="loss", title=title)
    left.legend(fontsize=8)
    right.plot(steps, [r.get("lr", float("nan")) for r in records], color="tab:orange")
    right.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    out = Path(folder) / FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _summary(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "summary.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}
