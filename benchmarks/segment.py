"""Segmentation training: packed sequences against one image per padded row, on the same images.

    python benchmarks/segment.py                                  # ~2 min on 2 cores
    python benchmarks/segment.py --device cuda --precision bf16   # on a GPU

Images of the built-in segmentation set at native resolution and aspect ratio (sides 64 to 384
px, at most ``--max-tokens`` patches of 16 px), enough to fill ``--num-seqs`` sequences of
``--seq-len`` tokens by first fit. One training step (forward, the pixel cross entropy of
``navit.tasks.segment``, backward, AdamW) of the same Segmenter (ViT-Ti width, depth
``--depth``) on three layouts of the same examples:

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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import navit  # noqa: E402
from bench_common import fmt, interleaved, md_table, new_result, run_parser, summarize, synchronize, write_report  # noqa: E402

from navit.synthetic.segmentation import SyntheticSegmentation  # noqa: E402
from navit.distributed import DistInfo  # noqa: E402
from navit.batch import PAD
from navit.packing import assign_first_fit  # noqa: E402
from navit.tasks import get_task  # noqa: E402
from navit.tasks.segment import Segmenter  # noqa: E402

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
    task = get_task("segment", None, SyntheticSegmentation().class_names)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    half = args.precision == "bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=half):
            result = task.loss(model, model, batch, {}, DistInfo(), args.device)
        result.loss.backward()
        opt.step()
        synchronize(args.device)

    return step


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
    lines = [f"## Segmentation training (`{' '.join(res['command'])}`)", "",
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
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--num-seqs", type=int, default=4)
    p.add_argument("--max-examples-per-seq", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=256, help="patches per image at most")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    res = new_result("segment.py", argv, args)
    res["run"] = run(args)
    write_report(res, render(res), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
