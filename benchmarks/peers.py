"""navit side by side with public NaViT / NaFlex implementations, in one process (CPU or GPU).

Every implementation gets the *same* images and the *same* model size (``--width``: ViT-Ti, 192
wide with 3 heads, by default; ViT-S; ViT-B; MLP 4x, patch 16, depth 6); they run interleaved
within every repeat, so machine noise hits all alike, and the report is about RATIOS (absolute
times on a small shared VM are unreliable). Every row also gets its model FLOPs utilisation: the
FLOPs torch's flop counter counts in one step, per second, over one large square matmul's rate.
See ``peer_models.py`` for the implementations and how each is fed; the sections live in
``peers_data.py`` (the images), ``peers_timing.py`` (train, infer, lsweep), ``peers_loader.py``,
``peers_memory.py``, ``peers_profile.py`` and ``peers_report.py`` (Markdown and plots).

Sections (``--sections``, default all):

train    forward + backward + AdamW step: images/s and real tokens/s per implementation, and the
         ratios navit / peer, with the targets of ``TARGETS`` per mix. Packing / collation
         (data-loader work) is timed apart.
infer    the same under ``no_grad`` in eval mode.
loader   packed batches/s of ``navit.data.loader.PackedLoader`` (2 workers) reading real PNG
         files through ``ImageFolder``, against the training step it feeds (target >= 3x).
memory   peak extra memory (RSS high-water mark) of one navit training step as L grows, in a
         fresh subprocess per (L, backend): bucketed should grow linearly, dense quadratically.
profile  torch.profiler of one training step per implementation, by op (and by navit module).

Image mixes (``--mixes``): ``native`` (long side ~ U(64, 512) px, aspect ratios from the
4:3 / 3:4 / 16:9 / 9:16 / 1:1 / 3:1 / 1:3 / 4:1 / 1:4 mix, fitted to <= 256 tokens),
``paper`` (long side ~ U(64, 256): many small images) and ``uniform`` (the native mix scaled up
or down to fill 256 tokens, SigLIP2 NaFlex's rule: about 250 tokens each, where padding to the
longest wastes little). Pixels are seeded random numbers.
One step = the images a streaming first-fit packer puts into ``--num-seqs`` sequences of
``--seq-len`` tokens (``--max-examples-per-seq`` slots), like ``PackedLoader`` does.

Device and precision (``--device cpu|cuda``, ``--precision fp32|bf16``) apply to every
implementation alike; bf16 is ``torch.autocast``. On CUDA navit's ``auto`` backend is varlen flash
attention in bf16 and FlexAttention in fp32; ``--compile`` adds a ``navit-compiled`` row
(``torch.compile`` of the whole model on the fixed packed shapes). Memory on CUDA is
``torch.cuda.max_memory_allocated`` instead of RSS.

Peers that are not installed are skipped with a message, so this also runs in an environment
with navit only. Results: ``results/peers.{md,json,png}`` (+ ``peers_memory.png``,
``peers_profile_*.txt``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from bench_common import (  # noqa: E402
    NoiseMonitor, add_batch_options, device_of, run_parser, stall_probe, stall_warning,
)
from peer_models import WIDTHS, all_impls, check_real_tokens_match  # noqa: E402
from peers_data import MIXES, make_step, prepare_on, step_stats, time_prep  # noqa: E402
from peers_loader import loader_section  # noqa: E402
from peers_memory import memory_section, memory_worker  # noqa: E402
from peers_profile import run_profile  # noqa: E402
from peers_report import make_plots, render_markdown  # noqa: E402
from peers_timing import build_on, matmul_peak_gflops, run_lsweep, run_mode  # noqa: E402
from report import load_average, machine_info, plain_args, write_report  # noqa: E402

SECTIONS = ("train", "infer", "lsweep", "loader", "memory", "profile")


def parse_args(argv):
    p = run_parser(__doc__, "peers")
    add_batch_options(p)
    p.add_argument("--quick", action="store_true", help="~3 minute version (fewer repeats, smaller sweeps)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES))
    p.add_argument("--impls", nargs="+", default=None,
                   help="subset of: navit navit-dense navit-lean lucidrains lucidrains-own timm-naflex ceiling "
                   "navit-squares linear-only")
    p.add_argument("--compile", action="store_true",
                   help="add a navit-compiled row: torch.compile of the whole model (fixed packed shapes)")
    p.add_argument("--width", choices=list(WIDTHS), default="ti",
                   help="model size for every implementation: ti (192 wide, 3 heads), s (384, 6), b (768, 12)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--warmup", type=int, default=None, help="default 2 (quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="training repeats (default 7, quick 3)")
    p.add_argument("--infer-repeats", type=int, default=None, help="inference repeats (default 9, quick 3)")
    p.add_argument("--lsweep-lens", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    p.add_argument("--lsweep-tokens", type=int, default=4096, help="tokens per batch in the L sweep (B = tokens / L)")
    p.add_argument("--lsweep-mix", choices=list(MIXES), default="native")
    p.add_argument("--lsweep-repeats", type=int, default=3)
    p.add_argument("--loader-images", type=int, default=None, help="PNG files to write (default 1200, quick 500)")
    p.add_argument("--loader-buffer", type=int, default=256)
    p.add_argument("--loader-workers", type=int, nargs="+", default=[2])
    p.add_argument("--memory-lens", type=int, nargs="+", default=None,
                   help="default 256 512 1024 2048 4096 8192 (quick: 256 1024 4096)")
    p.add_argument("--memory-backends", nargs="+", default=None,
                   help="default: bucketed dense on CPU, auto dense on CUDA")
    p.add_argument("--dense-max-len", type=int, default=4096, help="skip dense memory points above this L")
    p.add_argument("--profile-impls", nargs="+", default=None,
                   help="implementations to profile (default: all available; quick: navit only)")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--profile-threads", type=int, default=None, help="threads while profiling (default --threads)")
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--retry-noisy", type=int, default=None,
                   help="re-run a timed table up to N times when other processes disturbed it (default 1, quick 0)")
    p.add_argument("--retry-wait", type=float, default=20.0, help="seconds to wait before such a retry")
    # internal: one memory measurement in a fresh process
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mem-len", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--mem-backend", default="bucketed", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = device_of(p, args.device)
    args.out = Path(args.out)  # the .md, PNGs and profile tables go next to it
    args.memory_backends = args.memory_backends or (
        ["auto", "dense"] if args.device.type == "cuda" else ["bucketed", "dense"])
    q = args.quick
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.repeats = args.repeats if args.repeats is not None else (3 if q else 7)
    args.infer_repeats = args.infer_repeats if args.infer_repeats is not None else (3 if q else 9)
    args.loader_images = args.loader_images or (600 if q else 1200)
    args.retry_noisy = args.retry_noisy if args.retry_noisy is not None else (0 if q else 1)
    args.memory_lens = args.memory_lens or ([256, 1024, 4096] if q else [256, 512, 1024, 2048, 4096, 8192])
    if q and "--sections" not in " ".join(argv or sys.argv[1:]):
        args.sections = [s for s in args.sections if s != "lsweep"]
    return args


def start(args, monitor: NoiseMonitor) -> tuple[dict, dict]:
    """The implementations that run here, and the start of the results: machine, warnings, the
    square-matmul rate that MFU divides by."""
    probe = stall_probe(args.threads)
    stall = stall_warning(probe, args.threads)
    if stall:
        print(stall, file=sys.stderr, flush=True)
    warnings_ = [w for w in (monitor.busy_warning("start"), stall) if w]
    all_ = all_impls(diagnostics=not args.quick, compiled=args.compile)
    if args.impls:
        all_ = [i for i in all_ if i.key in args.impls]
    impls = {i.key: i for i in all_ if i.missing is None}
    for i in all_:
        if i.missing:
            print(f"skipping {i.key}: {i.missing}", file=sys.stderr)
    if args.profile_impls is None:
        args.profile_impls = ["navit"] if args.quick else [k for k in ("navit", "ceiling") if k in impls]
    res: dict = {
        "command": [Path(sys.executable).name, *sys.argv],
        "machine": machine_info(args.threads),
        "impls": {i.key: {"available": i.missing is None, "detail": i.detail, "missing": i.missing} for i in all_},
        "mixes": {},
        "warnings": warnings_,
        "stall_probe_start": probe,
    }
    args.peak_gflops = None
    if "train" in args.sections or "infer" in args.sections:  # only their tables quote it
        res["matmul_peak_gflops"] = args.peak_gflops = matmul_peak_gflops(args)
    return impls, res


def run_mix(mix: str, impls: dict, args, monitor: NoiseMonitor) -> dict:
    """The train, infer and profile sections on one mix's images."""
    step, originals = make_step(mix, args)
    stats = step_stats(step, args)
    print(f"[{mix}] {stats['images']} images, {stats['real_tokens']} real tokens "
          f"(mean {stats['mean_tokens']:.0f}/image), navit padding {100 * stats['navit_padding']:.1f}%",
          flush=True)  # fmt: skip
    mres: dict = {"stats": stats}
    torch.manual_seed(args.seed)
    models = {k: build_on(impl, args, step) for k, impl in impls.items()}
    prepared = {k: prepare_on(impl, step, args.device) for k, impl in impls.items()}
    check_real_tokens_match(prepared, step)
    mres["prep"] = time_prep(step, originals, impls, repeats=3 if args.quick else 5)
    del originals
    for mode in ("train", "infer"):
        if mode in args.sections:
            t0 = time.perf_counter()
            mres[mode] = run_mode(mode, mix, step, impls, models, prepared, args, monitor)
            summary = ", ".join(f"{k} {v['images_per_s']:.1f}" for k, v in mres[mode]["rows"].items())
            print(f"  {mode} images/s: {summary} ({time.perf_counter() - t0:.0f} s)", flush=True)
            for other, q in mres[mode]["ratios"].items():
                print(f"    navit/{other}: {q['median']:.2f}x (target {q['target']})", flush=True)
    if "profile" in args.sections:
        mres["profile"] = run_profile(mix, impls, models, prepared, args)
        mres["profile_threads"] = args.profile_threads or args.threads
    return mres


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    monitor = NoiseMonitor(args.threads)
    impls, res = start(args, monitor)
    model_sections = [s for s in ("train", "infer", "profile") if s in args.sections]
    for mix in args.mixes if model_sections else []:
        res["mixes"][mix] = run_mix(mix, impls, args, monitor)
    if "lsweep" in args.sections and "navit" in impls:
        print("[lsweep]", flush=True)
        res["lsweep"] = run_lsweep(args, impls, monitor)
    if "loader" in args.sections:
        print("[loader]", flush=True)
        res["loader"] = loader_section(args, monitor, res["mixes"])
    if "memory" in args.sections:
        print("[memory]", flush=True)
        res["memory"] = memory_section(args)
    res["args"] = plain_args(args)
    res["elapsed_s"] = time.perf_counter() - t_start
    res["machine"]["load_average_end"] = load_average()
    res["plots"] = make_plots(res, args.out.parent)
    written = [args.out.with_suffix(".md"), *(args.out.parent / p for p in res["plots"])]
    write_report(res, render_markdown(res), args.out, also=written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
