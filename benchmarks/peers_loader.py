"""The loader section of ``peers.py``: packed batches per second of ``PackedLoader`` reading real
PNG files, against the training step it feeds."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import navit
from bench_common import NoiseMonitor, packed_loader, time_batches
from navit.data.folder import ImageFolder
from navit.synthetic.shapes import SyntheticShapes, write_image_folder
from peers_data import MAX_TOKENS
from peers_timing import section_warnings


def batch_stats(item) -> tuple[int, int, float]:
    return item.batch.num_examples, item.batch.num_real_tokens, item.batch.padding_fraction


def time_loader(folder: ImageFolder, workers: int, args, monitor: NoiseMonitor) -> dict:
    """Steady-state rates of one loader with ``workers`` workers."""
    loader = packed_loader(folder, navit.Processor(patch_size=16, max_tokens=MAX_TOKENS), seq_len=args.seq_len,
                           num_seqs=args.num_seqs, max_examples_per_seq=args.max_examples_per_seq,
                           buffer_size=args.loader_buffer, num_workers=workers, seed=args.seed, train=True)  # fmt: skip
    warning, _ = section_warnings(monitor, f"loader/{workers} workers", args.threads)
    # Stop while the stream still loads: the final flush of the buffer packs without
    # decoding anything and would overstate the rate.
    per_batch = args.num_seqs * min(args.max_examples_per_seq, args.seq_len / (MAX_TOKENS / 2))
    limit = max(2, int((args.loader_images - args.loader_buffer) / max(1, per_batch) * 0.9))
    t_start, stamps, stats = time_batches(loader, limit, batch_stats)
    images, tokens, padding = (list(column) for column in zip(*stats))
    steady = stamps[-1] - stamps[0]
    n = len(stamps) - 1
    return {
        "batches": len(stamps),
        "first_batch_s": stamps[0] - t_start,
        "steady_batches_per_s": n / steady if steady > 0 else float("nan"),
        "steady_images_per_s": sum(images[1:]) / steady if steady > 0 else float("nan"),
        "steady_real_tokens_per_s": sum(tokens[1:]) / steady if steady > 0 else float("nan"),
        "mean_images_per_batch": statistics.mean(images),
        "mean_padding": statistics.mean(padding),
        "overall_batches_per_s": len(stamps) / (stamps[-1] - t_start),
        "busy_warning": warning,
        "other_cpu_fraction": monitor.other_cpu_fraction(),
    }


def run_loader(args, monitor: NoiseMonitor) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="navit_peers_loader_"))
    try:
        t0 = time.perf_counter()
        source = SyntheticShapes(num_images=args.loader_images, seed=args.seed, min_side=64, max_side=512)
        write_image_folder(source, tmp, progress=False)
        write_s = time.perf_counter() - t0
        folder = ImageFolder(tmp)
        results = {workers: time_loader(folder, workers, args, monitor) for workers in args.loader_workers}
        return {"write_s": write_s, "num_files": len(folder), "by_workers": results}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def loader_section(args, monitor: NoiseMonitor, mixes: dict) -> dict:
    """The loader's rates, and their ratio to navit's training step on the ``native`` mix (or the
    first mix timed) when one was timed."""
    ld = run_loader(args, monitor)
    ref_mix = "native" if "native" in mixes else next(iter(mixes), None)
    ref = mixes.get(ref_mix, {}).get("train", {}).get("rows", {}).get("navit") if ref_mix else None
    if ref:
        steps_per_s = 1.0 / ref["median_s"]
        ld["train_ref"] = {"mix": ref_mix, "steps_per_s": steps_per_s, "images_per_s": ref["images_per_s"]}
        ld["vs_train"] = {
            str(wk): {"batches_ratio": w_["steady_batches_per_s"] / steps_per_s,
                      "images_ratio": w_["steady_images_per_s"] / ref["images_per_s"]}
            for wk, w_ in ld["by_workers"].items()
        }  # fmt: skip
    ld["by_workers"] = {str(k): v for k, v in ld["by_workers"].items()}
    for wk, w_ in ld["by_workers"].items():
        print(f"  {wk} workers: {w_['steady_batches_per_s']:.2f} batches/s, "
              f"{w_['steady_images_per_s']:.0f} images/s", flush=True)
    return ld
