"""How every benchmark reports: Markdown tables and numbers, run metadata, JSON, Markdown and PNG files.

Not part of the ``navit`` package; the scripts put ``benchmarks/`` on ``sys.path`` to import it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------
# Text


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one char per column (l/r), default: first left."""
    rows = [[str(c) for c in row] for row in rows]
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def heading(title: str, res: dict) -> list[str]:
    """A benchmark report's first lines: its title and the command that made it."""
    return [f"## {title} (`{' '.join(res['command'])}`)", ""]


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


# ------------------------------------------------------------------------------------------------
# Run metadata


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine_info(threads: int | None) -> dict[str, object]:
    """The interpreter, torch, CPU and GPU a benchmark ran on (``threads``: its torch threads, if
    it sets them)."""
    import torch

    info: dict[str, object] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads,
        "load_average_start": load_average(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def plain_args(args) -> dict[str, Any]:
    """A parsed command line as JSON values: paths, devices and the like become strings."""
    return {k: v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v)
            for k, v in vars(args).items()}  # fmt: skip


def new_result(script: str, argv: list[str] | None, args) -> dict:
    """The start of a benchmark's JSON: its command line, its options and the machine."""
    return {"command": ["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])],
            "args": plain_args(args), "machine": machine_info(args.threads)}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Files


def write_json(res: dict, out: str | Path) -> Path:
    """``res`` as JSON at ``out`` (folders created); values JSON lacks are written as strings."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    return out


def write_report(res: dict, text: str, out: str | Path, also: Sequence[Path] = ()) -> None:
    """Print a benchmark's Markdown and write it beside its JSON results (``out``); ``also``: other
    files the benchmark wrote, named in the last line."""
    print(text)
    out = write_json(res, out)
    out.with_suffix(".md").write_text(text + "\n")
    print(f"\nWrote {out}" + "".join(f", {path}" for path in also))


def pyplot():
    """matplotlib's pyplot drawing off-screen (Agg), or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
