"""Training metrics: sums over the steps between two records (:class:`Window`), and the records
themselves to JSONL and CSV in the run folder, and to TensorBoard when it is installed; the loss
curves (:mod:`navit.curves`) as a PNG when the logger closes."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import torch

from navit import distributed as D
from navit.curves import plot_loss_curves


class Window:
    """Sums between two metric records, saved with checkpoints so that a resumed run records what
    an uninterrupted one would. ``examples`` and ``count`` (the loss's terms) are over all ranks;
    ``tokens``, ``slots``, ``loss_sum`` and the task's own ``logs`` are this rank's and summed
    over ranks in the record (the logs as their mean over steps and ranks)."""

    SUMS = ("examples", "count", "tokens", "slots", "steps", "loss_sum")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.examples = self.count = self.tokens = self.slots = self.steps = 0
        self.loss_sum = self.seconds_before = 0.0  # seconds_before: training time before a resume
        self.logs: dict[str, float] = {}
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.start

    def state_dict(self) -> dict[str, float]:
        return {**{name: getattr(self, name) for name in self.SUMS}, "logs": dict(self.logs),
                "seconds_before": self.elapsed()}  # fmt: skip

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.reset()
        # A window saved before losses were counted in terms counted examples.
        state = {"count": state.get("examples", 0), **state}
        for name in (*self.SUMS, "seconds_before"):
            setattr(self, name, state[name])
        self.logs = dict(state.get("logs", {}))

    def add(self, *, examples: int, count: int, loss_sum: float, tokens: int, slots: int,
            logs: dict[str, float] | None = None) -> None:  # fmt: skip
        self.steps += 1
        self.examples += examples
        self.count += count
        self.loss_sum += loss_sum
        self.tokens += tokens
        self.slots += slots
        for name, value in (logs or {}).items():
            self.logs[name] = self.logs.get(name, 0.0) + value

    def record(self, info: D.DistInfo, device: torch.device, *, step: int, epoch: float, lr: float,
               grad_norm: torch.Tensor | None, seen: dict[str, int]) -> dict[str, Any]:  # fmt: skip
        """The metrics record (collective: sums over ranks); ``seen``: the run's totals so far."""
        elapsed = self.elapsed()
        tokens = D.sum_over_ranks(self.tokens, info, device)
        slots = D.sum_over_ranks(self.slots, info, device)
        loss_sum = D.sum_over_ranks(self.loss_sum, info, device)
        logs = {name: D.sum_over_ranks(self.logs[name], info, device) / (self.steps * info.world_size)
                for name in sorted(self.logs)}  # fmt: skip
        return {
            "step": step,
            "epoch": epoch,
            "loss": round(loss_sum / max(1, self.count), 5),
            "lr": lr,
            "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
            "examples_per_s": round(self.examples / elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1),
            "padding": round(1 - tokens / slots, 5),
            "examples_per_batch": round(self.examples / self.steps / info.world_size, 2),
            **seen,
            **{name: round(value, 5) for name, value in logs.items()},
        }


class MetricsLogger:
    """Appends one record per call. ``resume_step``: continuing a run from a checkpoint at that
    step, so records logged after it (before a crash) are dropped first: no step is repeated."""

    def __init__(self, folder: str | Path, *, resume_step: int | None = None) -> None:
        self.folder = Path(folder)
        resume = resume_step is not None
        if resume:
            self._truncate(resume_step)
        mode = "a" if resume else "w"
        self._jsonl = open(self.folder / "metrics.jsonl", mode)
        self._csv_file = open(self.folder / "metrics.csv", mode, newline="")
        self._csv: csv.DictWriter | None = None
        self._csv_has_header = resume and (self.folder / "metrics.csv").stat().st_size > 0
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.folder / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is optional
            self._tb = None

    def _truncate(self, step: int) -> None:
        """Keep the records up to ``step``; a last line cut short by a crash goes too."""
        jsonl, table = self.folder / "metrics.jsonl", self.folder / "metrics.csv"
        if jsonl.exists():
            lines = [line for line in jsonl.read_text().splitlines() if line.strip()]
            jsonl.write_text("".join(line + "\n" for line in lines if _record_step(line) <= step))
        if table.exists() and table.stat().st_size:
            with open(table, newline="") as f:
                reader = csv.DictReader(f)
                header = reader.fieldnames
                rows = [row for row in reader if None not in row.values() and int(row["step"]) <= step]
            with open(table, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(rows)

    def log(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._csv is None:
            self._csv = csv.DictWriter(self._csv_file, fieldnames=list(record), extrasaction="ignore")
            if not self._csv_has_header:
                self._csv.writeheader()
        self._csv.writerow(record)
        self._csv_file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Close the files and draw the loss curves (``loss_curves.png``) from the records."""
        self._jsonl.close()
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()
        plot_loss_curves(self.folder)


def _record_step(line: str) -> float:
    """The step of a JSONL record; a line cut short counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
