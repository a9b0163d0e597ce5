"""Small helpers shared by the benchmark scripts: timing, machine noise, memory, FLOP counting, the
common command-line options and the timed training step. Reporting is in ``report.py``.

Not part of the ``navit`` package; the scripts put ``benchmarks/`` on ``sys.path`` to import it.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from report import RESULTS_DIR, load_average, new_result


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


def run_parser(doc: str, name: str, precision_flag: str = "--precision"):
    """The argument parser of a timed benchmark with the options every one has: ``--device``,
    ``--precision`` (or ``precision_flag``), ``--threads``, ``--seed`` and ``--out`` (default
    ``results/<name>.json``)."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument(precision_flag, choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR / f"{name}.json"))
    return p


def add_batch_options(p, depth: int = 6) -> None:
    """The model depth and packed batch shape of the benchmarks that train on packed sequences."""
    p.add_argument("--depth", type=int, default=depth)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--num-seqs", type=int, default=4)
    p.add_argument("--max-examples-per-seq", type=int, default=32)


def add_repeat_options(p, repeats: int, warmup: int) -> None:
    """How often each timed call runs: ``--warmup`` untimed calls, then ``--repeats`` timed ones."""
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--repeats", type=int, default=repeats)


def parse_run(parser, argv: list[str] | None, script: str):
    """A timed benchmark's options (``device`` as a torch device; torch set to ``--threads``) and
    the start of its JSON."""
    import torch

    args = parser.parse_args(argv)
    args.device = device_of(parser, args.device)
    torch.set_num_threads(args.threads)
    return args, new_result(script, argv, args)


def device_of(parser, name: str):
    """``--device`` as a torch device; a parser error when it names CUDA and torch sees none."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {name}: no CUDA device is visible to torch " + torch.__version__)
    return torch.device(name)


def training_step(model, forward: Callable, loss: Callable, device, bf16: bool, optimizer=None) -> Callable:
    """One timed training step of ``model``: ``forward(model)`` (under bf16 autocast when ``bf16``),
    ``loss(output)`` outside autocast, backward, an optimizer step (default: fused AdamW, lr 1e-4),
    then a wait for the GPU. Returns the step, which returns the loss."""
    import torch

    opt = optimizer if optimizer is not None else torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(model)
        value = loss(out)
        value.backward()
        opt.step()
        synchronize(device)
        return value

    return step


def packed_loader(source, processor, *, seq_len: int, num_seqs: int, max_examples_per_seq: int, buffer_size: int,
                  num_workers: int, seed: int = 0, train: bool = True):  # fmt: skip
    """navit's ``PackedLoader`` over ``source``, its examples made by ``processor`` without
    augmentation: the one place the benchmarks build a loader."""
    from navit.data.loader import PackedLoader
    from navit.ops import train_chain
    from navit.packing import PackingConfig

    packing = PackingConfig(seq_len=seq_len, num_seqs=num_seqs, max_examples_per_seq=max_examples_per_seq,
                            buffer_size=buffer_size)  # fmt: skip
    return PackedLoader(source, train_chain(processor), num_workers=num_workers, packing=packing, seed=seed, train=train)


def time_batches(loader, limit: int, stats: Callable) -> tuple[float, list[float], list]:
    """Batches of ``loader``, at most ``limit``: the time iteration started, the time each batch
    arrived, and ``stats(item)`` of each (the batches themselves are not kept)."""
    start, stamps, kept = time.perf_counter(), [], []
    for item in loader:
        stamps.append(time.perf_counter())
        kept.append(stats(item))
        if len(stamps) >= limit:
            break
    return start, stamps, kept


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
