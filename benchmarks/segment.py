"""Segmentation training: packed sequences against one image per padded row, on the same images.

    python benchmarks/segment.py                                  # ~2 min on 2 cores
    python benchmarks/segment.py --device cuda --precision bf16   # on a GPU

Images of the built-in segmentation set at native resolution and aspect ratio (sides 64 to 384
px, at most ``--max-tokens`` patches of 16 px), enough to fill ``--num-seqs`` sequences of
``--seq-len`` tokens by first fit. One training step (forward; the pixel cross entropy over real
tokens, computed here from the model's logits and the packed ``mask`` field; backward; AdamW) of
the same Segmenter (ViT-Ti width, depth ``--depth``) on the three layouts of
:mod:`layouts` (packed, padded to the longest, padded to ``--max-tokens``). Prints Markdown,
writes ``results/segment.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import layouts  # noqa: E402
import navit  # noqa: E402
from bench_common import training_step  # noqa: E402
from navit.data.segmentation import IGNORE  # noqa: E402
from navit.synthetic.segmentation import SyntheticSegmentation  # noqa: E402
from navit.tasks.segment import Segmenter  # noqa: E402


def run(args) -> dict:
    """Examples (their masks as fields) of enough images to fill the packed batch, and a step on
    the pixel cross entropy of the real tokens: logits [B, L, p², C] against the ``mask`` field
    carried with the tokens (padding ignored)."""
    processor = navit.Processor(patch_size=layouts.PATCH, max_tokens=args.max_tokens)
    source = SyntheticSegmentation(4000, seed=args.seed, min_side=64, max_side=384)

    def example(index: int) -> navit.Example:
        item = source.item(index)
        return processor.to_example(item["image"], dense={"mask": item["mask"]})

    examples = list(layouts.fill(args, example).values())
    classes = len(source.class_names)

    def step_of(backend: str, batch: navit.PackedBatch):
        config = navit.NaViTConfig(patch_size=layouts.PATCH, embed_dim=192, depth=args.depth, num_heads=3,
                                   num_classes=classes, attn_backend=backend)  # fmt: skip
        labels = batch.fields["mask"].masked_fill(~batch.token_mask[..., None], IGNORE).flatten()
        loss = lambda logits: F.cross_entropy(logits.float().flatten(0, 2), labels, ignore_index=IGNORE)  # noqa: E731
        return training_step(Segmenter(config).to(args.device), lambda m: m(batch), loss, args.device,
                             args.precision == "bf16")  # fmt: skip

    return layouts.compare(args, examples, step_of)


def main(argv: list[str] | None = None) -> int:
    return layouts.main(__doc__, "segment.py", run, "Segmentation training", "Segmenter ViT-Ti width, linear decoder",
                        argv)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
