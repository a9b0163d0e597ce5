"""The images ``peers.py`` times every implementation on: the mixes, one step's images packed like
``PackedLoader`` packs them, their statistics, and the loader-side work of preparing them."""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np
import torch

import navit
from bench_common import interleaved, summarize
from navit.batch import PAD, Example
from navit.packing import assign_first_fit
from navit.patchify import fit_grid, grid_coords, patchify, resize_to_grid
from navit.processor import fill_grid
from packing_padding import sample_sizes
from peer_models import PATCH, Impl, Prepared, StepImages, ceiling_side, navit_prepare

MIXES = {  # name -> (long side lo, hi) in pixels; aspect mix of packing_padding.ASPECT_MIX
    "native": (64, 512),
    "paper": (64, 256),
    "uniform": (64, 512),  # every image scaled (up or down) to fill MAX_TOKENS, as SigLIP2 NaFlex does
}
MAX_TOKENS = 256  # per image


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


def time_prep(step: StepImages, originals: list[torch.Tensor], impls: dict[str, Impl], repeats: int) -> dict:
    """Seconds of each implementation's data preparation of one step (loader-side work, timed
    apart from the model step)."""
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
