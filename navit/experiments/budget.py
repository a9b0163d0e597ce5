"""``budget`` (paper Fig. 1 right, App. C): one model, any inference cost.

One NaViT (sampled resolutions, Beta token dropping) is evaluated at many tokens per image in two
ways: resizing each image, aspect kept, to the budget; or keeping the image at its native size
(capped at ``max_tokens``) and dropping all but the budget's tokens at random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from navit.experiments.base import Analysis, Arm, Experiment, Setting, Verdict, compare, figure, mean, pct, save_figure

BUDGETS = [8, 16, 24, 36, 48, 64]


class Budget(Experiment):
    name = "budget"
    paper = "Fig. 1 (right) and App. C, inference at any token budget"
    claim = ("One NaViT serves every inference budget: accuracy rises smoothly with the tokens per image. Measured "
             "alongside, not a claim of the paper: whether resizing to a budget or dropping tokens to it keeps more.")

    shared = {"budgets": BUDGETS, "res_mode": "side", "res_min": 64, "res_max": 128, "drop": "beta", "drop_rate": 0.2,
              "drop_max": 0.5}  # fmt: skip
    examples = 24000

    def arms(self, setting: Setting) -> list[Arm]:
        return [Arm("navit", {})]

    def after_training(self, record: dict[str, Any], run_folder: Path, setting: Setting) -> None:
        from navit.evaluate import evaluate_budgets
        from navit.inference import load_checkpoint
        from navit.train_data import open_data
        from navit.train_config import TrainConfig

        model, task, meta = load_checkpoint(run_folder)
        cfg = TrainConfig.from_dict(meta["config"])
        dropped = evaluate_budgets(model, task, open_data(cfg)[1], model.processor, budgets=BUDGETS, by="drop",
                                   seq_len=cfg.packing.seq_len)  # fmt: skip
        record["accuracy_vs_dropped_tokens"] = dropped

    def curves(self, runs: list[dict[str, Any]]) -> dict[str, dict[int, list[float]]]:
        out: dict[str, dict[int, list[float]]] = {"resize": {}, "drop": {}}
        for run in runs:
            for way, key in (("resize", "accuracy_vs_tokens"), ("drop", "accuracy_vs_dropped_tokens")):
                for budget in BUDGETS:
                    out[way].setdefault(budget, []).append(run[key][str(budget)]["accuracy"])
        return out

    def analyse(self, runs: list[dict[str, Any]], setting: Setting) -> Analysis:
        curves = self.curves(runs)
        lines = ["| tokens per image | resize (%) | drop tokens (%) |", "|---|---|---|"]
        lines += [f"| {b} | {pct(curves['resize'][b])} | {pct(curves['drop'][b])} |" for b in BUDGETS]
        resize = [mean(curves["resize"][b]) for b in BUDGETS]
        verdicts = [Verdict(f"accuracy rises with the budget: {BUDGETS[-1]} tokens beat {BUDGETS[0]} (resizing)",
                            compare(curves["resize"][BUDGETS[-1]], curves["resize"][BUDGETS[0]]),
                            " → ".join(f"{100 * v:.1f}" for v in resize))]  # fmt: skip
        verdicts += [Verdict(f"resizing beats dropping at {b} tokens", compare(curves["resize"][b], curves["drop"][b]),
                             f"{pct(curves['resize'][b])}% vs {pct(curves['drop'][b])}%") for b in BUDGETS[:-1]]  # fmt: skip
        return Analysis("\n".join(lines), verdicts, {"curves": {w: {str(b): v for b, v in c.items()} for w, c in curves.items()}})

    def plot(self, runs: list[dict[str, Any]], analysis: Analysis, folder: Path) -> list[str]:
        fig, ax = figure()
        for way, label in (("resize", "resize to the budget"), ("drop", "drop tokens to the budget")):
            curve = analysis.figures["curves"][way]
            ax.plot(BUDGETS, [100 * mean(curve[str(b)]) for b in BUDGETS], marker="o", label=label)
        return [save_figure(fig, ax, folder / "budget.png", "tokens per image at inference",
                            title="one model, any inference budget")]  # fmt: skip
