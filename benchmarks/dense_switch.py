"""Whether the bucketed backend should ever switch to one dense call when the model keeps its
tokens in slot order: a whole model's forward (inference) or training step, on the same images
packed several to a row and one to a row padded to the longest, with attention

* ``dense``: one masked call over every row (every layer runs on the padding too);
* ``buckets``: the bucketed backend in slot order (the blocks skip the padding);
* ``switch``: the bucketed backend with ``dense_above=0.3``, the rule ``auto`` used before in
  fp32 on CPU, measured on attention alone: one dense call whenever the buckets' scores exceed
  0.3 of the dense B·L² scores in rows of at most 256 tokens.

Mixes: ``paper`` (side ~ U(64, 256), the paper's aspect ratios: the serve benchmark's images),
``uniform`` (160 x 160), ``small`` (sides ~ U(32, 100)), ``large`` (sides ~ U(200, 260)); at most
256 tokens per image, patch 16. Times are medians of interleaved repeats; each row gives every
variant's time over ``buckets``' in the same repeat (median of the per-repeat ratios).

    python benchmarks/dense_switch.py                 # forward and training step, every mix
    python benchmarks/dense_switch.py --modes train --mixes paper --repeats 9
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import navit  # noqa: E402
from bench_common import add_repeat_options, interleaved, parse_run, run_parser  # noqa: E402
from navit.attention import BucketedBackend, DenseBackend  # noqa: E402
from report import md_table, write_report  # noqa: E402

SIDES = {"uniform": (160, 160), "small": (32, 100), "large": (200, 260)}


class Switch(BucketedBackend):
    """The bucketed backend as ``auto`` had it in fp32: the dense switch in slot order too."""

    def __init__(self) -> None:
        super().__init__(dense_above=0.3)

    def prepare_slots(self, segment_ids: torch.Tensor):
        plan = self.prepare(segment_ids)
        return plan if plan.dense_mask is not None else super().prepare_slots(segment_ids)


VARIANTS = {"dense": DenseBackend, "buckets": BucketedBackend, "switch": Switch}


def pictures(mix: str, count: int) -> list[Image.Image]:
    if mix == "paper":
        from serve import images

        return [Image.open(io.BytesIO(data)).convert("RGB") for data in images("paper", count)]
    lo, hi = SIDES[mix]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (int(rng.uniform(lo, hi + 1)), int(rng.uniform(lo, hi + 1)), 3),
                                         dtype=np.uint8)) for _ in range(count)]  # fmt: skip


def step(model: navit.NaViT, batch: navit.PackedBatch, backend, train: bool):
    """One forward (or forward + backward) of ``model`` on ``batch`` with ``backend``."""

    def call() -> None:
        with mock.patch.object(type(model), "attention_backend", lambda self, device: backend):
            if train:
                model.zero_grad(set_to_none=True)
                model(batch).logsumexp(-1).sum().backward()
            else:
                with torch.inference_mode():
                    model(batch)

    return call


def run(args) -> dict:
    processor = navit.Processor(patch_size=16, max_tokens=256)
    torch.manual_seed(0)
    config = navit.NaViTConfig(patch_size=16, embed_dim=args.width, depth=args.depth, num_heads=args.width // 64,
                               num_classes=10)  # fmt: skip
    model = navit.NaViT(config, processor)
    rows = []
    for mix in args.mixes:
        examples = [processor.to_example(picture) for picture in pictures(mix, args.images)]
        longest = max(x.num_tokens for x in examples)
        layouts = {"packed": navit.pack(examples, 256).batch,
                   "padded": navit.pack(examples, longest, max_examples_per_seq=1).batch}  # fmt: skip
        for mode in args.modes:
            model.train(mode == "train")
            for layout, batch in layouts.items():
                fns = {name: step(model, batch, make(), mode == "train") for name, make in VARIANTS.items()}
                times = interleaved(fns, warmup=args.warmup, repeats=args.repeats)
                ratio = {name: float(np.median([t / b for t, b in zip(times[name], times["buckets"])])) for name in fns}
                rows.append({"mix": mix, "mode": mode, "layout": layout, "rows": list(batch.segment_ids.shape),
                             "fill": batch.num_real_tokens / batch.segment_ids.numel(),
                             "ms": {name: 1000 * float(np.median(t)) for name, t in times.items()},
                             "over_buckets": ratio})  # fmt: skip
                print(rows[-1], flush=True)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = run_parser(__doc__, "dense_switch")
    parser.add_argument("--mixes", nargs="+", default=["paper", "uniform", "small", "large"], choices=["paper", *SIDES])
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    add_repeat_options(parser, repeats=7, warmup=1)
    args, res = parse_run(parser, argv, "dense_switch.py")
    if args.precision != "fp32" or args.device.type != "cpu":
        parser.error("the switch exists only in fp32 on CPU: run with --precision fp32 --device cpu")
    res.update(run(args))
    table = [[r["mix"], r["mode"], r["layout"], "x".join(map(str, r["rows"])), f"{r['fill']:.2f}",
              *(f"{r['ms'][n]:.0f}" for n in VARIANTS), *(f"{r['over_buckets'][n]:.2f}" for n in ("dense", "switch"))]
             for r in res["rows"]]  # fmt: skip
    text = md_table(["mix", "step", "layout", "rows", "fill", "dense ms", "buckets ms", "switch ms", "dense / buckets",
                     "switch / buckets"], table, "lllrrrrrrr")  # fmt: skip
    write_report(res, text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
