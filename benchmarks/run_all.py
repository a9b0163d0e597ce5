"""Run every benchmark and write one combined report, ``results/SUMMARY.md``.

    python benchmarks/run_all.py            # full suite (~10-15 min on 2 cores)
    python benchmarks/run_all.py --quick    # ~3-4 min
    /opt/peers-venv/bin/python benchmarks/run_all.py   # with the peers installed (timm, vit-pytorch)
    python benchmarks/run_all.py --device cuda --precision bf16   # on a GPU -> results/cuda-bf16/

Each benchmark runs as its own subprocess of the same interpreter, one after the other (never in
parallel: they time CPU work). Their Markdown output is collected into SUMMARY.md together with
the command, exit status and duration of each; their JSON / PNG files stay next to it in
``benchmarks/results/``. A benchmark that fails is reported and the others still run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import RESULTS_DIR, load_average, stall_probe, stall_warning  # noqa: E402


def benchmarks(args, out: Path) -> list[tuple[str, list[str], Path | None]]:
    """(name, argv after the interpreter, Markdown file it writes itself or None for stdout)."""
    py = [str(HERE / "packing_padding.py"), "--out", str(out / "packing_padding.json")]
    if args.quick:
        py += ["--num-images", "20000"]
    att = [str(HERE / "attention_scaling.py"), "--threads", str(args.threads), "--device", args.device,
           "--dtype", args.precision, "--out", str(out / "attention_scaling.json")]
    if args.quick:
        att += ["--seq-lens", "256", "1024", "4096", "--repeats", "5"]
    peers = [str(HERE / "peers.py"), "--threads", str(args.threads), "--device", args.device,
             "--precision", args.precision, "--out", str(out / "peers.json")]
    peers += (["--quick"] if args.quick else []) + (["--compile"] if args.device == "cuda" else [])
    video = [str(HERE / "video.py"), "--threads", str(args.threads), "--device", args.device,
             "--precision", args.precision, "--out", str(out / "video.json")]
    if args.quick:
        video += ["--repeats", "3", "--loader-clips", "200", "--padding-examples", "5000"]
    siglip2 = [str(HERE / "siglip2.py"), "--threads", str(args.threads), "--device", args.device,
               "--precision", args.precision, "--out", str(out / "siglip2.json")]
    if args.quick:
        siglip2 += ["--images", "8", "--batch-images", "8", "--repeats", "1", "--no-memory"]
    segment = [str(HERE / "segment.py"), "--threads", str(args.threads), "--device", args.device,
               "--precision", args.precision, "--out", str(out / "segment.json")]
    if args.quick:
        segment += ["--repeats", "3"]
    # Timing-sensitive benchmarks first (a quiet machine may not stay quiet); packing_padding
    # only counts tokens, so load does not change its results.
    return [
        ("attention_scaling", att, None),
        ("peers", peers, out / "peers.md"),
        ("video", video, out / "video.md"),
        ("siglip2", siglip2, out / "siglip2.md"),
        ("segment", segment, out / "segment.md"),
        ("packing_padding", py, None),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter versions of every benchmark")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the timed benchmarks")
    p.add_argument("--only", nargs="+", choices=["packing_padding", "attention_scaling", "peers", "video", "siglip2", "segment"],
                   help="run only these benchmarks")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda also adds a torch.compile row to the peers tables")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args(argv)
    # The CPU fp32 results live in results/; any other setting in its own folder beside them.
    default = args.device == "cpu" and args.precision == "fp32"
    out = RESULTS_DIR if default else RESULTS_DIR / f"{args.device}-{args.precision}"
    out.mkdir(parents=True, exist_ok=True)

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t_all = time.perf_counter()
    probe = stall_probe(args.threads)
    notes = [w for w in (stall_warning(probe, args.threads),) if w]
    load0 = load_average()
    sections = []
    failed = 0
    for name, cmd, md_file in benchmarks(args, out):
        if args.only and name not in args.only:
            continue
        full = [sys.executable, *cmd]
        shown = " ".join(["python", *[os.path.relpath(c) if c.startswith(str(HERE)) else c for c in cmd]])
        print(f"=== {name}: {shown}", flush=True)
        t0 = time.perf_counter()
        log_path = out / f"{name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.run(full, stdout=subprocess.PIPE, stderr=log, text=True)
        elapsed = time.perf_counter() - t0
        stdout = proc.stdout
        if md_file is None:
            (out / f"{name}.md").write_text(stdout)
            body = stdout
        else:
            body = md_file.read_text() if md_file.exists() and proc.returncode == 0 else stdout
        if proc.returncode != 0:
            failed += 1
            tail = log_path.read_text()[-3000:]
            body = f"**FAILED with exit status {proc.returncode}**\n\n```\n{tail}\n```\n\n{body}"
        print(f"    exit {proc.returncode} in {elapsed:.0f} s (stderr: {log_path.relative_to(HERE.parent)})",
              flush=True)
        sections.append((name, shown, proc.returncode, elapsed, body))

    total = time.perf_counter() - t_all
    import torch

    lines = [
        "# Benchmark summary",
        "",
        f"Started {started}; total {total / 60:.1f} min; `{Path(sys.executable)}` (torch {torch.__version__}), "
        f"{os.cpu_count()} cores, threads {args.threads}, device {args.device}, {args.precision}, load average at start "
        f"{'—' if load0 is None else f'{load0:.2f}'}{', quick mode' if args.quick else ''}.",
        "",
    ]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += ["| benchmark | command | exit | seconds |", "| :--- | :--- | ---: | ---: |"]
    lines += [f"| {name} | `{shown}` | {rc} | {el:.0f} |" for name, shown, rc, el, _ in sections]
    lines.append("")
    for name, shown, rc, el, body in sections:
        lines += ["---", "", f"# `{name}`", "", f"`{shown}` — exit {rc}, {el:.0f} s", ""]
        # Demote the benchmark's own headings by one level so the summary keeps one H1 per section.
        lines += [("#" + line) if line.startswith("#") else line for line in body.splitlines()]
        lines.append("")
    summary = out / "SUMMARY.md"
    summary.write_text("\n".join(lines) + "\n")
    print(f"wrote {summary} ({total / 60:.1f} min)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
