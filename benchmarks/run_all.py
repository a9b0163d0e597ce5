"""Run every benchmark and write one combined report, ``results/SUMMARY.md``.

    python benchmarks/run_all.py            # full suite (~10-15 min on 2 cores)
    python benchmarks/run_all.py --quick    # ~3-4 min
    /opt/peers-venv/bin/python benchmarks/run_all.py   # with the peers installed (timm, vit-pytorch)
    python benchmarks/run_all.py --device cuda --precision bf16   # on a GPU -> results/cuda-bf16/
    python benchmarks/run_all.py --suite gpu --budget 400   # the bf16 GPU check of gpu_check.sh

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

from bench_common import stall_probe, stall_warning  # noqa: E402
from report import RESULTS_DIR, load_average, md_table  # noqa: E402


def command(script: str, args, out_json: Path, *options: str) -> list[str]:
    """The argv of a timed benchmark: its script, the run's threads, device and precision
    (attention_scaling calls it ``--dtype``), ``options`` and where its JSON goes."""
    precision = "--dtype" if script == "attention_scaling.py" else "--precision"
    return [str(HERE / script), "--threads", str(args.threads), "--device", args.device, precision, args.precision,
            *options, "--out", str(out_json)]  # fmt: skip


def benchmarks(args, out: Path) -> list[tuple[str, list[str], Path | None]]:
    """(name, argv after the interpreter, Markdown file it writes itself or None for stdout)."""
    q = args.quick
    py = [str(HERE / "packing_padding.py"), "--out", str(out / "packing_padding.json")]
    py += ["--num-images", "20000"] if q else []
    att = command("attention_scaling.py", args, out / "attention_scaling.json",
                  *(["--seq-lens", "256", "1024", "4096", "--repeats", "5"] if q else []))  # fmt: skip
    peers = command("peers.py", args, out / "peers.json",
                    *(["--quick"] if q else []), *(["--compile"] if args.device == "cuda" else []))  # fmt: skip
    video_quick = ["--repeats", "3", "--loader-clips", "200", "--padding-examples", "5000"]
    video = command("video.py", args, out / "video.json", *(video_quick if q else []))
    siglip2_quick = ["--images", "8", "--batch-images", "8", "--repeats", "1", "--no-memory"]
    siglip2 = command("siglip2.py", args, out / "siglip2.json", *(siglip2_quick if q else []))
    segment = command("segment.py", args, out / "segment.json", *(["--repeats", "3"] if q else []))
    shards = command("shards.py", args, out / "shards.json", *(["--images", "600", "--stream", "20000"] if q else []))
    # Timing-sensitive benchmarks first (a quiet machine may not stay quiet); packing_padding
    # only counts tokens, so load does not change its results.
    return [
        ("attention_scaling", att, None),
        ("peers", peers, out / "peers.md"),
        ("video", video, out / "video.md"),
        ("siglip2", siglip2, out / "siglip2.md"),
        ("segment", segment, out / "segment.md"),
        ("shards", shards, out / "shards.md"),
        ("packing_padding", py, None),
    ]


# The GPU check: (name, script, options, seconds it may take on one H200, smoke options that run
# the same step in seconds on a CPU). The budgets add up to 410 s; gpu_check.sh also caps the whole
# suite at what its tests leave of 8 minutes.
GPU_SUITE = [
    ("attention_scaling", "attention_scaling.py",
     ["--seq-lens", "256", "1024", "2048", "4096", "8192", "--dense-max-len", "8192", "--repeats", "10"], 50,
     ["--seq-lens", "128", "256", "--repeats", "1", "--warmup", "0"]),
    ("peers_vit_b", "peers.py",
     ["--width", "b", "--sections", "train", "infer", "lsweep", "--mixes", "uniform", "paper", "native",
      "--num-seqs", "8", "--lsweep-lens", "1024", "2048", "4096", "8192", "--lsweep-tokens", "16384",
      "--repeats", "10", "--infer-repeats", "10", "--lsweep-repeats", "5", "--retry-noisy", "0"], 140,
     ["--width", "s", "--depth", "1", "--sections", "train", "infer", "lsweep", "--mixes", "uniform",
      "--seq-len", "256", "--num-seqs", "2", "--max-examples-per-seq", "8", "--impls", "navit", "navit-dense",
      "ceiling-same", "--lsweep-lens", "256", "512", "--lsweep-tokens", "1024", "--repeats", "1",
      "--infer-repeats", "1", "--lsweep-repeats", "1", "--warmup", "0", "--retry-noisy", "0"]),
    ("peers_compiled", "peers.py",  # one packed shape, one compile
     ["--compile", "--sections", "train", "--mixes", "paper", "--impls", "navit", "navit-compiled",
      "ceiling-same", "timm-naflex", "--repeats", "10", "--retry-noisy", "0"], 90,
     ["--sections", "train", "--mixes", "paper", "--impls", "navit", "ceiling-same", "--depth", "1",
      "--seq-len", "256", "--num-seqs", "2", "--max-examples-per-seq", "8", "--repeats", "1", "--warmup", "0",
      "--retry-noisy", "0"]),
    ("video", "video.py", ["--sections", "train", "padding", "--repeats", "10"], 40,
     ["--sections", "train", "padding", "--depth", "1", "--seq-len", "256", "--num-seqs", "2", "--max-tokens", "64",
      "--max-frames", "6", "--repeats", "1", "--warmup", "0", "--padding-examples", "2000"]),
    ("siglip2", "siglip2.py", ["--repeats", "5"], 60,
     ["--width", "64", "--depth", "1", "--images", "4", "--batch-images", "2", "--max-patches", "16", "64",
      "--seq-len", "128", "--repeats", "1", "--no-memory"]),
    ("segment", "segment.py", ["--repeats", "10"], 30,
     ["--depth", "1", "--seq-len", "256", "--num-seqs", "2", "--max-tokens", "128", "--repeats", "1",
      "--warmup", "0"]),
]


def gpu_suite(args, out: Path) -> list[tuple[str, list[str], Path | None, float]]:
    """The GPU check's steps (``--smoke``: the same steps at toy sizes and without torch.compile,
    to test the check on a CPU)."""
    steps = []
    for name, script, options, budget, smoke in GPU_SUITE:
        cmd = command(script, args, out / f"{name}.json", *(smoke if args.smoke else options))
        steps.append((name, cmd, None if script == "attention_scaling.py" else out / f"{name}.md", budget))
    return steps


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter versions of every benchmark")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the timed benchmarks")
    p.add_argument("--only", nargs="+", help="run only these steps (names as in SUMMARY.md)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda also adds a torch.compile row to the peers tables")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--suite", choices=["all", "gpu"], default="all",
                   help="gpu: the bf16 GPU check (ViT-B widths, L up to 8192, torch.compile, video, SigLIP2), "
                   "each step with its own time budget")
    p.add_argument("--smoke", action="store_true", help="with --suite gpu: toy sizes, to test the check on a CPU")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run: a step still running when its budget or this one is spent "
                   "is stopped and reported, and the next one starts")
    p.add_argument("--out-dir", type=Path, default=None, help="where results go (default: results/, or "
                   "results/<device>-<precision>/ for any other setting)")
    args = p.parse_args(argv)
    return p, args


def run_step(name: str, cmd: list[str], md_file: Path | None, limit: float | None, out: Path) -> tuple:
    """Run one benchmark: (exit status or "timeout", seconds, its Markdown or, failed, the end of its stderr)."""
    t0 = time.perf_counter()
    log_path = out / f"{name}.log"
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, *cmd], stdout=subprocess.PIPE, stderr=log, text=True,
                                  timeout=limit)  # fmt: skip
            rc, stdout = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as stopped:
            rc = "timeout"
            stdout = stopped.stdout or ""
            stdout = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
    elapsed = time.perf_counter() - t0
    if md_file is None:
        (out / f"{name}.md").write_text(stdout)
        body = stdout
    else:
        body = md_file.read_text() if md_file.exists() and rc == 0 else stdout
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        why = f"stopped after its {limit:.0f} s budget" if rc == "timeout" else f"exit status {rc}"
        body = f"**FAILED: {why}**\n\n```\n{tail}\n```\n\n{body}"
    print(f"    exit {rc} in {elapsed:.0f} s (stderr: {log_path})", flush=True)
    return rc, elapsed, body


def summary_text(args, sections: list[tuple], notes: list[str], started: str, total: float, load0) -> str:
    import torch

    lines = [
        "# Benchmark summary",
        "",
        f"Started {started}; total {total / 60:.1f} min; `{Path(sys.executable)}` (torch {torch.__version__}), "
        f"{os.cpu_count()} cores, threads {args.threads}, device {args.device}, {args.precision}, load average at start "
        f"{'—' if load0 is None else f'{load0:.2f}'}{', quick mode' if args.quick else ''}"
        f"{f', suite {args.suite}' + (' (smoke sizes)' if args.smoke else '') if args.suite != 'all' else ''}.",
        "",
    ]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines.append(md_table(["benchmark", "command", "exit", "seconds"],
                          [[name, f"`{shown}`", rc, f"{el:.0f}"] for name, shown, rc, el, _ in sections], "llrr"))
    lines.append("")
    for name, shown, rc, el, body in sections:
        lines += ["---", "", f"# `{name}`", "", f"`{shown}` — exit {rc}, {el:.0f} s", ""]
        # Demote the benchmark's own headings by one level so the summary keeps one H1 per section.
        lines += [("#" + line) if line.startswith("#") else line for line in body.splitlines()]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    # The CPU fp32 results live in results/; any other setting in its own folder beside them.
    default = args.device == "cpu" and args.precision == "fp32"
    out = args.out_dir or (RESULTS_DIR if default else RESULTS_DIR / f"{args.device}-{args.precision}")
    out.mkdir(parents=True, exist_ok=True)
    steps = gpu_suite(args, out) if args.suite == "gpu" else [(*b, None) for b in benchmarks(args, out)]
    unknown = sorted(set(args.only or ()) - {step[0] for step in steps})
    if unknown:
        p.error(f"--only {' '.join(unknown)}: no such step in suite {args.suite}; steps: {', '.join(s[0] for s in steps)}")

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t_all = time.perf_counter()
    probe = stall_probe(args.threads)
    notes = [w for w in (stall_warning(probe, args.threads),) if w]
    load0 = load_average()
    sections = []
    failed = 0
    for name, cmd, md_file, budget in steps:
        if args.only and name not in args.only:
            continue
        shown = " ".join(["python", *[os.path.relpath(c) if c.startswith(str(HERE)) else c for c in cmd]])
        left = None if args.budget is None else args.budget - (time.perf_counter() - t_all)
        limit = min((t for t in (budget, left) if t is not None), default=None)
        if left is not None and left < 5:
            print(f"=== {name}: skipped, the run's budget is spent", flush=True)
            failed += 1
            sections.append((name, shown, "skipped", 0.0, "**Skipped: the run's time budget was spent.**"))
            continue
        print(f"=== {name}: {shown}" + ("" if limit is None else f" (at most {limit:.0f} s)"), flush=True)
        rc, elapsed, body = run_step(name, cmd, md_file, limit, out)
        failed += rc != 0
        sections.append((name, shown, rc, elapsed, body))

    total = time.perf_counter() - t_all
    summary = out / "SUMMARY.md"
    summary.write_text(summary_text(args, sections, notes, started, total, load0))
    print(f"wrote {summary} ({total / 60:.1f} min)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
