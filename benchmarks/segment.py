"""Segmentation training: packed sequences against one image per padded row, on the same images.

    python benchmarks/segment.py                                  # ~2 min on 2 cores
    python benchmarks/segment.py --device cuda --precision bf16   # on a GPU

Images of the built-in segmentation set at native resolution and aspect ratio (sides 64 to 384
px, at most ``--max-tokens`` patches of 16 px), enough to fill ``--num-seqs`` sequences of
``--seq-len`` tokens by first fit. One training step (forward; the pixel cross entropy over real
tokens, computed here from the model's logits and the packed ``mask`` field; backward; AdamW) of
the same Segmenter (ViT-Ti width, depth ``--depth``) on three layouts of the same examples:

* ``navit``: packed, several images per sequence (the default attention backend);
* ``padded-longest``: one image per row, padded to the longest image of the batch, dense key mask;
* ``padded-fixed``: one image per row, padded to ``--max-tokens`` (what fixed-length NaFlex
  pipelines do), dense key mask.

Implementations are interleaved; ratios are medians of per-repeat ratios of step times (the same
images, so of images per second). Prints Markdown, writes ``results/segment.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import navit  # noqa: E402
from bench_common import (  # noqa: E402
    add_batch_options, add_repeat_options, interleaved, parse_run, run_parser, summarize, training_step,
)
from navit.batch import PAD  # noqa: E402
from navit.data.segmentation import IGNORE  # noqa: E402
from navit.packing import assign_first_fit  # noqa: E402
from navit.synthetic.segmentation import SyntheticSegmentation  # noqa: E402
from navit.tasks.segment import Segmenter  # noqa: E402
from report import fmt, heading, md_table, write_report  # noqa: E402

PATCH = 16


def make_examples(args) -> list[navit.Example]:
    """Examples (with their masks as fields) of enough images to fill the packed batch."""
    processor = navit.Processor(patch_size=PATCH, max_tokens=args.max_tokens)
    source = SyntheticSegmentation(4000, seed=args.seed, min_side=64, max_side=384)
    examples, index = [], 0
    while sum(x.num_tokens for x in examples) < 1.2 * args.num_seqs * args.seq_len:
        item = source.item(index)
        examples.append(processor.to_example(item["image"], dense={"mask": item["mask"]}))
        index += 1
    seq_of = assign_first_fit([x.num_tokens for x in examples], args.seq_len, num_seqs=args.num_seqs,
                              max_examples_per_seq=args.max_examples_per_seq)  # fmt: skip
    return [x for x, s in zip(examples, seq_of) if s != PAD]


def step_fn(model: Segmenter, batch, args):
    """A training step on the pixel cross entropy of the real tokens: the model's logits
    [B, L, p², C] against the ``mask`` field carried with the tokens (padding ignored)."""
    labels = batch.fields["mask"].masked_fill(~batch.token_mask[..., None], IGNORE).flatten()

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 2), labels, ignore_index=IGNORE)

    return training_step(model, lambda m: m(batch), loss, args.device, args.precision == "bf16")


def run(args) -> dict:
    examples = make_examples(args)
    device = args.device
    classes = len(SyntheticSegmentation().class_names)
    longest = max(x.num_tokens for x in examples)
    layouts = {
        "navit": ("auto", navit.pack(examples, args.seq_len, num_seqs=args.num_seqs,
                                     max_examples_per_seq=args.max_examples_per_seq).batch),  # fmt: skip
        "padded-longest": ("dense", navit.pack(examples, longest, max_examples_per_seq=1).batch),
        "padded-fixed": ("dense", navit.pack(examples, args.max_tokens, max_examples_per_seq=1).batch),
    }
    fns, computed = {}, {}
    for name, (backend, batch) in layouts.items():
        torch.manual_seed(0)  # the same weights for every layout
        config = navit.NaViTConfig(patch_size=PATCH, embed_dim=192, depth=args.depth, num_heads=3, num_classes=classes,
                                   attn_backend=backend)  # fmt: skip
        model = Segmenter(config).to(device)
        fns[name] = step_fn(model, batch.to(device), args)
        computed[name] = batch.segment_ids.numel()
    times = interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    real = sum(x.num_tokens for x in examples)
    rows = {name: {**summarize(times[name]), "computed_tokens": computed[name],
                   "images_per_s": len(examples) / summarize(times[name])["median_s"]} for name in layouts}  # fmt: skip
    ratios = {name: float(np.median([times[name][r] / times["navit"][r] for r in range(args.repeats)]))
              for name in layouts if name != "navit"}  # fmt: skip
    return {"images": len(examples), "real_tokens": real, "rows": rows, "ratios": ratios,
            "tokens": [x.num_tokens for x in examples]}  # fmt: skip


def render(res: dict) -> str:
    a, r = res["args"], res["run"]
    lines = heading("Segmentation training", res) + [
        f"torch {res['machine']['torch']}, {res['machine']['threads']} threads, {a['device']}, {a['precision']}; "
        f"{r['images']} images of {min(r['tokens'])} to {max(r['tokens'])} tokens ({r['real_tokens']} real), "
        f"Segmenter ViT-Ti width, depth {a['depth']}, linear decoder; median of {a['repeats']}.", ""]  # fmt: skip
    rows = [(name, fmt(1000 * row["median_s"]), fmt(row["images_per_s"]), row["computed_tokens"],
             f"{100 * (1 - r['real_tokens'] / row['computed_tokens']):.1f}%",
             "—" if name == "navit" else f"{r['ratios'][name]:.2f}×") for name, row in r["rows"].items()]  # fmt: skip
    lines.append(md_table(["layout", "median ms", "images/s", "computed tokens", "padding", "navit ÷ layout"], rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = run_parser(__doc__, "segment")
    add_batch_options(p)
    add_repeat_options(p, repeats=5, warmup=1)
    p.add_argument("--max-tokens", type=int, default=256, help="patches per image at most")
    args, res = parse_run(p, argv, "segment.py")
    res["run"] = run(args)
    write_report(res, render(res), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
