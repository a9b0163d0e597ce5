"""``compute`` (paper Fig. 1, Table 2): NaViT against ViT at matched training FLOPs.

ViT arms squash every image to a square grid of 16, 36 or 64 tokens; the NaViT arm keeps aspect
ratios, samples resolutions (side length, truncated normal biased to low resolution) and drops
tokens (Beta-distributed rates). Everything else is one recipe. Each arm trains to each of three
FLOP budgets in the ratio 1 : 2 : 4, counted by the model as training goes (``max_flops``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from navit.experiments.base import (Analysis, Arm, Experiment, Setting, Verdict, compare, figure, mean, no_worse, pct,
                                   save_figure, spread)

VIT_TOKENS = (16, 36, 64)
LEVELS = (1, 2, 4)
UNIT = 3200


class Compute(Experiment):
    name = "compute"
    paper = "Fig. 1 and Table 2, NaViT vs ViT at matched training compute"
    claim = ("At equal training FLOPs NaViT beats ViT at every budget; it matches ViT's best accuracy with at "
             "most a quarter of the compute and sees several times more images per FLOP (paper: ~5x).")

    shared = {"budgets": [16, 36, 64]}

    def arms_at(self, flops: float, setting: Setting) -> list[Arm]:
        arms = [Arm(f"vit{t}-{flops:.3g}", {"baseline": "square", "square_tokens": t, "max_flops": flops}, f"ViT {t} tok")
                for t in VIT_TOKENS]  # fmt: skip
        navit = {"res_mode": "side", "drop": "beta", "drop_rate": 0.2, "drop_max": 0.5, "max_flops": flops, "res_min": 64,
                 "res_max": 128}  # fmt: skip
        return [Arm(f"navit-{flops:.3g}", navit, "NaViT"), *arms]

    def arms(self, setting: Setting) -> list[Arm]:
        unit = self.flops(UNIT, setting)  # the lowest budget: ViT at 64 tokens on UNIT images
        return [arm for level in LEVELS for arm in self.arms_at(level * unit, setting)]

    def analyse(self, runs: list[dict[str, Any]], setting: Setting) -> Analysis:
        groups = sorted({r["group"] for r in runs}, key=lambda g: (g != "NaViT", g))
        budgets = sorted({r["settings"]["optim"]["max_flops"] for r in runs})
        cell = {(r["group"], r["settings"]["optim"]["max_flops"]): [] for r in runs}
        images = {g: [] for g in groups}
        for r in runs:
            cell[(r["group"], r["settings"]["optim"]["max_flops"])].append(r["accuracy"])
            images[r["group"]].append(r["examples_seen"] / r["train_flops"])
        lines = ["| arm | " + " | ".join(f"{b / 1e12:.3g} TFLOPs" for b in budgets) + " | images per PFLOP |",
                 "|---|" + "---|" * (len(budgets) + 1)]  # fmt: skip
        for g in groups:
            accs = [pct(cell.get((g, b), [])) if cell.get((g, b)) else "-" for b in budgets]
            lines.append(f"| {g} | " + " | ".join(accs) + f" | {mean(images[g]) * 1e15:.0f} |")
        vits = [g for g in groups if g != "NaViT"]
        best_vit = {b: max((cell[(g, b)] for g in vits), key=mean) for b in budgets}
        verdicts = [Verdict(f"NaViT beats the best ViT at {b / 1e12:.3g} TFLOPs", compare(cell[("NaViT", b)], best_vit[b]),
                            f"{pct(cell[('NaViT', b)])}% vs {pct(best_vit[b])}%") for b in budgets]  # fmt: skip
        top = budgets[-1]
        vit_best = mean(best_vit[top])
        navit_curve = [(b, mean(cell[("NaViT", b)])) for b in budgets]
        needed = flops_to_reach(navit_curve, vit_best)
        ratio = needed / top if needed is not None else None
        verdicts.append(Verdict(
            "NaViT matches ViT's best accuracy with <= 1/4 of its compute",
            no_worse(cell[("NaViT", budgets[0])], best_vit[top]),
            f"NaViT at {budgets[0] / 1e12:.3g} TFLOPs: {pct(cell[('NaViT', budgets[0])])}%; ViT's best at {top / 1e12:.3g}: "
            f"{pct(best_vit[top])}%; NaViT's curve reaches it at "
            + (f"{ratio:.2f}x ViT's compute" if ratio is not None else "no measured budget"),
        ))  # fmt: skip
        best_arm = max(vits, key=lambda g: mean(cell[(g, top)]))
        per_flop = mean(images["NaViT"]) / mean(images[best_arm])
        verdicts.append(Verdict("NaViT sees more images per FLOP (paper: ~5x)", f"{per_flop:.2f}x",
                                f"examples seen / training FLOPs, NaViT over the best ViT ({best_arm})"))  # fmt: skip
        figures = {"flops_ratio_to_match_vit_best": ratio, "images_per_flop_ratio": per_flop,
                   "accuracy": {g: {str(b): cell[(g, b)] for b in budgets if (g, b) in cell} for g in groups}}  # fmt: skip
        return Analysis("\n".join(lines), verdicts, figures)

    def plot(self, runs: list[dict[str, Any]], analysis: Analysis, folder: Path) -> list[str]:
        fig, ax = figure()
        for group, cells in analysis.figures["accuracy"].items():
            xs = sorted(cells, key=float)
            ax.errorbar([float(x) for x in xs], [100 * mean(cells[x]) for x in xs],
                        yerr=[100 * spread(cells[x]) for x in xs], marker="o", capsize=3,
                        label=group, linewidth=2.5 if group == "NaViT" else 1.2)  # fmt: skip
        ax.set_xscale("log")
        return [save_figure(fig, ax, folder / "accuracy_vs_flops.png", "training FLOPs",
                            "validation accuracy (%), mean ± std over seeds", "NaViT vs ViT at matched compute")]


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The FLOPs at which a rising (FLOPs, accuracy) curve reaches ``target``, interpolated in log
    FLOPs between measured budgets; the first budget if it is reached there already (at most
    that), None if never."""
    if curve and curve[0][1] >= target:
        return curve[0][0]
    for (f0, a0), (f1, a1) in zip(curve, curve[1:]):
        if a0 < target <= a1:
            t = (target - a0) / (a1 - a0)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
    return None
