"""Forward+backward time of the attention backends as the packed sequence length L grows.

Each sequence of L tokens holds many small images (token counts ~ U[min, max], default 16..64),
packed contiguously by ``navit.packing.assign_first_fit`` with padding at the end. For each L we
time, in the same process and with the same inputs:

* ``prepare(segment_ids)`` of each backend (``bucketed`` builds its bucket plan here, ``dense``
  its [B, 1, L, L] mask),
* ``attend(q, k, v, state)`` forward only, and forward + backward (q, k, v [B, L, H, D] with
  ``requires_grad``; backward of a fixed random upstream gradient).

``dense`` costs O(L²) per sequence; the others O(Σ nᵢ²) over the images nᵢ, so time / Σnᵢ²
should stay roughly flat for them and time / L² for dense. Times are medians of ``--repeats``
runs after ``--warmup`` runs, the backends alternating within each repeat. Before timing, every
backend is checked against dense at the real tokens.

On CPU the backends are ``dense`` and ``bucketed``; with ``--device cuda`` every backend that runs
there (``varlen`` needs ``--dtype bf16``; ``flex`` is compiled on first use, in the warm-up).
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

# benchmarks/ is on sys.path
from bench_common import NoiseMonitor, add_repeat_options, device_of, interleaved, run_parser, synchronize
from navit.attention import available_backends, get_backend
from navit.batch import PAD
from navit.packing import assign_first_fit
from report import load_average, md_table, plain_args, pyplot, save_figure, write_json

NA = "—"


def build_segment_ids(
    batch: int, seq_len: int, lo: int, hi: int, rng: np.random.Generator
) -> tuple[torch.Tensor, list[list[int]]]:
    """[B, L] segment ids of images with U[lo, hi] tokens packed first-fit, padding at the end."""
    # Enough candidates to fill every sequence; the first-fit packer leaves the rest over.
    count = int(2 * batch * seq_len / ((lo + hi) / 2)) + 8
    lengths = rng.integers(lo, hi + 1, size=count).tolist()
    assign = assign_first_fit(lengths, seq_len, num_seqs=batch)
    seg = torch.full((batch, seq_len), PAD, dtype=torch.long)
    fill = [0] * batch
    per_seq: list[list[int]] = [[] for _ in range(batch)]
    for n, s in zip(lengths, assign):
        if s == PAD:
            continue
        seg[s, fill[s] : fill[s] + n] = len(per_seq[s])
        fill[s] += n
        per_seq[s].append(n)
    return seg, per_seq


def check_agreement(names: list[str], seg: torch.Tensor, heads: int, dim: int, dtype: torch.dtype,
                    seed: int) -> dict[str, float]:
    """Max abs difference of each backend vs dense (outputs and q/k/v grads) at real tokens."""
    g = torch.Generator().manual_seed(seed)
    b, length = seg.shape
    base = [torch.randn(b, length, heads, dim, generator=g).to(seg.device, dtype) for _ in range(3)]
    grad = torch.randn(b, length, heads, dim, generator=g).to(seg.device, dtype)
    real = (seg != PAD)[..., None, None]
    results = {}
    for name in names:
        backend = get_backend(name)
        q, k, v = (t.clone().requires_grad_(True) for t in base)
        out = backend.attend(q, k, v, backend.prepare(seg))
        (out * grad * real).sum().backward()
        results[name] = [(out * real).detach(), q.grad, k.grad, v.grad]
    return {
        name: max(float((a.float() - b.float()).abs().max()) for a, b in zip(results[name], results["dense"]))
        for name in names if name != "dense"
    }


def parse_args(argv: list[str] | None):
    p = run_parser(__doc__, "attention_scaling", precision_flag="--dtype")
    add_repeat_options(p, repeats=15, warmup=3)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--dense-max-len", type=int, default=4096, help="skip dense above this L")
    p.add_argument("--batch", type=int, default=1, help="sequences per batch (B)")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    args = p.parse_args(argv)
    args.out = Path(args.out)
    device_of(p, args.device)
    return args


def backend_names(device: torch.device, dtype: torch.dtype) -> list[str]:
    names = [n for n in available_backends(device) if not (n == "varlen" and dtype == torch.float32)]
    if device.type == "cpu":
        names = [n for n in names if n in ("dense", "bucketed")]  # flex has no CPU backward
    return names


def check_backends(args, names: list[str], device: torch.device, dtype: torch.dtype, rng) -> dict[str, float]:
    seg_check, _ = build_segment_ids(2, 256, args.min_tokens, args.max_tokens, rng)
    errors = check_agreement(names, seg_check.to(device), args.heads, args.head_dim, dtype, args.seed)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for name, err in errors.items():
        print(f"{name} vs dense max |diff| (out, dq, dk, dv; B=2, L=256): {err:.2e}", file=sys.stderr)
        if err > tolerance:
            print(f"WARNING: {name} disagrees with dense", file=sys.stderr)
    return errors


def time_backends(names: list[str], seg: torch.Tensor, shape: tuple, dtype: torch.dtype, args) -> tuple[dict, dict]:
    """Seconds per call of each backend's prepare, forward and forward + backward, interleaved;
    and each backend's prepared state."""
    device = seg.device
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, device=device, dtype=dtype)
    backends = {n: get_backend(n) for n in names}
    states = {n: backends[n].prepare(seg) for n in names}

    def prepare(n):
        backends[n].prepare(seg)

    def forward(n):
        with torch.no_grad():
            backends[n].attend(q, k, v, states[n])

    def fwd_bwd(n):
        q.grad = k.grad = v.grad = None
        backends[n].attend(q, k, v, states[n]).backward(grad_out)

    timings = {
        what: interleaved({n: (lambda n=n, fn=fn: (fn(n), synchronize(device))) for n in names},
                          args.warmup, args.repeats)
        for what, fn in (("prepare", prepare), ("forward", forward), ("fwd_bwd", fwd_bwd))
    }
    return timings, states


def measure(args, length: int, all_names: list[str], dtype: torch.dtype, rng, t_start: float) -> dict:
    """One row of the tables: every backend at sequence length ``length``."""
    seg, per_seq = build_segment_ids(args.batch, length, args.min_tokens, args.max_tokens, rng)
    seg = seg.to(args.device)
    sizes = [n for s in per_seq for n in s]
    row = {"seq_len": length, "batch": args.batch, "images": len(sizes),
           "padding": 1 - sum(sizes) / (args.batch * length), "sum_n2": sum(n * n for n in sizes),
           "L2": args.batch * length * length}  # fmt: skip
    names = [n for n in all_names if not (n == "dense" and length > args.dense_max_len)]
    timings, states = time_backends(names, seg, (args.batch, length, args.heads, args.head_dim), dtype, args)
    for name in all_names:
        if name not in names:
            row[name] = None
            continue
        entry = {}
        for what, per_name in timings.items():
            entry[f"{what}_s"] = statistics.median(per_name[name])
            entry[f"{what}_min_s"] = min(per_name[name])
            entry[f"{what}_all_s"] = per_name[name]
        plan = states[name]
        if name == "bucketed" and plan.dense_mask is None:
            entry["buckets"] = len(plan.buckets)
            entry["bucket_sizes"] = [list(bk.size) for bk in plan.buckets]
            entry["computed_n2"] = sum(g * m * m for g, m in (bk.size for bk in plan.buckets))
        row[name] = entry
        print(f"  L={length} {name}: prepare {entry['prepare_s'] * 1e3:.2f} ms, fwd {entry['forward_s'] * 1e3:.2f} "
              f"ms, fwd+bwd {entry['fwd_bwd_s'] * 1e3:.2f} ms ({time.perf_counter() - t_start:.1f}s)",
              file=sys.stderr)  # fmt: skip
    return row


def cell(entry, what: str) -> str:
    """'median (min)' in ms; '*' marks a median over 1.5× the min (machine noise)."""
    if entry is None:
        return NA
    med, lo = entry[f"{what}_s"], entry[f"{what}_min_s"]
    return f"{med * 1e3:.2f} ({lo * 1e3:.2f})" + ("*" if med > 1.5 * lo else "")


def ratio(d, other, key: str) -> str:
    return f"{d[key] / other[key]:.1f}×" if d and other else NA


def per(entry, work: int) -> str:
    return f"{entry['fwd_bwd_s'] / work * 1e9:.2f}" if entry else NA


def table(headers: list[str], body: list[list]) -> str:
    return md_table(headers, body, "r" * len(headers))


def render(rows: list[dict], all_names: list[str], where: str, args) -> str:
    """The three tables: fwd+bwd with ratios to dense, forward and prepare, and the scaling."""
    fast = [n for n in all_names if n != "dense"]
    cells = [cell(r[n], what) for r in rows for n in all_names for what in ("fwd_bwd", "forward", "prepare")]
    lines = [f"\n### Attention on {where}, {args.dtype} (torch {torch.__version__}, B={args.batch}, H={args.heads}, "
             f"D={args.head_dim}, images U[{args.min_tokens},{args.max_tokens}] tokens; ms per call, median (min) of "
             f"{args.repeats} after {args.warmup} warm-up, backends interleaved)\n"]  # fmt: skip
    headers = ["L", "images"] + [f"{n} fwd+bwd" for n in all_names] + [f"dense/{n} (median)" for n in fast]
    lines.append(table(headers, [[r["seq_len"], r["images"]] + [cell(r[n], "fwd_bwd") for n in all_names]
                                 + [ratio(r["dense"], r[n], "fwd_bwd_s") for n in fast] for r in rows]) + "\n")
    headers = ["L"] + [f"{n} fwd" for n in all_names] + [f"{n} prepare" for n in all_names]
    lines.append(table(headers, [[r["seq_len"]] + [cell(r[n], "forward") for n in all_names]
                                 + [cell(r[n], "prepare") for n in all_names] for r in rows]))
    lines.append("\nScaling (fwd+bwd median): dense should be flat in ns/L², the others flat in ns/Σnᵢ²\n")
    bucketed = "bucketed" in all_names
    headers = (["L", "Σnᵢ²", "L²", "Σnᵢ²/L²", "dense ns/L²"] + [f"{n} ns/Σnᵢ²" for n in fast]
               + (["buckets", "bucket pad (Σ G·m² / Σnᵢ²)"] if bucketed else []))
    body = [[r["seq_len"], r["sum_n2"], r["L2"], f"{r['sum_n2'] / r['L2']:.4f}", per(r["dense"], r["L2"])]
            + [per(r[n], r["sum_n2"]) for n in fast]
            + ([r["bucketed"].get("buckets", "dense"),
                f"{r['bucketed']['computed_n2'] / r['sum_n2']:.2f}" if "computed_n2" in r["bucketed"] else NA]
               if bucketed else [])
            for r in rows]  # fmt: skip
    lines.append(table(headers, body))
    if any(c.endswith("*") for c in cells):
        lines.append("\n`*`: median more than 1.5× the min: the machine was noisy during that measurement.")
    return "\n".join(lines)


def plot(rows: list[dict], all_names: list[str], where: str, args, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        print(f"No plot: matplotlib is not installed (wanted {path})")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, marker in zip(all_names, "os^vD"):
        pts = [(r["seq_len"], r[name]["fwd_bwd_s"]) for r in rows if r[name]]
        ax.plot(*zip(*pts), marker=marker, label=f"{name} fwd+bwd")
    if "bucketed" in all_names:
        pts = [(r["seq_len"], r["bucketed"]["prepare_s"]) for r in rows]
        ax.plot(*zip(*pts), marker=".", linestyle=":", label="bucketed prepare")
    # reference slopes anchored at the largest L each backend ran
    xs = [r["seq_len"] for r in rows]
    dense_pts = [(r["seq_len"], r["dense"]["fwd_bwd_s"]) for r in rows if r["dense"]]
    if dense_pts:
        l0, t0 = dense_pts[-1]
        ax.plot(xs, [t0 * (x / l0) ** 2 for x in xs], color="gray", linestyle="--", linewidth=0.8, label="∝ L²")
    fast = [n for n in all_names if n != "dense"]
    if fast:
        l1, t1 = rows[-1]["seq_len"], rows[-1][fast[0]]["fwd_bwd_s"]
        ax.plot(xs, [t1 * x / l1 for x in xs], color="gray", linestyle="-.", linewidth=0.8, label="∝ L")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L (tokens)")
    ax.set_ylabel("time per call (s)")
    ax.set_title(f"Attention fwd+bwd, {where}, {args.dtype}, H={args.heads} D={args.head_dim}, "
                 f"images U[{args.min_tokens},{args.max_tokens}]", fontsize=9)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)
    print(f"Wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    all_names = backend_names(device, dtype)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()
    monitor = NoiseMonitor(args.threads)
    load = load_average() or 0.0
    if load > 0.5:
        print(f"WARNING: load average {load:.2f} before starting; timings will be noisy", file=sys.stderr)

    errors = check_backends(args, all_names, device, dtype, rng)
    rows = [measure(args, length, all_names, dtype, rng, t_start) for length in args.seq_lens]
    where = f"CPU, {args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(render(rows, all_names, where, args))
    elapsed = time.perf_counter() - t_start
    other = monitor.other_cpu_fraction()
    if other is not None:
        advice = "; rerun on a quiet machine" if other > 0.05 else ""
        print(f"\nOther processes used {100 * other:.0f}% of the machine's {monitor.cores} CPUs during the run "
              f"(load average {load:.2f} at start){advice}")
    for name, err in errors.items():
        print(f"\n{name} vs dense max |diff| (out and grads, B=2, L=256): {err:.2e}")
    print(f"Total time: {elapsed:.1f}s")

    payload = {"benchmark": "attention_scaling", "config": plain_args(args),
               "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
               "device": where, "max_abs_diff_vs_dense": errors, "results": rows, "elapsed_s": elapsed,
               "load_average_at_start": load, "other_processes_cpu_fraction": other}  # fmt: skip
    print(f"Wrote {write_json(payload, args.out)}")
    plot(rows, all_names, where, args, args.plot or args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
