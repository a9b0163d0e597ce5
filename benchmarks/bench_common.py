"""Small helpers shared by the benchmark scripts: timing, machine noise, Markdown tables.

Not part of the ``navit`` package; the scripts put ``benchmarks/`` on ``sys.path`` to import it.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine so far (Linux /proc/stat), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def others_busy_now(seconds: float = 0.5) -> float | None:
    """Fraction of the machine (0..1) used by *other* processes over ``seconds`` while this
    process sleeps. Unlike the load average, it does not count this benchmark's own threads."""
    busy0, own0 = cpu_busy_seconds(), own_cpu_seconds()
    if busy0 is None:
        return None
    time.sleep(seconds)
    busy = cpu_busy_seconds() - busy0 - (own_cpu_seconds() - own0)
    return max(0.0, busy / seconds / (os.cpu_count() or 1))


NOISY_OTHER_CPU = 0.10  # other processes above this fraction of the machine make a table unreliable


class NoiseMonitor:
    """Tracks how much CPU *other* processes used while a section ran.

    ``busy_warning()`` at the start samples other processes' CPU use for half a second (this
    process idle) and warns above ``NOISY_OTHER_CPU``; ``other_cpu_fraction()`` at the end gives
    their use over the whole section as a fraction of the machine (0.5 = one of two cores).
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.cores = os.cpu_count() or 1
        self.start()

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), cpu_busy_seconds(), own_cpu_seconds()

    def busy_warning(self, label: str = "") -> str | None:
        others = others_busy_now()
        self.start()
        if others is not None and others > NOISY_OTHER_CPU:
            msg = (
                f"WARNING{(' [' + label + ']') if label else ''}: other processes use "
                f"{100 * others:.0f}% of the {self.cores}-core machine (load average "
                f"{load_average() or 0:.2f}); absolute times are inflated, ratios between "
                "interleaved implementations are less affected"
            )
            print(msg, file=sys.stderr, flush=True)
            return msg
        return None

    def other_cpu_fraction(self) -> float | None:
        busy = cpu_busy_seconds()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        other = (busy - self.busy0) - (own_cpu_seconds() - self.own0)
        return max(0.0, other / max(wall, 1e-9) / self.cores)


def interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of every ``fns[name]()``, the names alternating within each repeat so a
    burst of machine noise hits all of them alike. The order rotates between repeats so no
    implementation always runs right after the same neighbour."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def synchronize(device) -> None:
    """Wait for queued GPU work, so a timed call ends when its kernels do."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def summarize(times: Sequence[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
        "spread": max(times) / min(times) if min(times) > 0 else float("inf"),
    }


def machine_info(threads: int) -> dict[str, object]:
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


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one char per column (l/r), default: first left."""
    rows = [[str(c) for c in row] for row in rows]
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(res: dict, text: str, out: str | Path) -> None:
    """Print a benchmark's Markdown and write it beside its JSON results (``out``)."""
    import json

    print(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(text + "\n")
    print(f"\nWrote {out}")


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def stall_probe(threads: int, calls: int = 2000, numel: int = 1 << 17) -> dict[str, float]:
    """Detects OpenMP barrier stalls: ``calls`` small parallel ops with ``threads`` threads vs 1.

    On an idle machine 2 threads are faster than 1. When other processes keep a core busy, each
    parallel region waits for a preempted worker thread (often a whole scheduler tick), and many
    small ops become several times slower with more threads than with one. Returns seconds per
    call for both and their ratio (> 1 means more threads are *slower*).
    """
    import torch

    old = torch.get_num_threads()
    a, b = torch.randn(numel), torch.randn(numel)
    out: dict[str, float] = {}
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            torch.add(a, b)
            t0 = time.perf_counter()  # the mean, not the best: stalls are intermittent
            for _ in range(calls):
                torch.add(a, b)
            out[f"threads_{n}_s"] = (time.perf_counter() - t0) / calls
    finally:
        torch.set_num_threads(old)
    out["ratio"] = out[f"threads_{threads}_s"] / out["threads_1_s"]
    return out


def stall_warning(probe: dict[str, float], threads: int) -> str | None:
    if threads > 1 and probe["ratio"] > 0.9:
        return (
            f"WARNING: parallel regions stall: a small op takes {probe['ratio']:.2f}x as long with "
            f"{threads} threads as with 1 (expected ~{1 / threads:.2f}x on an idle machine). Other "
            "processes are using the cores; timings with many small ops are inflated unevenly. "
            "Re-run on a quiet machine, or with --threads 1 for contention-robust ratios."
        )
    return None


def rss_kb() -> int:
    """Resident memory of this process now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def hwm_kb() -> int:
    """Peak resident memory of this process since start or the last :func:`reset_hwm`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_hwm() -> bool:
    """Reset the peak to the current resident memory (Linux >= 4.0); False where that fails."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_parser(doc: str, name: str):
    """The argument parser of a timed benchmark with the options every one has: ``--device``,
    ``--precision``, ``--threads``, ``--seed`` and ``--out`` (default ``results/<name>.json``)."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR / f"{name}.json"))
    return p


def new_result(script: str, argv: list[str] | None, args) -> dict:
    """The start of a benchmark's JSON: its command line, its options and the machine."""
    return {"command": ["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])],
            "args": {k: v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v)
                     for k, v in vars(args).items()},
            "machine": machine_info(args.threads)}  # fmt: skip



def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one ``fn()`` by torch's flop-counter formulas (matmuls and attention; 2 per
    multiply-add), with formulas added for the CPU flash-attention kernels torch lacks.

    A dispatch mode of its own rather than ``FlopCounterMode``, whose module tracker fails on some
    peers' modules (timm's attention pool: "Expected gradient function to be set"). The count runs
    with ``nn.TransformerEncoder``'s inference fast path off: its fused kernel hides the matmuls
    from any counter, and the unfused path does the same arithmetic."""
    import torch
    from torch.utils import flop_counter
    from torch.utils._python_dispatch import TorchDispatchMode

    register_cpu_attention_flops()

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_counter.flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += formula(*args, **kwargs, out_val=out)
            return out

    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with Count():
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return Count.total


def register_cpu_attention_flops() -> None:
    import torch
    from torch.utils import flop_counter as fc

    forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward in fc.flop_registry:
        return

    @fc.register_flop_formula(forward)
    def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    @fc.register_flop_formula(backward)
    def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)
