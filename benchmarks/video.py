"""Video: packed clips against padding every clip to the longest, lucidrains' 3-D NaViT, the loader
on real encoded clips, and padding of a mixed stream of clips and images.

    python benchmarks/video.py                                  # navit rows only (~3 min)
    /opt/peers-venv/bin/python benchmarks/video.py              # with lucidrains (vit-pytorch)
    python benchmarks/video.py --device cuda --precision bf16   # on a GPU (varlen attention)

Sections (``--sections``):

* ``train``: a training step (forward + backward + AdamW) on the same clips, model ViT-Ti width
  (192, 3 heads, MLP 768), depth 6, tubelets of 2 x 16 x 16: ``navit`` packs them into
  ``--num-seqs`` sequences of ``--seq-len`` tokens; ``padded`` gives every clip a row of its own,
  padded to the batch's longest clip (what per-example padding does), same navit model with a
  dense key mask; ``lucidrains-3d`` is ``vit_pytorch.na_vit_nested_tensor_3d.NaViT`` (one jagged
  row per clip, nested tensors), where it runs. Ratios are medians of per-repeat ratios of real
  tokens per second, implementations interleaved.
* ``loader``: ``PackedLoader`` with 2 workers on ``--loader-clips`` SyntheticMotion clips written
  as H.264 MP4 files: batches per second in steady state, as a multiple of the training step rate.
* ``padding``: token counts only; a stream of clips (2-32 frames) and images, half each, packed by
  the loader's rule (buffer of 256 examples, first fit): the padding fraction.

Prints Markdown, writes ``results/video.json``.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import navit  # noqa: E402
from bench_common import (  # noqa: E402
    add_batch_options, add_repeat_options, interleaved, packed_loader, parse_run, run_parser, summarize, time_batches,
    training_step,
)
from navit.batch import PAD, Example  # noqa: E402
from navit.packing import assign_first_fit  # noqa: E402
from navit.patchify import grid_coords, patchify  # noqa: E402
from navit.synthetic.video import SyntheticMotion  # noqa: E402
from packing_padding import run_stream  # noqa: E402
from report import fmt, heading, md_table, write_report  # noqa: E402

PATCH, TUBE = 16, 2


def processor(args) -> navit.Processor:
    return navit.Processor(patch_size=PATCH, temporal_patch_size=TUBE, num_axes=3, max_tokens=args.max_tokens,
                           max_frames=args.max_frames)  # fmt: skip


def make_clips(args) -> tuple[list[torch.Tensor], list[Example]]:
    """Clips of the motion set as [C, T, H, W] pixel volumes (frames a multiple of 2) and navit
    examples of the same pixels, enough to fill ``num_seqs`` sequences by first fit."""
    proc = processor(args)
    source = SyntheticMotion(4000, seed=args.seed, min_side=64, max_side=256, min_frames=2, max_frames=32)
    rng = np.random.default_rng(args.seed)
    volumes, examples = [], []
    budget = args.num_seqs * args.seq_len
    while sum(x.num_tokens for x in examples) < 1.2 * budget:
        clip = source.item(int(rng.integers(len(source))))["video"]
        frames, _ = clip.read(num_frames=int(rng.integers(2, args.max_frames + 1)))
        tubes = math.ceil(len(frames) / TUBE)
        rows, cols = proc.grid(clip.params.height, clip.params.width, tubelets=tubes)
        frames = [f.resize((cols * PATCH, rows * PATCH)) for f in frames]
        frames += frames[-1:] * (tubes * TUBE - len(frames))
        volume = torch.stack([torch.from_numpy(np.asarray(f).copy()).permute(2, 0, 1) for f in frames], 1)
        volume = volume.float() / 127.5 - 1
        patches, grid = patchify(volume, (TUBE, PATCH, PATCH))
        volumes.append(volume)
        examples.append(Example(patches, grid_coords(*grid), grid))
    seq_of = assign_first_fit([x.num_tokens for x in examples], args.seq_len, num_seqs=args.num_seqs,
                              max_examples_per_seq=args.max_examples_per_seq)  # fmt: skip
    keep = [i for i, s in enumerate(seq_of) if s != PAD]
    return [volumes[i] for i in keep], [examples[i] for i in keep]


def navit_model(args, backend: str) -> torch.nn.Module:
    return navit.create_model("navit_ti16", depth=args.depth, num_classes=6, num_axes=3, temporal_patch_size=TUBE,
                              attn_backend=backend)  # fmt: skip


def lucidrains_model(args, volumes):
    from vit_pytorch.na_vit_nested_tensor_3d import NaViT

    side = max(max(v.shape[2], v.shape[3]) for v in volumes)
    frames = max(v.shape[1] for v in volumes)
    return NaViT(image_size=side, max_frames=frames, patch_size=PATCH, frame_patch_size=TUBE, num_classes=6,
                 dim=192, depth=args.depth, heads=3, dim_head=64, mlp_dim=768, token_dropout_prob=0.0)  # fmt: skip


def run_train(args) -> dict:
    volumes, examples = make_clips(args)
    device = args.device
    labels = torch.randint(0, 6, (len(examples),), generator=torch.Generator().manual_seed(0)).to(device)
    packed = navit.pack(examples, args.seq_len, num_seqs=args.num_seqs, max_examples_per_seq=args.max_examples_per_seq)
    longest = max(x.num_tokens for x in examples)
    padded = navit.pack(examples, longest, max_examples_per_seq=1).batch.to(device)
    real = sum(x.num_tokens for x in examples)
    auto = "auto" if device.type == "cpu" or args.precision == "bf16" else "flex"
    impls = {
        "navit": (navit_model(args, auto), lambda m, b=packed.batch.to(device): m(b), packed.batch.segment_ids.numel()),
        "padded": (navit_model(args, "dense"), lambda m: m(padded), padded.segment_ids.numel()),
    }
    notes = {"padded": f"{len(examples)} rows of {longest} tokens"}
    try:
        lucid = lucidrains_model(args, volumes)
        moved = [v.to(device) for v in volumes]
        lucid.to(device)(moved[:2])  # does it run here at all?
        impls["lucidrains-3d"] = (lucid, lambda m: m(moved), real)
        notes["lucidrains-3d"] = "one jagged row per clip (nested tensors), 4 register tokens"
    except Exception as error:  # not installed, or nested tensors unsupported here
        notes["lucidrains-3d"] = f"does not run here: {type(error).__name__}: {str(error)[:120]}"
    fns = {}
    for name, (model, forward, _) in impls.items():
        model.to(device)
        fns[name] = training_step(model, forward, lambda logits: F.cross_entropy(logits.float(), labels), device,
                                  args.precision == "bf16")  # fmt: skip
    times = interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    rows = {}
    for name, (_, _, computed) in impls.items():
        s = summarize(times[name])
        rows[name] = {**s, "real_tokens_per_s": real / s["median_s"], "computed_tokens": computed,
                      "note": notes.get(name, "")}  # fmt: skip
    # Same real tokens for every implementation: navit's speed-up is the ratio of step times.
    ratios = {name: float(np.median([times[name][r] / times["navit"][r] for r in range(args.repeats)]))
              for name in impls if name != "navit"}  # fmt: skip
    return {"clips": len(examples), "real_tokens": real, "frames": [v.shape[1] for v in volumes], "rows": rows,
            "ratios": ratios, "skipped": {k: v for k, v in notes.items() if k not in impls}}  # fmt: skip


def run_loader(args, step_rate: float | None) -> dict:
    from navit.data.folder import ImageFolder
    from navit.synthetic.video import write_video_folder

    with tempfile.TemporaryDirectory(prefix="navit_video_loader_") as tmp:
        t0 = time.perf_counter()
        write_video_folder(SyntheticMotion(args.loader_clips, seed=args.seed, min_side=64, max_side=256), tmp,
                           progress=False)  # fmt: skip
        write_s = time.perf_counter() - t0
        loader = packed_loader(ImageFolder(tmp), processor(args), seq_len=args.seq_len, num_seqs=args.num_seqs,
                               max_examples_per_seq=args.max_examples_per_seq, buffer_size=args.loader_buffer,
                               num_workers=2, seed=args.seed)  # fmt: skip
        per_batch = args.num_seqs * args.seq_len / (args.max_tokens * 0.75)
        limit = max(3, int((args.loader_clips - args.loader_buffer) / per_batch * 0.9))
        _, stamps, clips = time_batches(loader, limit, lambda item: item.batch.num_examples)
    steady = stamps[-1] - stamps[0]
    rate = (len(stamps) - 1) / steady
    return {"clips_written": args.loader_clips, "write_s": write_s, "batches": len(stamps), "batches_per_s": rate,
            "clips_per_s": sum(clips[1:]) / steady, "step_rate": step_rate,
            "ratio": rate / step_rate if step_rate else None}  # fmt: skip


def run_padding(args) -> dict:
    """Padding of a stream of clips and images, half each, packed by the loader's rule."""
    proc = processor(args)
    rng = np.random.default_rng(args.seed)
    lengths = []
    for _ in range(args.padding_examples):
        side = rng.uniform(64, 256)
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        h, w = max(1, round(side / math.sqrt(aspect))), max(1, round(side * math.sqrt(aspect)))
        if rng.uniform() < 0.5:
            frames = min(args.max_frames, int(rng.integers(2, 33)))
            tubes = math.ceil(frames / TUBE)
            rows, cols = proc.grid(h, w, tubelets=tubes)
            lengths.append(tubes * rows * cols)
        else:
            rows, cols = proc.grid(h, w)
            lengths.append(rows * cols)
    lengths = np.array(lengths)
    out = {}
    for seq_len in (256, 1024):
        if lengths.max() > seq_len:
            continue
        stream = run_stream(lengths, seq_len, "first_fit", None, 8, 1.0, 10, buffer_images=256)
        out[str(seq_len)] = {"padding": stream["padding"], "batches": stream["batches"], "p95": stream["padding_batch_p95"]}
    return {"examples": len(lengths), "mean_tokens": float(lengths.mean()), "seq_lens": out}


def render(res: dict) -> str:
    a = res["args"]
    lines = heading("Video", res) + [
        f"torch {res['machine']['torch']}, {res['machine']['threads']} threads, {a['device']}, {a['precision']}.", ""]  # fmt: skip
    if "train" in res:
        t = res["train"]
        lines += [f"### Training step on {t['clips']} clips, {t['real_tokens']} real tokens (frames "
                  f"{min(t['frames'])}..{max(t['frames'])}); ViT-Ti width, depth {a['depth']}; median of {a['repeats']}", ""]  # fmt: skip
        rows = [(name, fmt(1000 * r["median_s"]), fmt(r["real_tokens_per_s"]), r["computed_tokens"],
                 "—" if name == "navit" else f"{t['ratios'][name]:.2f}×", r["note"]) for name, r in t["rows"].items()]  # fmt: skip
        lines.append(md_table(["impl", "median ms", "real tok/s", "computed tokens", "navit ÷ impl", "note"], rows, "lrrrrl"))
        for name, why in t["skipped"].items():
            lines.append(f"\n`{name}`: {why}")
        lines.append("")
    if "loader" in res:
        ld = res["loader"]
        lines += ["### Loader on real encoded clips (2 workers)", "",
                  md_table(["clips written", "batches/s", "clips/s", "training steps/s", "loader ÷ step", "target ≥ 2×"],
                           [(ld["clips_written"], f"{ld['batches_per_s']:.2f}", fmt(ld["clips_per_s"]),
                             "—" if ld["step_rate"] is None else f"{ld['step_rate']:.2f}",
                             "—" if ld["ratio"] is None else f"{ld['ratio']:.1f}×",
                             "—" if ld["ratio"] is None else ("PASS" if ld["ratio"] >= 2 else "**MISS**"))]), ""]  # fmt: skip
    if "padding" in res:
        p = res["padding"]
        lines += [f"### Padding, a stream of {p['examples']} clips and images (half each, mean {p['mean_tokens']:.1f} tokens)", "",
                  md_table(["L", "padding", "p95 per batch", "batches"],
                           [(k, f"{100 * v['padding']:.2f}%", f"{100 * v['p95']:.2f}%", v["batches"]) for k, v in p["seq_lens"].items()]), ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = run_parser(__doc__, "video")
    p.add_argument("--sections", nargs="+", default=["train", "loader", "padding"], choices=["train", "loader", "padding"])
    add_batch_options(p)
    add_repeat_options(p, repeats=5, warmup=1)
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per clip at most")
    p.add_argument("--max-frames", type=int, default=16)
    p.add_argument("--loader-clips", type=int, default=400)
    p.add_argument("--loader-buffer", type=int, default=64)
    p.add_argument("--padding-examples", type=int, default=20000)
    args, res = parse_run(p, argv, "video.py")
    step_rate = None
    if "train" in args.sections:
        res["train"] = run_train(args)
        step_rate = 1 / res["train"]["rows"]["navit"]["median_s"]
    if "loader" in args.sections:
        res["loader"] = run_loader(args, step_rate)
    if "padding" in args.sections:
        res["padding"] = run_padding(args)
    write_report(res, render(res), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
