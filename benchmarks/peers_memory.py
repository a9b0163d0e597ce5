"""The memory section of ``peers.py``: peak extra memory of one navit training step as the sequence
length grows, each point measured in a fresh process (``peers.py --memory-worker``)."""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import navit
from bench_common import hwm_kb, reset_hwm, rss_kb, training_step
from navit.batch import PAD
from navit.packing import assign_first_fit
from navit.patchify import fit_grid, grid_coords
from packing_padding import sample_sizes
from peer_models import WIDTHS
from peers_data import MAX_TOKENS, MIXES
from peers_timing import autocast

PEERS = Path(__file__).resolve().parent / "peers.py"


def memory_batch(args) -> tuple[navit.PackedBatch, torch.Tensor]:
    """One sequence of ``--mem-len`` tokens filled with ``native``-mix images, and their labels."""
    length = args.mem_len
    rng = np.random.default_rng([args.seed, 99])
    sizes = sample_sizes(int(3 * length / 150) + 16, rng, "long", *MIXES["native"])
    grids = [fit_grid(int(h), int(w), 16, MAX_TOKENS) for h, w in sizes]
    seq_of = assign_first_fit([r * c for r, c in grids], length, num_seqs=1)
    g = torch.Generator().manual_seed(0)
    tokens = [
        navit.Example(torch.rand(r * c, 768, generator=g), grid_coords(r, c), (r, c))
        for (r, c), s in zip(grids, seq_of)
        if s != PAD
    ]
    batch = navit.pack(tokens, length, max_examples_per_seq=len(tokens), num_seqs=1).batch
    return batch, torch.randint(0, args.num_classes, (len(tokens),), generator=g)


def release_memory() -> None:
    """Give freed memory back to the OS, so that resident memory tracks live tensors."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_worker(args) -> None:
    """Runs in a fresh process: peak extra memory of one navit training step at --mem-len
    (RSS high-water mark on CPU, ``max_memory_allocated`` on CUDA)."""
    torch.set_num_threads(args.threads)
    device = args.device
    length, backend = args.mem_len, args.mem_backend
    batch, labels = (t.to(device) for t in memory_batch(args))
    model = navit.create_model(WIDTHS[args.width].navit_preset, num_classes=args.num_classes, depth=args.depth,
                               attn_backend=backend).to(device)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = training_step(model, lambda m: m(batch), lambda logits: F.cross_entropy(logits.float(), labels), device,
                         args.precision == "bf16", opt)  # fmt: skip
    step()  # allocates optimizer state and warms up
    opt.zero_grad(set_to_none=True)
    release_memory()
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device) // 1024
        torch.cuda.reset_peak_memory_stats(device)
        reset = True
    else:
        before = rss_kb()
        reset = reset_hwm()
    t0 = time.perf_counter()
    step()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) // 1024 if device.type == "cuda" else hwm_kb()
    plan_kind = None
    with autocast(args):  # the plan the measured step used
        state = model.attention_backend(device).prepare(batch.segment_ids)
    if hasattr(state, "buckets"):
        plan_kind = "dense" if state.dense_mask is not None else f"{len(state.buckets)} buckets"
    elif backend == "auto":
        plan_kind = type(state).__name__
    print(json.dumps({
        "seq_len": length, "backend": backend, "images": len(labels), "real_tokens": batch.num_real_tokens,
        "before_mb": before / 1024, "peak_mb": peak / 1024, "extra_mb": (peak - before) / 1024,
        "hwm_reset": reset, "step_s": elapsed, "plan": plan_kind,
    }))  # fmt: skip


def run_memory(args) -> dict:
    points = []
    for length in args.memory_lens:
        for backend in args.memory_backends:
            if backend == "dense" and length > args.dense_max_len:
                continue
            cmd = [sys.executable, str(PEERS), "--memory-worker",
                   "--mem-len", str(length), "--mem-backend", backend, "--depth", str(args.depth),
                   "--threads", str(args.threads), "--num-classes", str(args.num_classes),
                   "--seed", str(args.seed), "--device", args.device.type, "--precision", args.precision]
            # Freed blocks >= 64 KiB go straight back to the OS, so RSS tracks live tensors and
            # the high-water mark of the measured step is not hidden by memory glibc kept.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
            if proc.returncode != 0:
                print(f"memory worker failed for L={length} {backend}:\n{proc.stderr[-2000:]}", file=sys.stderr)
                points.append({"seq_len": length, "backend": backend, "error": proc.stderr[-500:]})
                continue
            point = json.loads(proc.stdout.strip().splitlines()[-1])
            points.append(point)
            print(f"  memory L={length:5d} {backend:8s}: +{point['extra_mb']:.0f} MB "
                  f"(step {point['step_s']:.2f} s, {point['plan']})", flush=True)
    return {"points": points}


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.mean(p[0] for p in pts)
    my = statistics.mean(p[1] for p in pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def memory_section(args) -> dict:
    """Every memory point, and per backend the log-log slope of extra memory against L (L >= 1024)."""
    mem = run_memory(args)
    slopes = {}
    for b in args.memory_backends:
        sel = [(p["seq_len"], p["extra_mb"]) for p in mem["points"]
               if p.get("backend") == b and "error" not in p and p["seq_len"] >= 1024]
        slopes[b] = loglog_slope([x for x, _ in sel], [y for _, y in sel])
    mem["slopes"] = slopes
    return mem
