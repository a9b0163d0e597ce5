"""``token-drop`` (paper Fig. 8 and 9): how to drop tokens in training.

Rates: no dropping, one constant rate, Beta-distributed rates of the same mean and rates that grow
with an image's token count, each trained to the same FLOPs (dropping buys more images). Schedules,
compared with each other only: a rate multiplier that stays at one half, rises from 0 to 1 or falls
from 1 to 0 over training, with the same epochs, so each sees the same images and, in expectation,
the same tokens and FLOPs. All arms sample resolutions, so images come in many sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from navit.experiments.base import Analysis, Arm, Experiment, Setting, Verdict, by_arm, compare, mean, pct
from navit.experiments.resolution import accuracy_vs_budget

RATE = 0.25


class TokenDrop(Experiment):
    name = "token-drop"
    paper = "Fig. 8 and 9, token dropping rates and schedules"
    claim = ("At equal compute, dropping tokens beats not dropping, and Beta-distributed and resolution-dependent "
             "rates beat one constant rate (Fig. 8); a rate that changes during training can beat a constant one "
             "(Fig. 9; here a falling and a rising rate against a constant one, at equal tokens).")

    shared = {"budgets": [16, 36, 64], "res_mode": "side", "res_min": 64, "res_max": 128, "drop_max": 0.5}

    def arms(self, setting: Setting) -> list[Arm]:
        flops = self.flops(12000, setting)
        epochs = self.epochs(14000, setting)
        rates = [
            Arm("none", {"drop": "none", "max_flops": flops}, "rates"),
            Arm("constant", {"drop": "constant", "drop_rate": RATE, "max_flops": flops}, "rates"),
            Arm("beta", {"drop": "beta", "drop_rate": RATE, "max_flops": flops}, "rates"),
            Arm("resolution", {"drop": "resolution", "max_flops": flops}, "rates"),
        ]
        schedule = {"drop": "constant", "drop_rate": 2 * RATE, "drop_schedule": "linear", "epochs": epochs}
        schedules = [
            Arm("fixed-half", {**schedule, "drop_schedule_start": 0.5, "drop_schedule_end": 0.5}, "schedules"),
            Arm("increasing", {**schedule, "drop_schedule_start": 0.0, "drop_schedule_end": 1.0}, "schedules"),
            Arm("decreasing", {**schedule, "drop_schedule_start": 1.0, "drop_schedule_end": 0.0}, "schedules"),
        ]
        return rates + schedules

    def analyse(self, runs: list[dict[str, Any]], setting: Setting) -> Analysis:
        budgets = [str(b) for b in self.options(setting)["budgets"]]
        acc, seen, flops = by_arm(runs), by_arm(runs, "examples_seen"), by_arm(runs, "train_flops")
        at = {b: by_arm(runs, budget=b) for b in budgets}
        lines = ["| arm | accuracy (%) | " + " | ".join(f"@ {b} tok" for b in budgets) + " | images seen | TFLOPs |",
                 "|---|---|" + "---|" * (len(budgets) + 2)]  # fmt: skip
        for name in acc:
            lines.append(f"| {name} | {pct(acc[name])} | " + " | ".join(pct(at[b][name]) for b in budgets)
                         + f" | {mean(seen[name]):.0f} | {mean(flops[name]) / 1e12:.3g} |")  # fmt: skip
        pairs = [("constant", "none"), ("beta", "constant"), ("resolution", "constant"),
                 ("decreasing", "fixed-half"), ("increasing", "fixed-half"), ("decreasing", "increasing")]  # fmt: skip
        verdicts = [Verdict(f"{a} beats {b}", compare(acc[a], acc[b]), f"{pct(acc[a])}% vs {pct(acc[b])}%")
                    for a, b in pairs if a in acc and b in acc]  # fmt: skip
        return Analysis("\n".join(lines), verdicts, {"accuracy": {b: at[b] for b in budgets}})

    def plot(self, runs: list[dict[str, Any]], analysis: Analysis, folder: Path) -> list[str]:
        return [accuracy_vs_budget(analysis.figures["accuracy"], folder, "token_drop.png", "token dropping in training")]
