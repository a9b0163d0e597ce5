"""A training step of one model on the same images in three layouts, for the dense-task benchmarks
(``segment.py``, ``detect_speed.py``):

* ``navit``: packed, several images per sequence (the default attention backend);
* ``padded-longest``: one image per row, padded to the longest image of the batch, dense key mask;
* ``padded-fixed``: one image per row, padded to ``--max-tokens`` (what fixed-length NaFlex
  pipelines do), dense key mask.

Implementations are interleaved; ratios are medians of per-repeat ratios of step times (the same
images, so of images per second).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np
import torch

import navit
from bench_common import add_batch_options, add_repeat_options, interleaved, parse_run, run_parser, summarize
from navit.batch import PAD
from navit.packing import assign_first_fit
from report import fmt, heading, md_table, write_report

PATCH = 16


def fill(args, example_of: Callable[[int], Any]) -> dict[int, Any]:
    """``{i: example_of(i)}`` of the first items whose examples fill ``--num-seqs`` sequences of
    ``--seq-len`` tokens by first fit, the examples that fit nowhere left out."""
    made: list[Any] = []
    while sum(x.num_tokens for x in made) < 1.2 * args.num_seqs * args.seq_len:
        made.append(example_of(len(made)))
    seq_of = assign_first_fit([x.num_tokens for x in made], args.seq_len, num_seqs=args.num_seqs,
                              max_examples_per_seq=args.max_examples_per_seq)  # fmt: skip
    return {i: x for i, (x, s) in enumerate(zip(made, seq_of)) if s != PAD}


def compare(args, examples: list[navit.Example], step_of: Callable[[str, navit.PackedBatch], Callable]) -> dict:
    """Time ``step_of(attention backend, batch)`` (a step on a model built with the same seed) in
    each layout of ``examples``."""
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
        fns[name] = step_of(backend, batch.to(args.device))
        computed[name] = batch.segment_ids.numel()
    times = interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    rows = {name: {**summarize(times[name]), "computed_tokens": computed[name],
                   "images_per_s": len(examples) / summarize(times[name])["median_s"]} for name in layouts}  # fmt: skip
    ratios = {name: float(np.median([times[name][r] / times["navit"][r] for r in range(args.repeats)]))
              for name in layouts if name != "navit"}  # fmt: skip
    return {"images": len(examples), "real_tokens": sum(x.num_tokens for x in examples), "rows": rows,
            "ratios": ratios, "tokens": [x.num_tokens for x in examples]}  # fmt: skip


def render(res: dict, title: str, model: str) -> str:
    a, r = res["args"], res["run"]
    lines = heading(title, res) + [
        f"torch {res['machine']['torch']}, {res['machine']['threads']} threads, {a['device']}, {a['precision']}; "
        f"{r['images']} images of {min(r['tokens'])} to {max(r['tokens'])} tokens ({r['real_tokens']} real), "
        f"{model}, depth {a['depth']}; median of {a['repeats']}.", ""]  # fmt: skip
    rows = [(name, fmt(1000 * row["median_s"]), fmt(row["images_per_s"]), row["computed_tokens"],
             f"{100 * (1 - r['real_tokens'] / row['computed_tokens']):.1f}%",
             "—" if name == "navit" else f"{r['ratios'][name]:.2f}×") for name, row in r["rows"].items()]  # fmt: skip
    lines.append(md_table(["layout", "median ms", "images/s", "computed tokens", "padding", "layout ÷ navit"], rows))
    return "\n".join(lines)


def main(doc: str, script: str, run: Callable, title: str, model: str | Callable[[Any], str], argv: list[str] | None,
         options: Callable[[Any], None] | None = None) -> int:  # fmt: skip
    """A layout benchmark's command line: the batch, repeat and ``--max-tokens`` options (and the
    script's own, added by ``options(parser)``), then ``run(args)``'s results reported under
    ``title``; ``model`` describes the model, or makes that line from the options."""
    p = run_parser(doc, script.removesuffix(".py"))
    add_batch_options(p)
    add_repeat_options(p, repeats=5, warmup=1)
    p.add_argument("--max-tokens", type=int, default=256, help="patches per image at most")
    if options is not None:
        options(p)
    args, res = parse_run(p, argv, script)
    res["run"] = run(args)
    write_report(res, render(res, title, model(args) if callable(model) else model), args.out)
    return 0


if __name__ == "__main__":
    sys.exit("run segment.py or detect_speed.py")
