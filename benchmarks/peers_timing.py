"""The timed sections of ``peers.py``: training and inference steps of every implementation,
interleaved within each repeat, with noise bookkeeping, FLOP counts and the paired ratios; and the
training step as the sequence length grows."""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import navit
from bench_common import (
    NOISY_OTHER_CPU, NoiseMonitor, count_flops, interleaved, stall_probe, stall_warning, summarize, synchronize,
    training_step,
)
from peer_models import WIDTHS, Impl, Prepared, StepImages, build_model, check_real_tokens_match
from peers_data import make_step, prepare_on
from report import load_average

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


def build_on(impl: Impl, args, step: StepImages) -> torch.nn.Module:
    model = build_model(impl, args.num_classes, args.depth, WIDTHS[args.width], step).to(args.device)
    return torch.compile(model) if impl.extra.get("compile") else model


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
    return training_step(model, lambda m: impl.forward(m, prepared.inputs),
                         lambda logits: F.cross_entropy(logits.float(), prepared.labels), args.device,
                         args.precision == "bf16", opt)  # fmt: skip


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
