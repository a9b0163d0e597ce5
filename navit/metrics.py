"""Training metrics to JSONL and CSV in the run folder, and to TensorBoard when it is installed."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


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
        self._jsonl.close()
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()


def _record_step(line: str) -> float:
    """The step of a JSONL record; a line cut short counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
