"""Padding fraction of the NaViT packer on a realistic mix of image sizes and aspect ratios.

Only token counts are simulated: each image's patch grid comes from ``navit.patchify.fit_grid``
(no pixels are created) and sequences are assigned by ``navit.packing.assign_first_fit``.

Images: side s ~ U(64, 256) pixels (the longer side by default, ``--side short`` for the shorter
one) and an aspect ratio drawn from a weighted mix (mostly 4:3, 3:4, 16:9, 9:16, 1:1, plus a few
1:3, 3:1, 1:4, 4:1); patch 16, so an image has 4..256 tokens.

Scenarios, for each sequence length L, strategy and image-per-sequence limit E_max:

* ``offline``: all ``--num-images`` images packed at once, sequences opened as needed.
* ``per-batch``: the stream is cut into chunks of about ``num_seqs·L`` tokens and each chunk is
  packed on its own with sequences opened as needed (what ``pack_images`` does with one loader
  batch): no carry, so the last sequences of every batch are partly empty.
* ``stream×f``: a loader with a buffer. Before every batch the buffer is topped up from the stream
  until it holds at least ``f·num_seqs·L`` tokens; the buffer (carried images first, oldest first)
  is packed into exactly ``num_seqs`` sequences and whatever does not fit is carried to the next
  batch. Padding is averaged over batches after ``--warmup-batches``.
* ``loader``: the rule of ``navit.data.loader.PackedLoader``: pack into ``--loader-num-seqs``
  sequences whenever the buffer holds ``--loader-buffer`` images (defaults 8 and 256, the loader's).

For comparison, the peers' layouts of the same images (see ``peers.py``):

* ``next fit``: lucidrains' ``group_images_by_max_seq_len``: images in stream order, a new
  sequence whenever the next image does not fit the open one.
* ``per-image``: timm NaFlexViT's layout: every image padded to the longest image of its batch
  (batches of ``--loader-buffer`` images).

Padding fraction = 1 − real tokens / (sequences · L).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from navit.batch import PAD
from navit.packing import assign_first_fit
from navit.patchify import fit_grid
from report import RESULTS_DIR, md_table, pct, plain_args, write_json

# (width, height) aspect ratio -> weight
ASPECT_MIX: dict[tuple[int, int], float] = {
    (4, 3): 0.25,
    (3, 4): 0.15,
    (16, 9): 0.15,
    (9, 16): 0.10,
    (1, 1): 0.22,
    (3, 1): 0.03,
    (1, 3): 0.03,
    (4, 1): 0.035,
    (1, 4): 0.035,
}
STRATEGIES = ("first_fit", "first_fit_decreasing")


def sample_sizes(num: int, rng: np.random.Generator, side: str, lo: int, hi: int) -> np.ndarray:
    """[num, 2] (height, width) in pixels."""
    ratios = list(ASPECT_MIX)
    weights = np.array([ASPECT_MIX[r] for r in ratios], dtype=np.float64)
    choice = rng.choice(len(ratios), size=num, p=weights / weights.sum())
    s = rng.uniform(lo, hi, size=num)
    sizes = np.empty((num, 2), dtype=np.int64)
    for i in range(num):
        aw, ah = ratios[choice[i]]
        long_r, short_r = max(aw, ah), min(aw, ah)
        if side == "long":
            long_px, short_px = s[i], s[i] * short_r / long_r
        else:
            short_px, long_px = s[i], s[i] * long_r / short_r
        long_px, short_px = max(1, round(long_px)), max(1, round(short_px))
        w, h = (long_px, short_px) if aw >= ah else (short_px, long_px)
        sizes[i] = (h, w)
    return sizes


def token_counts(sizes: np.ndarray, patch: int, max_tokens: int) -> np.ndarray:
    out = np.empty(len(sizes), dtype=np.int64)
    for i, (h, w) in enumerate(sizes.tolist()):
        rows, cols = fit_grid(h, w, patch, max_tokens)
        out[i] = rows * cols
    return out


def seq_stats(lengths: np.ndarray, assign: list[int], num_seqs: int | None, seq_len: int) -> dict:
    a = np.asarray(assign)
    packed = a != PAD
    b = num_seqs if num_seqs is not None else int(a[packed].max()) + 1
    per_seq = np.bincount(a[packed], minlength=b)
    tokens = int(lengths[packed].sum())
    return {
        "seqs": b,
        "tokens": tokens,
        "padding": 1.0 - tokens / (b * seq_len),
        "images_per_seq_max": int(per_seq.max()),
        "images_per_seq_mean": float(per_seq.mean()),
    }


def check_enough_batches(measured: int, total: int, seq_len: int, warmup: int) -> None:
    if measured <= 0:
        raise SystemExit(
            f"only {total} batches at L={seq_len}, none after --warmup-batches {warmup}: "
            "raise --num-images or lower --num-seqs / --warmup-batches"
        )


def run_offline(lengths, seq_len, strategy, e_max) -> dict:
    t0 = time.perf_counter()
    assign = assign_first_fit(lengths.tolist(), seq_len, max_examples_per_seq=e_max, strategy=strategy)
    stats = seq_stats(lengths, assign, None, seq_len)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def run_per_batch(lengths, seq_len, strategy, e_max, num_seqs, warmup) -> dict:
    """Chunks of ~num_seqs·L tokens, each packed alone (no carry, sequences opened as needed)."""
    budget = num_seqs * seq_len
    cum = np.cumsum(lengths)
    # chunk k holds the images whose cumulative token count falls in (k·budget, (k+1)·budget]
    chunk_of = (cum - 1) // budget
    pads, seqs = [], []
    for k in range(int(chunk_of[-1])):  # drop the last (incomplete) chunk
        chunk = lengths[chunk_of == k]
        assign = assign_first_fit(chunk.tolist(), seq_len, max_examples_per_seq=e_max, strategy=strategy)
        st = seq_stats(chunk, assign, None, seq_len)
        pads.append(st["padding"])
        seqs.append(st["seqs"])
    check_enough_batches(len(pads) - warmup, len(pads), seq_len, warmup)
    pads, seqs = np.array(pads[warmup:]), np.array(seqs[warmup:])
    # token-weighted mean: total padding over total slots
    weighted = float(np.sum(pads * seqs) / np.sum(seqs))
    return {
        "batches": len(pads),
        "padding": weighted,
        "padding_batch_mean": float(pads.mean()),
        "padding_batch_p95": float(np.percentile(pads, 95)),
        "seqs_per_batch_min": int(seqs.min()),
        "seqs_per_batch_max": int(seqs.max()),
    }


def run_stream(lengths, seq_len, strategy, e_max, num_seqs, factor, warmup, buffer_images=None) -> dict:
    """Buffered loader: top up to factor·num_seqs·L tokens (or to ``buffer_images`` images, the
    rule of ``navit.data.loader.PackedLoader``), pack into num_seqs, carry the rest."""
    target = factor * num_seqs * seq_len
    buffer: list[tuple[int, int]] = []  # (image index, batch it entered the buffer)
    buffered_tokens = 0
    pos, batch = 0, 0
    pads, waits, carried, buf_images = [], [], [], []
    max_wait = 0
    n = len(lengths)
    while True:
        if buffer_images is None:
            while buffered_tokens < target and pos < n:
                buffer.append((pos, batch))
                buffered_tokens += int(lengths[pos])
                pos += 1
            if buffered_tokens < target:  # stream exhausted: stop before a starved batch
                break
        else:
            while len(buffer) < buffer_images and pos < n:
                buffer.append((pos, batch))
                pos += 1
            if len(buffer) < buffer_images:
                break
        lens = lengths[[i for i, _ in buffer]]
        assign = assign_first_fit(
            lens.tolist(), seq_len, max_examples_per_seq=e_max, num_seqs=num_seqs, strategy=strategy
        )
        st = seq_stats(lens, assign, num_seqs, seq_len)
        keep = []
        for (i, born), s in zip(buffer, assign):
            if s == PAD:
                keep.append((i, born))
            elif batch >= warmup:
                waits.append(batch - born)
        if batch >= warmup:
            pads.append(st["padding"])
            carried.append(len(keep))
            buf_images.append(len(buffer))
            max_wait = max(max_wait, max((batch - b for _, b in keep), default=0))
        buffer = keep
        buffered_tokens = int(lengths[[i for i, _ in buffer]].sum()) if buffer else 0
        batch += 1
    check_enough_batches(len(pads), batch, seq_len, warmup)
    pads = np.array(pads)
    waits = np.array(waits)
    return {
        "batches": len(pads),
        "buffer_factor": None if buffer_images is not None else factor,
        "buffer_images": buffer_images,
        "num_seqs": num_seqs,
        "padding": float(pads.mean()),
        "padding_batch_p95": float(np.percentile(pads, 95)),
        "padding_batch_max": float(pads.max()),
        "buffer_images_mean": float(np.mean(buf_images)),
        "carried_images_mean": float(np.mean(carried)),
        "wait_batches_mean": float(waits.mean()),
        "wait_batches_max": int(max(waits.max(), max_wait)),
    }


def next_fit_padding(lengths: np.ndarray, seq_len: int) -> float:
    """Padding of lucidrains' grouping rule: close the open sequence when the next image overflows it."""
    seqs, used = 1, 0
    for n in lengths.tolist():
        if used + n > seq_len:
            seqs, used = seqs + 1, 0
        used += n
    return 1.0 - float(lengths.sum()) / (seqs * seq_len)


def per_image_padding(lengths: np.ndarray, batch_images: int) -> float:
    """Padding when each image is padded to the longest of its batch (timm NaFlexViT's layout)."""
    full = len(lengths) // batch_images * batch_images
    batches = lengths[:full].reshape(-1, batch_images)
    return 1.0 - float(batches.sum()) / float(batches.max(axis=1).sum() * batch_images)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "packing_padding.json")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--min-side", type=int, default=64)
    p.add_argument("--max-side", type=int, default=256)
    p.add_argument("--side", choices=("long", "short"), default="long",
                   help="which side s ~ U(min, max) sets (default: the longer one)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--e-max", type=int, nargs="+", default=[8, 32],
                   help="max_examples_per_seq per entry of --seq-lens (also run with None)")
    p.add_argument("--num-seqs", type=int, default=32, help="sequences per batch (per-batch, stream)")
    p.add_argument("--buffer-factors", type=float, nargs="+", default=[1.0, 1.25, 2.0])
    p.add_argument("--warmup-batches", type=int, default=10)
    p.add_argument("--loader-buffer", type=int, default=256,
                   help="loader-like stream: pack whenever the buffer holds this many images")
    p.add_argument("--loader-num-seqs", type=int, default=8, help="num_seqs of the loader-like stream")
    p.add_argument("--sweep-multiples", type=float, nargs="+", default=[1.25, 1.5, 2.0, 3.0],
                   help="E_max sweep: E_max = ceil(k · L / mean tokens per image) for each k")
    p.add_argument("--sweep-factor", type=float, default=1.25, help="buffer factor used in the sweep")
    args = p.parse_args(argv)
    if len(args.e_max) != len(args.seq_lens):
        p.error("--e-max needs one value per --seq-lens entry")
    return args


def token_distribution(lengths: np.ndarray, sizes: np.ndarray, patch: int, seq_len: int) -> dict:
    return {
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "downscaled_to_fit": int(
            sum(math.floor(h / patch + 0.5) * math.floor(w / patch + 0.5) > seq_len for h, w in sizes.tolist())
        ),
    }


def run_scenarios(lengths: np.ndarray, seq_len: int, strategy: str, e_max: int | None, args) -> dict:
    """Every scenario of the module docstring for one (L, strategy, E_max)."""
    row = {"seq_len": seq_len, "strategy": strategy, "max_examples_per_seq": e_max}
    row["offline"] = run_offline(lengths, seq_len, strategy, e_max)
    row["per_batch"] = run_per_batch(lengths, seq_len, strategy, e_max, args.num_seqs, args.warmup_batches)
    row["stream"] = [run_stream(lengths, seq_len, strategy, e_max, args.num_seqs, f, args.warmup_batches)
                     for f in args.buffer_factors]  # fmt: skip
    row["loader"] = run_stream(lengths, seq_len, strategy, e_max, args.loader_num_seqs, 0.0, args.warmup_batches,
                               buffer_images=args.loader_buffer)  # fmt: skip
    return row


def run_sweep(sizes: np.ndarray, args) -> list[dict]:
    """Padding as E_max grows, offline and streaming, for both strategies."""
    sweep = []
    for seq_len in args.seq_lens:
        lengths = token_counts(sizes, args.patch, seq_len)
        per_seq = seq_len / lengths.mean()
        for e_max in sorted({math.ceil(k * per_seq) for k in args.sweep_multiples}):
            row = {"seq_len": seq_len, "max_examples_per_seq": e_max, "images_per_seq_mean": per_seq}
            for strategy in STRATEGIES:
                stream = run_stream(lengths, seq_len, strategy, e_max, args.num_seqs, args.sweep_factor,
                                    args.warmup_batches)  # fmt: skip
                row[strategy] = {"offline": run_offline(lengths, seq_len, strategy, e_max)["padding"],
                                 "stream": stream["padding"]}  # fmt: skip
            sweep.append(row)
    return sweep


def keys(row: dict) -> list:
    return [row["seq_len"], row["strategy"], row["max_examples_per_seq"]]


def detail(stream: dict) -> str:
    return (f"{pct(stream['padding'])} / {pct(stream['padding_batch_p95'])}, carry "
            f"{stream['carried_images_mean']:.0f}, wait≤{stream['wait_batches_max']}")  # fmt: skip


def render(res: dict, args) -> str:
    """The report: token counts, padding per scenario, the peers' layouts, streaming details, sweep."""
    results, aspects = res["results"], ", ".join(f"{w}:{h} {wt:.1%}" for (w, h), wt in ASPECT_MIX.items())
    lines = [f"\n### Packing padding (N={args.num_images} images, seed={args.seed}, {args.side} side ~ "
             f"U({args.min_side},{args.max_side}) px, patch {args.patch}, num_seqs={args.num_seqs})\n",
             f"Aspect mix (W:H): {aspects}\n"]  # fmt: skip
    lines += [f"L={L}: tokens/image mean {d['mean']:.1f}, median {d['median']:.0f}, range {d['min']}..{d['max']}, "
              f"downscaled to fit: {d['downscaled_to_fit']}" for L, d in res["token_distribution"].items()]  # fmt: skip
    fcols = [f"stream ×{f:g}" for f in args.buffer_factors]
    lcol = f"loader ({args.loader_buffer} imgs → {args.loader_num_seqs} seqs)"
    header = ["L", "strategy", "E_max", "offline", "per-batch (no carry)", *fcols, lcol, "max imgs/seq (offline)"]
    lines += ["", md_table(header, [keys(r) + [pct(r["offline"]["padding"]), pct(r["per_batch"]["padding"]),
                                               *(pct(s["padding"]) for s in r["stream"]), pct(r["loader"]["padding"]),
                                               r["offline"]["images_per_seq_max"]] for r in results],
                           "lll" + "r" * (len(header) - 3))]  # fmt: skip
    lines.append(f"\nThe peers' layouts of the same images (offline; per-image: batches of {args.loader_buffer}):\n")
    first_fit = {r["seq_len"]: r for r in results if r["strategy"] == "first_fit" and r["max_examples_per_seq"] is None}
    lines.append(md_table(["L", "navit first fit", "lucidrains next fit", "timm per-image padding"],
                          [[L, pct(first_fit[int(L)]["offline"]["padding"]), pct(p["next_fit"]), pct(p["per_image"])]
                           for L, p in res["peer_layouts"].items()], "lrrr"))  # fmt: skip
    lines.append("\nStreaming details (mean / p95 padding per batch, mean carried images, max wait in batches):\n")
    lines.append(md_table(["L", "strategy", "E_max", *fcols, lcol],
                          [keys(r) + [detail(s) for s in [*r["stream"], r["loader"]]] for r in results],
                          "lll" + "r" * (len(fcols) + 1)))  # fmt: skip
    nb = {r["seq_len"]: r["stream"][0]["batches"] for r in results}
    nl = {r["seq_len"]: r["loader"]["batches"] for r in results}
    lines.append(f"\nBatches averaged after {args.warmup_batches} warm-up: stream ×{args.buffer_factors[0]:g} {nb}, "
                 f"loader {nl}")
    sf = f"stream ×{args.sweep_factor:g}"
    lines.append(f"\nE_max sweep (E_max = ceil(k · L / mean tokens per image); {sf}):\n")
    lines.append(md_table(["L", "E_max", "k", "FF offline", f"FF {sf}", "FFD offline", f"FFD {sf}"],
                          [[r["seq_len"], r["max_examples_per_seq"], f"{r['max_examples_per_seq'] / r['images_per_seq_mean']:.2f}",
                            pct(r["first_fit"]["offline"]), pct(r["first_fit"]["stream"]),
                            pct(r["first_fit_decreasing"]["offline"]), pct(r["first_fit_decreasing"]["stream"])]
                           for r in res["e_max_sweep"]], "lrrrrrr"))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    sizes = sample_sizes(args.num_images, np.random.default_rng(args.seed), args.side, args.min_side, args.max_side)
    results, dists, peer_layouts = [], {}, {}
    for seq_len, e_real in zip(args.seq_lens, args.e_max):
        lengths = token_counts(sizes, args.patch, seq_len)
        dists[str(seq_len)] = token_distribution(lengths, sizes, args.patch, seq_len)
        peer_layouts[str(seq_len)] = {"next_fit": next_fit_padding(lengths, seq_len),
                                      "per_image": per_image_padding(lengths, args.loader_buffer)}  # fmt: skip
        for strategy in STRATEGIES:
            for e_max in (None, e_real):
                results.append(run_scenarios(lengths, seq_len, strategy, e_max, args))
                print(f"  done L={seq_len} {strategy} E_max={e_max} ({time.perf_counter() - t_start:.1f}s)",
                      file=sys.stderr)  # fmt: skip
    sweep = run_sweep(sizes, args)
    print(f"  done E_max sweep ({time.perf_counter() - t_start:.1f}s)", file=sys.stderr)
    payload = {"benchmark": "packing_padding", "config": plain_args(args),
               "aspect_mix": {f"{w}:{h}": wt for (w, h), wt in ASPECT_MIX.items()}, "token_distribution": dists,
               "results": results, "peer_layouts": peer_layouts, "e_max_sweep": sweep}  # fmt: skip
    print(render(payload, args))
    elapsed = time.perf_counter() - t_start
    print(f"\nTotal time: {elapsed:.1f}s")
    payload.update(python=platform.python_version(), numpy=np.__version__, elapsed_s=elapsed)
    print(f"Wrote {write_json(payload, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
