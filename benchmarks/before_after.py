"""Loader and training-step speed of two checkouts of navit, measured alternately on the same files.

    python benchmarks/before_after.py --before /tmp/navit-before          # after: this checkout (~5 min)
    python benchmarks/before_after.py --before A --after B --rounds 2 --images 600 --steps 30 --log-every 10

Every measurement is a fresh subprocess whose working directory and ``PYTHONPATH`` are the
checkout measured, so each imports its own ``navit``. Each round measures both checkouts, the
order swapping from one round to the next so that neither always runs first:

* ``loader``: batches/s of the loader a training run reads from (``navit.train.build(cfg)``'s
  ``loader``, ``--workers`` 2, by default in the batch shape of ``peers.py``'s loader section: 4 x
  1024 tokens, at most 256 per image, a buffer of 256) over real PNG files, written once by
  ``navit data synth`` with the version before. Steady state:
  the first batch and the batches packed after the last file was read (the end-of-epoch flush of
  the buffer, which decodes nothing) are left out. A checkout without that entry point reports the
  loader as not measurable.
* ``train``: ``python -m navit train --data <the PNGs> --max-steps N --log-every K`` (the quick
  start's model, navit_mini16, and default training options); examples/s and steps/s over the
  metric windows of ``metrics.jsonl`` after the first (warm-up).

Prints a Markdown table of medians over rounds (before, after, after / before, and each side's
range over rounds, a measure of the machine's noise) and writes ``results/before_after.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import RESULTS_DIR, fmt, heading, machine_info, md_table, plain_args, write_report  # noqa: E402

# Runs inside the checkout measured: its own navit builds the training loader from the CLI's flags
# (argv[1], JSON) and times one epoch of it. Prints one JSON line.
LOADER_PROBE = r"""
import json, sys, time
import torch
flags, buffer = json.loads(sys.argv[1]), int(sys.argv[2])
try:
    import navit
    from navit.cli import build_parser, training_config
    from navit.distributed import DistInfo
    from navit.train import build
except ImportError as error:
    print(json.dumps({"error": f"not measurable in this version: {error}"}))
    raise SystemExit(0)
run = build(training_config(build_parser().parse_args(["train", *flags])), torch.device("cpu"), DistInfo())
start, stamps, counts = time.perf_counter(), [], []
for item in run.loader:
    stamps.append(time.perf_counter())
    counts.append(getattr(item, "batch", item).num_examples)
print(json.dumps({"navit": navit.__file__, "start": start, "stamps": stamps, "counts": counts}))
"""


def checkout_env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}


def run_in(root: Path, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=root, env=checkout_env(root), capture_output=True, text=True, timeout=timeout)


def failure(proc: subprocess.CompletedProcess) -> dict:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit status {proc.returncode}: " + " / ".join(tail)}


def loader_rate(probe: dict, buffer: int) -> dict:
    """Steady batches/s and examples/s: from the first batch to the last one packed while files
    were still being read (after that the loader only empties its buffer of ``buffer`` examples)."""
    stamps, counts = probe["stamps"], probe["counts"]
    total, seen, last = sum(counts), 0, 0
    for i, n in enumerate(counts):
        seen += n
        if seen > total - buffer:
            break
        last = i
    if last < 2:
        return {"error": f"only {last + 1} batches before the end-of-epoch flush: raise --images"}
    seconds = stamps[last] - stamps[0]
    return {"batches_per_s": last / seconds, "examples_per_s": sum(counts[1 : last + 1]) / seconds,
            "batches": last, "first_batch_s": stamps[0] - probe["start"], "navit": probe["navit"]}  # fmt: skip


def measure_loader(root: Path, data: Path, args, scratch: Path) -> dict:
    flags = ["--data", str(data), "--device", "cpu", "--workers", str(args.workers), "--out", str(scratch),
             "--name", "loader", *args.loader_flags]  # fmt: skip
    proc = run_in(root, [sys.executable, "-c", LOADER_PROBE, json.dumps(flags), str(args.buffer)], args.timeout)
    if proc.returncode != 0:
        return failure(proc)
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    return probe if "error" in probe else loader_rate(probe, args.buffer)


def train_rate(records: list[dict], log_every: int) -> dict:
    """Examples/s and steps/s over the metric windows after the first, each ``log_every`` steps."""
    windows = records[1:]
    if not windows:
        return {"error": f"{len(records)} metric records: raise --steps to at least 2 x --log-every"}
    seconds = [log_every * r["examples_per_batch"] / r["examples_per_s"] for r in windows]
    examples = [log_every * r["examples_per_batch"] for r in windows]
    return {"examples_per_s": sum(examples) / sum(seconds), "steps_per_s": log_every * len(windows) / sum(seconds),
            "windows": len(windows)}  # fmt: skip


def measure_train(root: Path, data: Path, args, scratch: Path) -> dict:
    cmd = [sys.executable, "-m", "navit", "train", "--data", str(data), "--device", args.device, "--max-steps",
           str(args.steps), "--log-every", str(args.log_every), "--save-every", str(args.steps), "--budgets",
           "--out", str(scratch), "--name", "train"]  # fmt: skip
    proc = run_in(root, cmd, args.timeout)
    if proc.returncode != 0:
        return failure(proc)
    lines = (scratch / "train" / "metrics.jsonl").read_text().splitlines()
    return train_rate([json.loads(line) for line in lines if line.strip()], args.log_every)


METRICS = {  # name -> (section, value key)
    "loader batches/s": ("loader", "batches_per_s"),
    "loader examples/s": ("loader", "examples_per_s"),
    "train steps/s": ("train", "steps_per_s"),
    "train examples/s": ("train", "examples_per_s"),
}


def one_round(index: int, roots: dict[str, Path], data: Path, args) -> dict:
    order = list(roots) if index % 2 == 0 else list(roots)[::-1]
    result: dict = {"order": order}
    for name in order:
        with tempfile.TemporaryDirectory(prefix=f"navit_before_after_{name}_") as scratch:
            result[name] = {"loader": measure_loader(roots[name], data, args, Path(scratch)),
                            "train": measure_train(roots[name], data, args, Path(scratch))}  # fmt: skip
        loader, train = result[name]["loader"], result[name]["train"]
        print(f"  round {index + 1} {name}: loader {fmt(loader.get('batches_per_s'), 2)} batches/s, "
              f"train {fmt(train.get('steps_per_s'), 2)} steps/s", file=sys.stderr, flush=True)
    return result


def summarize_rounds(rounds: list[dict]) -> dict:
    out = {}
    for metric, (section, key) in METRICS.items():
        values = {side: [r[side][section][key] for r in rounds if key in r[side][section]]
                  for side in ("before", "after")}  # fmt: skip
        medians = {side: statistics.median(v) if v else None for side, v in values.items()}
        ratio = medians["after"] / medians["before"] if medians["before"] and medians["after"] else None
        errors = sorted({r[side][section]["error"] for r in rounds for side in ("before", "after")
                         if "error" in r[side][section]})  # fmt: skip
        out[metric] = {**medians, "ratio": ratio, "values": values, "within_5pct": None if ratio is None
                       else abs(ratio - 1) <= 0.05, "errors": errors}  # fmt: skip
    return out


def spread(values: list[float]) -> str:
    return f"{fmt(min(values), 2)}–{fmt(max(values), 2)}" if values else "—"


def summary_row(metric: str, s: dict) -> list[str]:
    ranges = [spread(s["values"]["before"]), spread(s["values"]["after"])]
    if s["ratio"] is None:
        return [metric, fmt(s["before"], 2), fmt(s["after"], 2), "—", *ranges, ""]
    verdict = "within 5%" if s["within_5pct"] else "**differs by more than 5%**"
    return [metric, fmt(s["before"], 2), fmt(s["after"], 2), f"{s['ratio']:.3f}", *ranges, verdict]


def render(res: dict) -> str:
    a = res["args"]
    setup = (f"before `{a['before']}`, after `{a['after']}`; {a['rounds']} rounds, checkouts alternating; "
             f"{a['images']} PNGs; loader: {a['workers']} workers, `{' '.join(a['loader_flags'])}`; train: "
             f"navit_mini16, {a['steps']} steps, windows of {a['log_every']} after the first. Medians over rounds.")
    table = md_table(["metric", "before", "after", "after / before", "before, rounds", "after, rounds", ""],
                     [summary_row(metric, s) for metric, s in res["summary"].items()], "lrrrrrl")  # fmt: skip
    errors = [f"\n`{metric}`: {error}" for metric, s in res["summary"].items() for error in s["errors"]]
    return "\n".join(heading("Before / after: loader and training-step speed", res) + [setup, "", table, *errors])


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="checkout of the version before")
    p.add_argument("--after", type=Path, default=HERE.parent, help="checkout of the version after (default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=3000, help="PNG files to write (navit data synth)")
    p.add_argument("--data", type=Path, default=None, help="an existing image folder instead of writing one")
    p.add_argument("--workers", type=int, default=2, help="loader workers")
    p.add_argument("--buffer", type=int, default=256, help="loader buffer (examples); --buffer-size of the loader")
    p.add_argument("--loader-flags", nargs="*", default=["--seq-len", "1024", "--num-seqs", "4", "--max-tokens", "256"],
                   help="more `navit train` flags for the loader (default: the peers benchmark's batch shape)")
    p.add_argument("--steps", type=int, default=100, help="training steps per run")
    p.add_argument("--log-every", type=int, default=20, help="steps per metric window")
    p.add_argument("--device", default="cpu", help="device of the training runs (the loader runs on the CPU)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one measurement may take")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "before_after.json")
    args = p.parse_args(argv)
    for side in ("before", "after"):
        if not (getattr(args, side) / "navit" / "__init__.py").exists():
            p.error(f"--{side} {getattr(args, side)}: no navit/__init__.py there; give the root of a navit checkout")
    args.before, args.after = args.before.resolve(), args.after.resolve()
    args.loader_flags = [*args.loader_flags, "--buffer-size", str(args.buffer)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    roots = {"before": args.before, "after": args.after}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="navit_before_after_data_") as tmp:
        data = args.data
        if data is None:  # written by the version before, the one that is not being edited
            data = Path(tmp) / "pngs"
            proc = run_in(args.before, [sys.executable, "-m", "navit", "data", "synth", "--out", str(data),
                                        "--num-images", str(args.images)], args.timeout)  # fmt: skip
            if proc.returncode != 0:
                raise SystemExit(f"navit data synth failed in {args.before}: {failure(proc)['error']}")
        rounds = [one_round(i, roots, data, args) for i in range(args.rounds)]
    res = {"command": ["python", "benchmarks/before_after.py", *(argv if argv is not None else sys.argv[1:])],
           "args": plain_args(args), "machine": machine_info(None), "rounds": rounds,
           "summary": summarize_rounds(rounds), "elapsed_s": time.perf_counter() - t0}  # fmt: skip
    write_report(res, render(res), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
