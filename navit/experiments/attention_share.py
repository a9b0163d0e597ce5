"""``attention-share`` (paper Fig. 4): the share of a packed training step spent in attention.

Packing puts several images in one sequence, and attention within a sequence is the only part
that costs more than linearly in its length. The paper's point: as models widen, the MLPs and
projections grow with the width squared while attention grows with the width, so its share of
the step, and so the cost of packing, shrinks. For each width this measures, on packed batches of
the paper's image mix (64 to 256 tokens each), the attention core (softmax(QKᵀ)V within each
image, the part packing affects): its share of the training step's FLOPs as the model counts
them (:meth:`navit.NaViT.flops`: 4·Σnᵢ²·d per layer forward, the backward twice that), and its
share of the step's time, from interleaved repeats of the step with the model's attention and
with the core replaced by returning V.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from navit.experiments.base import Analysis, Experiment, Setting, Verdict, figure, save_figure

WIDTHS = (64, 128, 256, 384, 768)


class SkipAttention:
    """The model's own backend with the attention core replaced by returning V: the same plans
    and token order (the bucketed backend's slot order included), without softmax(QKᵀ)V."""

    name = "skip"

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:  # prepare, prepare_slots, traceable
        return getattr(self._backend, name)

    def attend(self, q, k, v, state):
        return v

    def attend_slots(self, q, k, v, state):
        return v


def packed_batch(patch_dim: int, quick: bool, seed: int = 0):
    import torch

    from navit.packing import pack
    from navit.batch import Example

    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(8 if quick else 24):
        rows = int(torch.randint(8, 17, (1,), generator=generator))  # 64 to 256 tokens, aspect varies
        cols = int(torch.randint(max(4, 64 // rows), 256 // rows + 1, (1,), generator=generator))
        coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        examples.append(Example(torch.randn(len(coords), patch_dim, generator=generator), coords, (rows, cols)))
    return pack(examples, 256 if quick else 1024, max_examples_per_seq=32).batch


def measure(width: int, quick: bool, repeats: int) -> dict[str, float]:
    from navit.config import resolve_config
    from navit.model import NaViT

    config = resolve_config("navit_mini16", embed_dim=width, num_heads=max(2, width // 64), depth=2, num_classes=10)
    model = NaViT(config)
    batch = packed_batch(config.patch_dim, quick)
    real = model.attention_backend

    def step(skip: bool) -> None:
        model.attention_backend = (lambda device: SkipAttention(real(device))) if skip else real
        model.zero_grad(set_to_none=True)
        model(batch).float().square().mean().backward()

    step_flops = model.flops(batch, training=True)
    square_sum = int((batch.example_lengths().double() ** 2).sum())
    attention_flops = 3 * 2 * config.depth * 2 * square_sum * config.embed_dim
    times: dict[bool, list[float]] = {False: [], True: []}
    step(False), step(True)  # warm-up
    for _ in range(repeats):
        for skip in (False, True):
            start = time.perf_counter()
            step(skip)
            times[skip].append(time.perf_counter() - start)
    model.attention_backend = real
    full, rest = statistics.median(times[False]), statistics.median(times[True])
    return {"width": width, "tokens": int(batch.num_real_tokens), "step_flops": step_flops,
            "attention_flops_share": attention_flops / step_flops,
            "step_seconds": full, "attention_time_share": max(0.0, full - rest) / full}  # fmt: skip


class AttentionShare(Experiment):
    name = "attention-share"
    paper = "Fig. 4, the share of attention in a packed step as width grows"
    claim = "The share of a packed training step's FLOPs and time spent in attention falls as the model widens."
    trains = False
    measures = "No training: generated packed batches of the paper's image mix (data and seeds unused)"

    def run(self, setting: Setting) -> dict[str, Any]:
        folder = setting.folder(self.name)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        widths = WIDTHS[:3] if setting.quick else WIDTHS
        rows = []
        for width in widths:
            rows.append(measure(width, setting.quick, 1 if setting.quick else 5))
            print(f"[{self.name}] width {width}: {rows[-1]}")
        return self.report(rows, setting, time.perf_counter() - start)

    def analyse(self, runs: list[dict[str, Any]], setting: Setting) -> Analysis:
        lines = ["| width | tokens | step GFLOPs | attention FLOPs | attention time | step (ms) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['width']} | {r['tokens']} | {r['step_flops'] / 1e9:.2f} | {100 * r['attention_flops_share']:.1f}% | "
                  f"{100 * r['attention_time_share']:.1f}% | {1000 * r['step_seconds']:.0f} |" for r in runs]  # fmt: skip
        verdicts = []
        for key, what in (("attention_flops_share", "FLOPs"), ("attention_time_share", "time")):
            shares = [r[key] for r in runs]
            falling = all(b < a for a, b in zip(shares, shares[1:]))
            verdicts.append(Verdict(f"attention's share of step {what} falls with width",
                                    "holds" if falling else ("holds overall" if shares[-1] < shares[0] else "does not hold"),
                                    " → ".join(f"{100 * s:.1f}%" for s in shares)))  # fmt: skip
        return Analysis("\n".join(lines), verdicts, {"rows": runs})

    def plot(self, runs: list[dict[str, Any]], analysis: Analysis, folder: Path) -> list[str]:
        fig, ax = figure()
        widths = [r["width"] for r in runs]
        ax.plot(widths, [100 * r["attention_flops_share"] for r in runs], marker="o", label="share of FLOPs")
        ax.plot(widths, [100 * r["attention_time_share"] for r in runs], marker="s", label="share of time (CPU)")
        ax.set_xscale("log", base=2)
        return [save_figure(fig, ax, folder / "attention_share.png", "model width", "attention core in a packed step (%)")]
