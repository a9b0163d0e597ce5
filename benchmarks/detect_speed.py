"""Detection training: packed sequences against one image per padded row, on the same images.

    python benchmarks/detect_speed.py                                  # ~1 min on 1 thread
    python benchmarks/detect_speed.py --assign hungarian               # DETR's matching instead
    python benchmarks/detect_speed.py --device cuda --precision bf16   # on a GPU

Images of the built-in detection set at native resolution and aspect ratio (sides 64 to 384 px,
at most ``--max-tokens`` patches of 16 px), enough to fill ``--num-seqs`` sequences of
``--seq-len`` tokens by first fit. One training step (forward; the detection loss of
``--task detect``: the token of each box by ``--assign`` (the task's default, ``centre``, or
``hungarian``), focal, L1 and GIoU; backward; AdamW) of the same Detector
(ViT-Ti width, depth ``--depth``, OWL-ViT box head) on the three layouts of :mod:`layouts`
(packed, padded to the longest, padded to ``--max-tokens``). Prints Markdown, writes
``results/detect_speed.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import layouts  # noqa: E402
import navit  # noqa: E402
from bench_common import training_step  # noqa: E402
from navit.boxes import xyxy_to_cxcywh  # noqa: E402
from navit.synthetic.detection import SyntheticDetection  # noqa: E402
from navit.tasks import get_task  # noqa: E402
from navit.tasks.detect import DetectOptions, Detector  # noqa: E402
from navit.tasks.detect_assign import ASSIGNMENTS  # noqa: E402


def run(args) -> dict:
    """Examples of enough images to fill the packed batch, their targets (boxes as shares), and a
    step on the detection loss (the loss runs the model itself: matching reads its outputs)."""
    processor = navit.Processor(patch_size=layouts.PATCH, max_tokens=args.max_tokens)
    source = SyntheticDetection(4000, seed=args.seed, min_side=64, max_side=384)
    kept = layouts.fill(args, lambda i: processor.to_example(source.item(i)["image"]))
    items = [source.item(i) for i in kept]
    scale = [torch.tensor([*item["image"].size] * 2, dtype=torch.float64) for item in items]
    targets = {"boxes": [xyxy_to_cxcywh((torch.from_numpy(item["boxes"]) / s).float()) for item, s in zip(items, scale)],
               "labels": [torch.from_numpy(item["box_labels"]) for item in items]}  # fmt: skip
    task = get_task("detect", {"assign": args.assign}, class_names=source.class_names)

    def step_of(backend: str, batch: navit.PackedBatch):
        config = navit.NaViTConfig(patch_size=layouts.PATCH, embed_dim=192, depth=args.depth, num_heads=3,
                                   num_classes=len(task.class_names), attn_backend=backend)  # fmt: skip
        return training_step(Detector(config).to(args.device), lambda m: (m, batch),
                             lambda out: task.loss(out[0], out[0], out[1], targets).loss_sum,
                             args.device, args.precision == "bf16")  # fmt: skip

    return layouts.compare(args, list(kept.values()), step_of)


def main(argv: list[str] | None = None) -> int:
    def options(p) -> None:
        p.add_argument("--assign", choices=ASSIGNMENTS, default=DetectOptions().assign,
                       help="which token learns each box (the task's option)")  # fmt: skip

    return layouts.main(__doc__, "detect_speed.py", run, "Detection training",
                        lambda a: f"Detector ViT-Ti width, OWL-ViT box head, {a.assign} assignment", argv, options)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
