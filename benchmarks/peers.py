"""navit side by side with public NaViT / NaFlex implementations, in one process (CPU or GPU).

Every implementation gets the *same* images and the *same* model size (``--width``: ViT-Ti, 192
wide with 3 heads, by default; ViT-S; ViT-B; MLP 4x, patch 16, depth 6); they run interleaved
within every repeat, so machine noise hits all alike, and the report is about RATIOS (absolute
times on a small shared VM are unreliable). Every row also gets its model FLOPs utilisation: the
FLOPs torch's flop counter counts in one step, per second, over one large square matmul's rate.
See ``peer_models.py`` for the implementations and how each is fed.

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
import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import navit  # noqa: E402
from bench_common import (  # noqa: E402
    NOISY_OTHER_CPU, RESULTS_DIR, NoiseMonitor, count_flops, fmt, hwm_kb, interleaved, load_average, machine_info, md_table,
    reset_hwm, rss_kb, stall_probe, stall_warning, summarize, synchronize,
)
from navit.batch import PAD
from navit.packing import assign_first_fit  # noqa: E402
from navit.batch import Example
from navit.patchify import fit_grid, grid_coords, patchify, resize_to_grid  # noqa: E402
from navit.processor import fill_grid  # noqa: E402
from packing_padding import sample_sizes  # noqa: E402
from peer_models import (  # noqa: E402
    PATCH, WIDTHS, Impl, Prepared, StepImages, all_impls, build_model, ceiling_side, check_real_tokens_match,
    navit_prepare,
)

MIXES = {  # name -> (long side lo, hi) in pixels; aspect mix of packing_padding.ASPECT_MIX
    "native": (64, 512),
    "paper": (64, 256),
    "uniform": (64, 512),  # every image scaled (up or down) to fill MAX_TOKENS, as SigLIP2 NaFlex does
}
MAX_TOKENS = 256  # per image
TARGETS = {  # (mix, mode, peer) -> minimum navit / peer ratio on real tokens/s
    ("native", "train", "lucidrains-own"): 2.0,
    ("native", "train", "timm-naflex"): 1.5,
    ("native", "train", "ceiling"): 0.9,
    ("native", "infer", "timm-naflex"): 1.5,
    ("paper", "train", "lucidrains-own"): 2.0,
    ("paper", "train", "timm-naflex"): 2.0,
    ("paper", "train", "ceiling"): 0.9,
    ("uniform", "train", "timm-naflex"): 1.1,
    ("uniform", "train", "ceiling-same"): 0.95,
    ("uniform", "train", "ceiling"): 0.9,
    ("uniform", "infer", "timm-naflex"): 1.1,
}
SECTIONS = ("train", "infer", "lsweep", "loader", "memory", "profile")


def to_device(obj, device: torch.device):
    """Tensors (and PackedBatches) inside lists, tuples and dicts, moved to ``device``."""
    if isinstance(obj, (torch.Tensor, navit.PackedBatch)):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def prepare_on(impl: Impl, step: StepImages, device: torch.device) -> Prepared:
    """``impl.prepare`` (loader-side work, always on CPU), then its inputs moved to ``device``."""
    prepared = impl.prepare(step)
    return dataclasses.replace(prepared, inputs=to_device(prepared.inputs, device),
                               labels=prepared.labels.to(device))


def build_on(impl: Impl, args, step: StepImages) -> torch.nn.Module:
    model = build_model(impl, args.num_classes, args.depth, WIDTHS[args.width], step).to(args.device)
    return torch.compile(model) if impl.extra.get("compile") else model


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def make_step(mix: str, args, seed_offset: int = 0) -> tuple[StepImages, list[torch.Tensor]]:
    """One step's images (resized to their native grids) and their native-size originals."""
    lo, hi = MIXES[mix]
    rng = np.random.default_rng([args.seed, list(MIXES).index(mix), seed_offset])
    budget = args.num_seqs * args.seq_len
    est_mean = {"native": 150, "paper": 60, "uniform": 240}[mix]
    sizes = sample_sizes(int(2.5 * budget / est_mean) + 16, rng, "long", lo, hi)
    grid_rule = fill_grid if mix == "uniform" else fit_grid
    grids = [grid_rule(int(h), int(w), PATCH, MAX_TOKENS) for h, w in sizes]
    lengths = [r * c for r, c in grids]
    seq_of = assign_first_fit(lengths, args.seq_len, max_examples_per_seq=args.max_examples_per_seq,
                              num_seqs=args.num_seqs)
    packed = [i for i, s in enumerate(seq_of) if s != PAD]
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    originals, pixels, tokens = [], [], []
    for i in packed:
        h, w = (int(x) for x in sizes[i])
        image = torch.rand(3, h, w, generator=g)
        resized = resize_to_grid(image, grids[i], PATCH)
        originals.append(image)
        pixels.append(resized.contiguous())
        patches, grid = patchify(resized, (PATCH, PATCH))
        tokens.append(Example(patches, grid_coords(*grid), grid))
    labels = torch.randint(0, args.num_classes, (len(packed),), generator=g)
    step = StepImages(pixels, tokens, [seq_of[i] for i in packed], labels,
                      args.seq_len, args.num_seqs, args.max_examples_per_seq)
    return step, originals


def step_stats(step: StepImages, args) -> dict:
    from navit.attention import auto_backend

    counts = [t.num_tokens for t in step.tokens]
    aspects = [p.shape[2] / p.shape[1] for p in step.pixels]
    side = ceiling_side(step)
    batch = navit_prepare(step).inputs
    plan = auto_backend(torch.device("cpu"), args.precision == "bf16").prepare(batch.segment_ids)
    buckets = [b.size for b in plan.buckets]
    # Attention work in scores per head: navit's images (sum n^2), its padded buckets, the
    # ceiling's equal squares, and the dense masks of lucidrains / navit-dense.
    work = {
        "sum_n2": sum(n * n for n in counts),
        "navit_buckets": sum(g * m * m for g, m in buckets) if buckets else None,
        "ceiling": step.num_images * side**4,
        "timm_per_image": step.num_images * max(counts) ** 2,
        "dense_B_L2": step.num_seqs * step.seq_len**2,
    }
    return {
        "attention_work": work,
        "navit_plan": "dense fallback" if plan.dense_mask is not None else f"{len(buckets)} buckets",
        "navit_buckets": buckets,
        "images": step.num_images,
        "real_tokens": step.real_tokens,
        "mean_tokens": statistics.mean(counts),
        "min_tokens": min(counts),
        "max_tokens": max(counts),
        "aspect_w_over_h_range": [min(aspects), max(aspects)],
        "navit_padding": 1 - step.real_tokens / (step.num_seqs * step.seq_len),
        "timm_padding": 1 - step.real_tokens / (step.num_images * max(counts)),
        "ceiling_side": ceiling_side(step),
    }


# --------------------------------------------------------------------------------------------
# Data preparation (loader-side work), timed apart from the model step
# --------------------------------------------------------------------------------------------
def time_prep(step: StepImages, originals: list[torch.Tensor], impls: dict[str, Impl], repeats: int) -> dict:
    fns = {}
    fns["navit: patchify (resized pixels)"] = lambda: [patchify(p, (PATCH, PATCH)) for p in step.pixels]
    fns["navit: pack (pre-patchified)"] = lambda: impls["navit"].prepare(step)
    fns["navit: pack_images (native pixels: resize+patchify+pack)"] = lambda: navit.pack_images(
        originals, PATCH, step.seq_len, max_examples_per_seq=step.max_examples_per_seq
    )
    if "timm-naflex" in impls:
        fns["timm: Patchify + NaFlexCollator"] = lambda: impls["timm-naflex"].prepare(step)
    if "lucidrains" in impls:
        from vit_pytorch.na_vit import group_images_by_max_seq_len

        fns["lucidrains: group_images_by_max_seq_len"] = lambda: group_images_by_max_seq_len(
            step.pixels, patch_size=16, max_seq_len=step.seq_len
        )
    times = interleaved(fns, warmup=1, repeats=repeats)
    return {name: summarize(t) for name, t in times.items()}


# --------------------------------------------------------------------------------------------
# Model steps
# --------------------------------------------------------------------------------------------
def autocast(args) -> contextlib.AbstractContextManager:
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def counted_flops(fn, model, args) -> int:
    """FLOPs of one ``fn()`` (``count_flops``). FlexAttention compiles itself, which no counting
    dispatch mode survives, so a navit model that would attend with it (CUDA, fp32) is counted with
    the bucketed backend: the same attention over each image's own tokens."""
    config = getattr(model, "config", None)
    if isinstance(config, navit.NaViTConfig):
        with autocast(args):
            uses_flex = model.attention_backend(next(model.parameters()).device).name == "flex"
        if uses_flex:
            model.config = config.replace(attn_backend="bucketed")
            try:
                return count_flops(fn)
            finally:
                model.config = config
    return count_flops(fn)


def make_train_fn(impl: Impl, model, prepared: Prepared, args):
    # The same optimizer for everyone: fused where this torch has it for the device.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(args):
            logits = impl.forward(model, prepared.inputs)
        loss = F.cross_entropy(logits.float(), prepared.labels)
        loss.backward()
        opt.step()
        synchronize(args.device)
        return loss

    return step


def make_infer_fn(impl: Impl, model, prepared: Prepared, args):
    def step():
        model.eval()
        with torch.no_grad(), autocast(args):
            out = impl.forward(model, prepared.inputs)
        synchronize(args.device)
        return out

    return step


def matmul_peak_gflops(args) -> float:
    """GFLOP/s of one large square matmul in the step's precision: what GEMMs can reach here."""
    n = 2048 if args.device.type == "cpu" else 8192
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=args.device, dtype=dtype) for _ in range(2))
    times = []
    for _ in range(6):
        synchronize(args.device)
        t0 = time.perf_counter()
        a @ b
        synchronize(args.device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[1:]) / 1e9


def paired_ratios(times: dict[str, list[float]], a: str, b: str, work_a: float, work_b: float) -> list[float]:
    """Per-repeat (work_a / t_a) / (work_b / t_b): both ran within the same repeat."""
    return [(work_a / ta) / (work_b / tb) for ta, tb in zip(times[a], times[b])]


def section_warnings(monitor: NoiseMonitor, label: str, threads: int) -> tuple[str | None, dict]:
    """Busy-machine and OpenMP-stall warnings right before a timed section (printed too)."""
    probe = stall_probe(threads)
    stall = stall_warning(probe, threads)
    if stall:
        print(f"{stall} [{label}]", file=sys.stderr, flush=True)
    warning = "; ".join(w for w in (monitor.busy_warning(label), stall) if w)
    monitor.start()
    return warning or None, probe


def timed(label: str, fns: dict, warmup: int, repeats: int, args, monitor: NoiseMonitor) -> tuple[dict, dict]:
    """``interleaved`` with noise bookkeeping. A run during which other processes used more than
    NOISY_OTHER_CPU of the machine (or that started with stalling threads) is repeated up to
    ``--retry-noisy`` times after a pause; the quietest attempt is kept and flagged if noisy."""
    attempts = []
    for attempt in range(1 + args.retry_noisy):
        warning, probe = section_warnings(monitor, label, args.threads)
        times = interleaved(fns, warmup, repeats)
        other = monitor.other_cpu_fraction()
        stalled = args.threads > 1 and probe["ratio"] > 0.9
        noisy = stalled or (other is not None and other > NOISY_OTHER_CPU)
        attempts.append((other or 0.0, times, {"busy_warning": warning, "stall_probe": probe,
                                               "other_cpu_fraction": other, "noisy": noisy}))
        if not noisy:
            break
        if attempt < args.retry_noisy:
            print(f"  [{label}] other processes used {100 * (other or 0):.0f}% of the machine"
                  f"{' (threads stalled)' if stalled else ''}: retrying in {args.retry_wait:.0f} s",
                  file=sys.stderr, flush=True)
            time.sleep(args.retry_wait)
    other, times, info = min(attempts, key=lambda a: a[0])
    info["attempts"] = len(attempts)
    info["other_cpu_fraction_all"] = [a[0] for a in attempts]
    return times, info


def run_mode(mode: str, mix: str, step: StepImages, impls: dict[str, Impl], models: dict,
             prepared: dict[str, Prepared], args, monitor: NoiseMonitor) -> dict:
    warmup = args.warmup
    repeats = args.repeats if mode == "train" else args.infer_repeats
    maker = make_train_fn if mode == "train" else make_infer_fn
    fns = {k: maker(impls[k], models[k], prepared[k], args) for k in impls}
    # Sanity: every implementation returns one row of logits per image.
    for k, fn in fns.items():
        out = fn() if mode == "infer" else impls[k].forward(models[k], prepared[k].inputs)
        if out.shape != (step.num_images, args.num_classes):
            raise AssertionError(f"{k} returned {tuple(out.shape)} for {step.num_images} images")
    flops = {k: counted_flops(fn, models[k], args) for k, fn in fns.items()}  # of one step, as torch counts them
    times, noise = timed(f"{mode}/{mix}", fns, warmup, repeats, args, monitor)
    rows = {}
    for k, t in times.items():
        s = summarize(t)
        p = prepared[k]
        s.update(
            images_per_s=step.num_images / s["median_s"],
            images_per_s_best=step.num_images / s["min_s"],
            real_tokens_per_s=p.real_tokens / s["median_s"],
            computed_tokens_per_s=p.computed_tokens / s["median_s"],
            real_tokens=p.real_tokens,
            computed_tokens=p.computed_tokens,
            note=p.note,
            gflop=flops[k] / 1e9,
            # Model FLOPs utilisation: counted FLOPs per second over one large square matmul's rate.
            mfu=flops[k] / s["median_s"] / (args.peak_gflops * 1e9) if args.peak_gflops else None,
        )
        if k == "linear-only":  # its step is its GEMMs and nothing else
            s["gemm_gflops"] = flops[k] / s["median_s"] / 1e9
        rows[k] = s
    ratios = {}
    if "navit" in times:
        for other in times:
            if other == "navit":
                continue
            r = paired_ratios(times, "navit", other, prepared["navit"].real_tokens, prepared[other].real_tokens)
            ratios[other] = {
                "median": statistics.median(r),
                "min": min(r),
                "max": max(r),
                "of_medians": rows["navit"]["real_tokens_per_s"] / rows[other]["real_tokens_per_s"],
                "of_mins": (prepared["navit"].real_tokens / rows["navit"]["min_s"])
                / (prepared[other].real_tokens / rows[other]["min_s"]),
                "target": TARGETS.get((mix, mode, other)),
            }
            if "ceiling" in times and other != "ceiling":
                # What navit would reach if it ran as fast as the mask-free ceiling.
                c = paired_ratios(times, "ceiling", other, prepared["ceiling"].real_tokens, prepared[other].real_tokens)
                ratios[other]["ceiling_over_peer"] = statistics.median(c)
    diag = {}
    pairs = [("navit-squares", "ceiling"), ("navit-squares", "ceiling-same"), ("ceiling-same", "ceiling"),
             ("navit-lean", "ceiling"), ("navit", "navit-squares"),
             ("linear-only", "lucidrains"), ("linear-only", "lucidrains-own")]
    for a_, b_ in pairs:
        if a_ in times and b_ in times:
            r = paired_ratios(times, a_, b_, prepared[a_].real_tokens, prepared[b_].real_tokens)
            diag[f"{a_} / {b_}"] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    return {"rows": rows, "ratios": ratios, "diagnostic_ratios": diag, "raw_s": times, **noise,
            "load_end": load_average()}


# --------------------------------------------------------------------------------------------
# Sequence-length sweep (navit vs the dense-mask implementations)
# --------------------------------------------------------------------------------------------
def run_lsweep(args, impls: dict[str, Impl], monitor: NoiseMonitor) -> dict:
    """Training step at several L with the tokens per batch fixed (B = tokens / L): the dense
    [L, L] masks of lucidrains and navit-dense grow with L, navit's buckets do not."""
    import copy

    keys = [k for k in ("navit", "navit-dense", "lucidrains") if k in impls]
    points = []
    for length in args.lsweep_lens:
        sub = copy.copy(args)
        sub.seq_len = length
        sub.num_seqs = max(1, args.lsweep_tokens // length)
        sub.max_examples_per_seq = max(args.max_examples_per_seq, length // 64)
        step, _ = make_step(args.lsweep_mix, sub, seed_offset=length)
        torch.manual_seed(args.seed)
        models = {k: build_on(impls[k], args, step) for k in keys}
        prepared = {k: prepare_on(impls[k], step, args.device) for k in keys}
        check_real_tokens_match(prepared, step)
        fns = {k: make_train_fn(impls[k], models[k], prepared[k], args) for k in keys}
        times, noise = timed(f"lsweep/L={length}", fns, 1, args.lsweep_repeats, args, monitor)
        point = {"seq_len": length, "num_seqs": sub.num_seqs, "images": step.num_images,
                 "real_tokens": step.real_tokens, "median_s": {}, "min_s": {}, "ratios": {}, **noise}
        for k in keys:
            point["median_s"][k] = statistics.median(times[k])
            point["min_s"][k] = min(times[k])
        if "navit" in times:
            for other in keys:
                if other != "navit":
                    point["ratios"][other] = statistics.median(
                        paired_ratios(times, "navit", other, step.real_tokens, step.real_tokens))
        points.append(point)
        print(f"  L={length:5d} B={sub.num_seqs:2d} {step.num_images:3d} images: "
              + ", ".join(f"{k} {point['median_s'][k] * 1e3:.0f} ms" for k in keys)
              + "".join(f"; navit/{o} {r:.2f}x" for o, r in point["ratios"].items()), flush=True)
        del models, prepared, fns
    return {"mix": args.lsweep_mix, "tokens_per_batch": args.lsweep_tokens, "points": points}


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------
def run_loader(args, monitor: NoiseMonitor) -> dict:
    from navit.data.loader import PackedLoader
    from navit.data.sources import ImageFolder
    from navit.synthetic.shapes import SyntheticShapes, write_image_folder
    from navit.data.transforms import ExampleTransform

    tmp = Path(tempfile.mkdtemp(prefix="navit_peers_loader_"))
    try:
        t0 = time.perf_counter()
        source = SyntheticShapes(num_images=args.loader_images, seed=args.seed, min_side=64, max_side=512)
        write_image_folder(source, tmp, progress=False)
        write_s = time.perf_counter() - t0
        folder = ImageFolder(tmp)
        results = {}
        for workers in args.loader_workers:
            loader = PackedLoader(
                source=folder,
                transform=ExampleTransform(navit.Processor(patch_size=16, max_tokens=MAX_TOKENS)),
                seq_len=args.seq_len,
                num_seqs=args.num_seqs,
                max_examples_per_seq=args.max_examples_per_seq,
                buffer_size=args.loader_buffer,
                num_workers=workers,
                seed=args.seed,
                train=True,
            )
            warning, _ = section_warnings(monitor, f"loader/{workers} workers", args.threads)
            stamps, images, tokens, padding = [], [], [], []
            t_start = time.perf_counter()
            # Stop while the stream still loads: the final flush of the buffer packs without
            # decoding anything and would overstate the rate.
            per_batch = args.num_seqs * min(args.max_examples_per_seq, args.seq_len / (MAX_TOKENS / 2))
            limit = max(2, int((args.loader_images - args.loader_buffer) / max(1, per_batch) * 0.9))
            for i, out in enumerate(loader):
                stamps.append(time.perf_counter())
                images.append(out.batch.num_examples)
                tokens.append(out.batch.num_real_tokens)
                padding.append(out.batch.padding_fraction)
                if i + 1 >= limit:
                    break
            first = stamps[0] - t_start
            steady = stamps[-1] - stamps[0]
            n = len(stamps) - 1
            results[workers] = {
                "batches": len(stamps),
                "first_batch_s": first,
                "steady_batches_per_s": n / steady if steady > 0 else float("nan"),
                "steady_images_per_s": sum(images[1:]) / steady if steady > 0 else float("nan"),
                "steady_real_tokens_per_s": sum(tokens[1:]) / steady if steady > 0 else float("nan"),
                "mean_images_per_batch": statistics.mean(images),
                "mean_padding": statistics.mean(padding),
                "overall_batches_per_s": len(stamps) / (stamps[-1] - t_start),
                "busy_warning": warning,
                "other_cpu_fraction": monitor.other_cpu_fraction(),
            }
        return {"write_s": write_s, "num_files": len(folder), "by_workers": results}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Memory (one subprocess per point)
# --------------------------------------------------------------------------------------------
def memory_worker(args) -> None:
    """Runs in a fresh process: peak extra memory of one navit training step at --mem-len
    (RSS high-water mark on CPU, ``max_memory_allocated`` on CUDA)."""
    torch.set_num_threads(args.threads)
    device = args.device
    length, backend = args.mem_len, args.mem_backend
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
    e = len(tokens)
    batch = navit.pack(tokens, length, max_examples_per_seq=e, num_seqs=1).batch.to(device)
    labels = torch.randint(0, args.num_classes, (e,), generator=g).to(device)
    model = navit.create_model(WIDTHS[args.width].navit_preset, num_classes=args.num_classes, depth=args.depth,
                               attn_backend=backend).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(args):
            logits = model(batch)
        F.cross_entropy(logits.float(), labels).backward()
        opt.step()
        synchronize(device)

    step()  # allocates optimizer state and warms up
    opt.zero_grad(set_to_none=True)
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
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
        "seq_len": length, "backend": backend, "images": e, "real_tokens": batch.num_real_tokens,
        "before_mb": before / 1024, "peak_mb": peak / 1024, "extra_mb": (peak - before) / 1024,
        "hwm_reset": reset, "step_s": elapsed, "plan": plan_kind,
    }))


def run_memory(args) -> dict:
    points = []
    for length in args.memory_lens:
        for backend in args.memory_backends:
            if backend == "dense" and length > args.dense_max_len:
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker",
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


# --------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def navit_ranges(models: dict):
    """Label navit's modules and attention calls in the profiler without editing navit:
    forward hooks open/close record_function ranges; backend methods are wrapped in place."""
    from torch.autograd.profiler import record_function

    from navit.attention.bucketed import BucketedBackend
    from navit.attention.dense import DenseBackend

    handles, stacks = [], {}

    def pre(name):
        def hook(module, inputs):
            ctx = record_function(name)
            ctx.__enter__()
            stacks.setdefault(id(module), []).append(ctx)
        return hook

    def post(module, inputs, output):
        stacks[id(module)].pop().__exit__(None, None, None)

    from navit.model import Attention, Mlp, NaViT
    from navit.pooling import MAPPool, MeanPool
    from navit.posemb import FactorizedPosEmbed

    kinds = {Attention: "navit::Attention", Mlp: "navit::Mlp", MAPPool: "navit::MAPPool",
             MeanPool: "navit::MeanPool", FactorizedPosEmbed: "navit::FactorizedPosEmbed"}
    for key, model in models.items():
        if not isinstance(model, NaViT):
            continue
        for module in model.modules():
            for cls, name in kinds.items():
                if type(module) is cls:
                    handles.append(module.register_forward_pre_hook(pre(name)))
                    handles.append(module.register_forward_hook(post))
    originals = []

    def wrap(cls, meth):
        fn = getattr(cls, meth)

        def wrapped(self, *a, **k):
            with record_function(f"navit::{cls.__name__}.{meth}"):
                return fn(self, *a, **k)

        originals.append((cls, meth, fn))
        setattr(cls, meth, wrapped)

    for cls in (BucketedBackend, DenseBackend):
        for meth in ("prepare", "attend"):
            wrap(cls, meth)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for cls, meth, fn in originals:
            setattr(cls, meth, fn)


def run_profile(mix: str, impls: dict[str, Impl], models: dict, prepared: dict, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    # On a GPU the kernels' own time is what matters; on CPU the ops' self time.
    self_time = "self_device_time_total" if args.device.type == "cuda" else "self_cpu_time_total"

    out = {}
    keys = [k for k in impls if k in args.profile_impls]
    threads = args.profile_threads or args.threads
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    for mode in ("train", "infer"):
        for key in keys:
            maker = make_train_fn if mode == "train" else make_infer_fn
            fn = maker(impls[key], models[key], prepared[key], args)
            fn()  # warm
            with navit_ranges({key: models[key]}):
                with profile(activities=activities, record_shapes=False) as prof:
                    for _ in range(args.profile_steps):
                        fn()
            events = prof.key_averages()
            total_us = sum(getattr(e, self_time) for e in events)
            table = events.table(sort_by=self_time, row_limit=40)
            ranges = sorted(
                [e for e in events if e.key.startswith("navit::")], key=lambda e: -e.cpu_time_total
            )
            path = args.out.parent / f"peers_profile_{mix}_{mode}_{key}.txt"
            path.write_text(
                f"# {key}, {mode} step, mix {mix}, {args.profile_steps} steps, {threads} threads\n"
                f"# total self CPU: {total_us / 1e3 / args.profile_steps:.1f} ms/step\n\n{table}\n\n"
                "# navit ranges (forward only for modules; cpu_time_total incl. children)\n"
                + "\n".join(f"{e.key:45s} {e.cpu_time_total / 1e3 / args.profile_steps:9.2f} ms/step "
                            f"x{e.count // args.profile_steps}" for e in ranges)
                + "\n"
            )
            top = sorted(events, key=lambda e: -getattr(e, self_time))[: args.profile_top]
            out[f"{mode}/{key}"] = {
                "total_self_ms_per_step": total_us / 1e3 / args.profile_steps,
                "top_ops": [
                    {"op": e.key, "self_ms_per_step": getattr(e, self_time) / 1e3 / args.profile_steps,
                     "share": getattr(e, self_time) / total_us if total_us else 0.0,
                     "calls_per_step": e.count / args.profile_steps}
                    for e in top
                ],
                "navit_ranges": [
                    {"range": e.key, "total_ms_per_step": e.cpu_time_total / 1e3 / args.profile_steps,
                     "calls_per_step": e.count / args.profile_steps}
                    for e in ranges
                ],
                "table_file": path.name,
            }
            print(f"  profile {mix}/{mode}/{key}: {total_us / 1e3 / args.profile_steps:.0f} ms/step -> {path.name}",
                  flush=True)
    torch.set_num_threads(old_threads)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def render_markdown(res: dict) -> str:
    a = res["args"]
    dims = WIDTHS[a.get("width", "ti")]
    device = a.get("device", "cpu")
    where = res["machine"].get("gpu", "CPU") if device != "cpu" else "CPU"
    lines = [f"# navit vs public NaViT / NaFlex implementations ({where}, {a.get('precision', 'fp32')})", ""]
    m = res["machine"]
    lines += [
        f"`{' '.join(res['command'])}` — torch {m['torch']}, Python {m['python']}, "
        f"{m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, torch threads {a['threads']}; "
        f"load average at start {fmt(m['load_average_start'], 2)}; total {res['elapsed_s']:.0f} s.",
        "",
        f"Model: {dims.label} widths (width {dims.width}, {dims.heads} heads, MLP {dims.mlp}), patch 16, "
        f"depth {a['depth']}, {a['num_classes']} classes. "
        f"Batch: {a['num_seqs']} sequences × L={a['seq_len']} (max {a['max_examples_per_seq']} images per "
        f"sequence), first-fit packed; timings: {a['warmup']} warm-up + median of {a['repeats']} (train) / "
        f"{a['infer_repeats']} (infer) interleaved repeats. Ratios are medians of per-repeat paired ratios "
        "(navit and the peer timed within the same repeat) on **real tokens/s**.",
        "",
        "Implementations:",
        "",
    ]
    for key, info in res["impls"].items():
        lines.append(f"- **{key}**: {info['detail'] if info['available'] else 'SKIPPED — ' + info['missing']}")
    lines.append("")
    for w in res.get("warnings", []):
        lines += [f"> {w}", ""]

    for mix, mres in res["mixes"].items():
        st = mres["stats"]
        lines += [f"## Mix `{mix}`", "",
                  f"{st['images']} images, {st['real_tokens']} real tokens (mean {st['mean_tokens']:.1f}, "
                  f"min {st['min_tokens']}, max {st['max_tokens']} per image; W/H "
                  f"{st['aspect_w_over_h_range'][0]:.2f}..{st['aspect_w_over_h_range'][1]:.2f}). Padding: navit "
                  f"{100 * st['navit_padding']:.1f}%, timm per-image {100 * st['timm_padding']:.1f}%; ceiling: "
                  f"{st['images']} images of {st['ceiling_side']}×{st['ceiling_side']} tokens.", ""]
        w = st["attention_work"]
        lines += ["Attention work (scores per head, relative to the ceiling's equal squares): navit images Σnᵢ² "
                  f"{w['sum_n2'] / w['ceiling']:.2f}×, navit buckets ({st['navit_plan']}) "
                  + ("—" if w["navit_buckets"] is None else f"{w['navit_buckets'] / w['ceiling']:.2f}×")
                  + f", timm per-image padding {w['timm_per_image'] / w['ceiling']:.2f}×, dense B·L² "
                  f"{w['dense_B_L2'] / w['ceiling']:.2f}×. Varied sizes alone make Σnᵢ² > N·mean²: that part "
                  "of navit's gap to the ceiling is the data, not overhead.", ""]
        for mode in ("train", "infer"):
            if mode not in mres:
                continue
            r = mres[mode]
            title = "Training step (fwd + bwd + AdamW)" if mode == "train" else "Inference (no_grad, eval)"
            lines += [f"### {title}", ""]
            rows = []
            for key, s in r["rows"].items():
                rows.append([key, f"{s['median_s'] * 1e3:.0f}", f"{s['min_s'] * 1e3:.0f}",
                             fmt(s["images_per_s"]), fmt(s["real_tokens_per_s"], 0),
                             fmt(s["computed_tokens_per_s"], 0), fmt(s.get("gflop")),
                             "—" if s.get("mfu") is None else f"{100 * s['mfu']:.0f}%",
                             f"{s['spread']:.2f}" + ("*" if s["spread"] > 1.5 else ""), s["note"]])
            lines.append(md_table(["impl", "median ms", "min ms", "images/s", "real tok/s",
                                   "computed tok/s", "GFLOP", "MFU", "max/min", "note"], rows, "lrrrrrrrrl"))
            lines.append("")
            if r["ratios"]:
                rows = []
                for other, q in r["ratios"].items():
                    tgt = q["target"]
                    verdict = "" if tgt is None else ("PASS" if q["median"] >= tgt else "**MISS**")
                    if verdict and r.get("noisy"):
                        verdict += " (noisy)"
                    head = q.get("ceiling_over_peer")
                    rows.append([f"navit / {other}", f"{q['median']:.2f}×", f"{q['min']:.2f}–{q['max']:.2f}",
                                 f"{q['of_mins']:.2f}×", "—" if head is None else f"{head:.2f}×",
                                 "" if tgt is None else f"≥ {tgt}×", verdict])
                for name, q in r.get("diagnostic_ratios", {}).items():
                    rows.append([f"_{name}_", f"{q['median']:.2f}×", f"{q['min']:.2f}–{q['max']:.2f}", "", "", "", ""])
                lines.append(md_table(["ratio (real tok/s)", "median", "range", "of mins",
                                       "ceiling / peer (bound)", "target", ""], rows, "lrrrrrl"))
                lines.append("")
            lin = r["rows"].get("linear-only")
            if lin and res.get("matmul_peak_gflops"):
                lines += [f"`linear-only` runs its GEMMs at {lin['gemm_gflops']:.0f} GFLOP/s; one large square "
                          f"matmul on this device: {res['matmul_peak_gflops']:.0f} GFLOP/s.", ""]
            extra = []
            if r.get("noisy"):
                lines += [f"**Unreliable table**: other processes used {100 * (r.get('other_cpu_fraction') or 0):.0f}% "
                          f"of the machine during it (best of {r.get('attempts', 1)} attempts)"
                          + ("; OpenMP threads stalled" if r.get("stall_probe", {}).get("ratio", 0) > 0.9
                             and a["threads"] > 1 else "") + ".", ""]
            if r.get("busy_warning"):
                extra.append(r["busy_warning"])
            if r.get("other_cpu_fraction") is not None:
                extra.append(f"other processes used {100 * r['other_cpu_fraction']:.0f}% of the machine "
                             "during this table")
            if extra:
                lines += ["_" + "; ".join(extra) + "_", ""]
        if "prep" in mres:
            lines += ["### Data preparation per batch (loader-side work, not in the step times)", ""]
            rows = [[k, f"{v['median_s'] * 1e3:.2f}", f"{v['min_s'] * 1e3:.2f}"] for k, v in mres["prep"].items()]
            lines += [md_table(["what", "median ms", "min ms"], rows), ""]
        if "profile" in mres:
            lines += [f"### Profile: top ops by self CPU time (ms per step, {mres.get('profile_threads')} threads)", ""]
            for name, p in mres["profile"].items():
                ops = ", ".join(f"`{o['op']}` {o['self_ms_per_step']:.1f} ({100 * o['share']:.0f}%)"
                                for o in p["top_ops"][:8])
                lines.append(f"- **{name}** ({p['total_self_ms_per_step']:.0f} ms): {ops}")
                if p["navit_ranges"]:
                    rng = ", ".join(f"`{e['range'][7:]}` {e['total_ms_per_step']:.1f}" for e in p["navit_ranges"][:8])
                    lines.append(f"  - navit forward ranges (incl. children): {rng}")
            lines.append("")

    if "lsweep" in res:
        ls = res["lsweep"]
        keys = list(ls["points"][0]["median_s"]) if ls["points"] else []
        others = [k for k in keys if k != "navit"]
        lines += [f"## Training step vs sequence length L (mix `{ls['mix']}`, {ls['tokens_per_batch']} tokens per "
                  "batch, B = tokens / L)", "",
                  "The dense-mask implementations pay for B·L² attention scores; navit's buckets pay Σnᵢ², "
                  "independent of L. 1 warm-up + median of "
                  f"{a['lsweep_repeats']} interleaved repeats.", ""]
        rows = []
        for pt in ls["points"]:
            row = [str(pt["seq_len"]), str(pt["num_seqs"]), str(pt["images"])]
            row += [f"{pt['median_s'][k] * 1e3:.0f}" for k in keys]
            row += [f"{pt['ratios'][o]:.2f}×" for o in others]
            row.append(f"noisy: others {100 * (pt.get('other_cpu_fraction') or 0):.0f}%" if pt.get("noisy") else "")
            rows.append(row)
        lines += [md_table(["L", "B", "images"] + [f"{k} ms" for k in keys] + [f"navit / {o}" for o in others]
                           + [""], rows), ""]

    if "loader" in res:
        ld = res["loader"]
        lines += ["## Data loader: `PackedLoader` on PNG files vs the training step it feeds", "",
                  f"{ld['num_files']} SyntheticShapes PNGs (sides 64..512, aspect 1:4..4:1) written in "
                  f"{ld['write_s']:.1f} s, read by `ImageFolder`, `Processor(max_tokens=256)`, "
                  f"{a['num_seqs']}×{a['seq_len']} batches, buffer {a['loader_buffer']} images. Steady state "
                  "excludes the first batch and the end-of-epoch flush.", ""]
        rows = []
        for workers, w in ld["by_workers"].items():
            row = [str(workers), f"{w['first_batch_s']:.2f}", f"{w['steady_batches_per_s']:.2f}",
                   fmt(w["steady_images_per_s"]), fmt(w["mean_images_per_batch"]),
                   f"{100 * w['mean_padding']:.1f}%"]
            cmp = ld.get("vs_train", {}).get(str(workers)) or ld.get("vs_train", {}).get(workers)
            if cmp:
                row += [f"{cmp['batches_ratio']:.1f}×", f"{cmp['images_ratio']:.1f}×",
                        "PASS" if cmp["images_ratio"] >= 3 else "**MISS**"]
            else:
                row += ["—", "—", ""]
            rows.append(row)
        lines += [md_table(["workers", "first batch s", "batches/s", "images/s", "images/batch", "padding",
                            "batches/s ÷ train steps/s", "images/s ÷ train images/s", "target ≥ 3×"],
                           rows, "rrrrrrrrl"), ""]
        if ld.get("train_ref"):
            t = ld["train_ref"]
            lines += [f"Training reference: navit (auto) on mix `{t['mix']}`: {t['steps_per_s']:.2f} steps/s, "
                      f"{t['images_per_s']:.1f} images/s. On this 2-core VM the loader's workers and the "
                      "training step share the same cores, so the standalone loader rate is an upper bound.", ""]

    if "memory" in res:
        pts = [p for p in res["memory"]["points"] if "error" not in p]
        gauge = ("CUDA memory (`max_memory_allocated`)" if res["args"].get("device", "cpu") == "cuda"
                 else "RSS (VmHWM)")
        lines += [f"## Memory: peak extra {gauge} of one navit training step vs L", "",
                  "Fresh process per point; one sequence of L tokens filled with `native`-mix images; "
                  "optimizer state allocated by a first step, then the high-water mark is reset and "
                  "one more step runs. `extra` = peak − memory in use before the step.", ""]
        backends = sorted({p["backend"] for p in pts})
        lens = sorted({p["seq_len"] for p in pts})
        by = {(p["seq_len"], p["backend"]): p for p in pts}
        rows = []
        for L in lens:
            row = [str(L), str(by.get((L, backends[0]), {}).get("images", ""))]
            for b in backends:
                p = by.get((L, b))
                row += ["—", "—", "—"] if p is None else [
                    f"{p['extra_mb']:.0f}", f"{p['extra_mb'] / L * 1024:.1f}", f"{p['step_s']:.2f}"]
            rows.append(row)
        headers = ["L", "images"]
        for b in backends:
            headers += [f"{b} MB", f"{b} MB/1k tok", f"{b} step s"]
        lines += [md_table(headers, rows), ""]
        slopes = res["memory"].get("slopes", {})
        if slopes:
            lines += ["Log-log slope of extra MB vs L (1 = linear, 2 = quadratic), over L ≥ 1024: "
                      + ", ".join(f"{b} {s:.2f}" for b, s in slopes.items() if s is not None), ""]
    return "\n".join(lines)


def make_plots(res: dict, out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    mixes = [m for m in res["mixes"] if any(k in res["mixes"][m] for k in ("train", "infer"))]
    if mixes:
        modes = [mode for mode in ("train", "infer") if any(mode in res["mixes"][m] for m in mixes)]
        fig, axes = plt.subplots(len(modes), len(mixes), figsize=(5.5 * len(mixes), 3.8 * len(modes)), squeeze=False)
        for i, mode in enumerate(modes):
            for j, mix in enumerate(mixes):
                ax = axes[i][j]
                r = res["mixes"][mix].get(mode)
                if not r:
                    ax.axis("off")
                    continue
                keys = list(r["rows"])
                vals = [r["rows"][k]["real_tokens_per_s"] for k in keys]
                colors = ["tab:blue" if k.startswith("navit") else "tab:gray" if k in ("ceiling", "linear-only")
                          else "tab:orange" for k in keys]
                ax.barh(keys, vals, color=colors)
                ax.invert_yaxis()
                ax.set_xlabel("real tokens / s (median)")
                ax.locator_params(axis="x", nbins=5)
                ax.xaxis.set_major_formatter(
                    matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
                ax.set_xlim(0, max(vals) * 1.18)
                ax.set_title(f"{mode} — mix {mix}")
                for y, v in enumerate(vals):
                    ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
        fig.tight_layout()
        path = out_dir / "peers.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    if "memory" in res:
        pts = [p for p in res["memory"]["points"] if "error" not in p]
        if pts:
            fig, ax = plt.subplots(figsize=(6, 4))
            for b in sorted({p["backend"] for p in pts}):
                sel = sorted((p["seq_len"], p["extra_mb"]) for p in pts if p["backend"] == b)
                ax.loglog([x for x, _ in sel], [y for _, y in sel], "o-", label=b, base=2)
            xs = sorted({p["seq_len"] for p in pts})
            ref = [p for p in pts if p["seq_len"] == xs[0]]
            if ref:
                y0 = min(p["extra_mb"] for p in ref)
                ax.loglog(xs, [y0 * x / xs[0] for x in xs], "k:", label="linear", base=2)
            ax.set_xlabel("sequence length L (tokens)")
            ax.set_ylabel("peak extra memory during a train step (MB)")
            ax.set_title("navit training-step memory vs L")
            ax.legend()
            ax.grid(True, which="both", alpha=0.3)
            fig.tight_layout()
            path = out_dir / "peers_memory.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path.name)
    return written


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~3 minute version (fewer repeats, smaller sweeps)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES))
    p.add_argument("--impls", nargs="+", default=None,
                   help="subset of: navit navit-dense navit-lean lucidrains lucidrains-own timm-naflex ceiling "
                   "navit-squares linear-only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: torch.autocast for every implementation")
    p.add_argument("--compile", action="store_true",
                   help="add a navit-compiled row: torch.compile of the whole model (fixed packed shapes)")
    p.add_argument("--width", choices=list(WIDTHS), default="ti",
                   help="model size for every implementation: ti (192 wide, 3 heads), s (384, 6), b (768, 12)")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--num-seqs", type=int, default=4)
    p.add_argument("--max-examples-per-seq", type=int, default=32)
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "peers.json",
                   help="JSON path; the .md, PNGs and profile tables go next to it")
    # internal: one memory measurement in a fresh process
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mem-len", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--mem-backend", default="bucketed", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch " + torch.__version__)
    args.device = torch.device(args.device)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    monitor = NoiseMonitor(args.threads)
    warnings_ = []
    probe = stall_probe(args.threads)
    stall = stall_warning(probe, args.threads)
    if stall:
        print(stall, file=sys.stderr, flush=True)
    warnings_ += [w for w in (monitor.busy_warning("start"), stall) if w]

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
    model_sections = [s for s in ("train", "infer", "profile") if s in args.sections]
    args.peak_gflops = None
    if "train" in args.sections or "infer" in args.sections:  # only their tables quote it
        res["matmul_peak_gflops"] = args.peak_gflops = matmul_peak_gflops(args)
    for mix in args.mixes if model_sections else []:
        step, originals = make_step(mix, args)
        stats = step_stats(step, args)
        print(f"[{mix}] {stats['images']} images, {stats['real_tokens']} real tokens "
              f"(mean {stats['mean_tokens']:.0f}/image), navit padding {100 * stats['navit_padding']:.1f}%",
              flush=True)
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
        res["mixes"][mix] = mres
        del models, prepared

    if "lsweep" in args.sections and "navit" in impls:
        print("[lsweep]", flush=True)
        res["lsweep"] = run_lsweep(args, impls, monitor)

    if "loader" in args.sections:
        print("[loader]", flush=True)
        ld = run_loader(args, monitor)
        ref_mix = "native" if "native" in res["mixes"] else next(iter(res["mixes"]), None)
        ref = res["mixes"].get(ref_mix, {}).get("train", {}).get("rows", {}).get("navit") if ref_mix else None
        if ref:
            steps_per_s = 1.0 / ref["median_s"]
            ld["train_ref"] = {"mix": ref_mix, "steps_per_s": steps_per_s, "images_per_s": ref["images_per_s"]}
            ld["vs_train"] = {
                str(wk): {"batches_ratio": w_["steady_batches_per_s"] / steps_per_s,
                          "images_ratio": w_["steady_images_per_s"] / ref["images_per_s"]}
                for wk, w_ in ld["by_workers"].items()
            }
        ld["by_workers"] = {str(k): v for k, v in ld["by_workers"].items()}
        for wk, w_ in ld["by_workers"].items():
            print(f"  {wk} workers: {w_['steady_batches_per_s']:.2f} batches/s, "
                  f"{w_['steady_images_per_s']:.0f} images/s", flush=True)
        res["loader"] = ld

    if "memory" in args.sections:
        print("[memory]", flush=True)
        mem = run_memory(args)
        slopes = {}
        for b in args.memory_backends:
            sel = [(p["seq_len"], p["extra_mb"]) for p in mem["points"]
                   if p.get("backend") == b and "error" not in p and p["seq_len"] >= 1024]
            slopes[b] = loglog_slope([x for x, _ in sel], [y for _, y in sel])
        mem["slopes"] = slopes
        res["memory"] = mem

    res["args"] = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}
    res["elapsed_s"] = time.perf_counter() - t_start
    res["machine"]["load_average_end"] = load_average()
    res["plots"] = make_plots(res, args.out.parent)
    md = render_markdown(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    args.out.with_suffix(".md").write_text(md + "\n")
    print()
    print(md)
    print(f"\nwrote {args.out}, {args.out.with_suffix('.md')}" + "".join(f", {args.out.parent / p}" for p in res["plots"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
