"""What every experiment shares: arms trained over seeds, results, verdicts and the report.

An experiment compares *arms*: training runs that differ from a common recipe in the one thing
under study. Each arm is trained once per seed (the seed moves initialisation, data order and
augmentation; the train/validation split stays the same), every run's settings and outcome go to
``results.json``, and the experiment turns them into a table, verdicts and plots in ``report.md``.

A verdict compares two arms by their spread over seeds: when the ranges [min, max] of the two
overlap, the difference is a tie; otherwise the claim holds or does not by the direction.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

#: The recipe every arm starts from, at CPU scale: a 4-layer, 128-wide NaViT. Loading in the
#: training process (``workers=0``) leaves every core to the model: on 2 cores a step and the
#: evaluation ran 20-30% faster than with one core each for loading and for the model.
BASE = dict(model="navit_mini16", max_tokens=64, seq_len=256, num_seqs=4, lr=2e-3, warmup_steps=100,
            workers=0, log_every=50, save_every=10**9, crop_min=1.0)  # fmt: skip
#: Settings that change how fast a run goes, not what it computes: a finished run is reused
#: whatever they were.
SPEED_ONLY = (("data", "workers"), ("run", "threads"))
#: ``--quick``: a model and a run small enough for the test suite (the numbers mean nothing).
QUICK = dict(model_args={"embed_dim": 32, "depth": 1, "num_heads": 2}, seq_len=128, num_seqs=2,
             warmup_steps=2, log_every=1)  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One setting under comparison: its name, the training options it sets and a group (arms
    of one group form one curve or one row of the table)."""

    name: str
    options: dict[str, Any]
    group: str = ""


@dataclass
class Setting:
    """What the command gives: the data, the output folder, quick or full, the seeds."""

    data: str
    out: Path
    quick: bool = False
    seeds: int = 2
    val_data: str | None = None

    def folder(self, name: str) -> Path:
        return self.out / name

    def command(self, name: str) -> str:
        """The command that runs experiment ``name`` in this setting."""
        val, quick = f" --val-data {self.val_data}" if self.val_data else "", " --quick" if self.quick else ""
        return f"navit experiment {name} --data {self.data}{val} --out {self.out}{quick} --seeds {self.seeds}"


@dataclass
class Verdict:
    claim: str
    verdict: str  # "holds", "does not hold", "tie within the seed spread", or a measured figure
    detail: str = ""


@dataclass
class Analysis:
    table: str
    verdicts: list[Verdict]
    figures: dict[str, Any] = field(default_factory=dict)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def spread(values: list[float]) -> float:
    """Sample standard deviation (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def compare(better: list[float], worse: list[float]) -> str:
    """Whether ``better`` beats ``worse`` beyond the spread of seeds: their [min, max] ranges must
    not overlap (one seed each: any difference counts, and the report says there was one seed)."""
    if min(better) > max(worse):
        return "holds"
    if max(better) < min(worse):
        return "does not hold"
    return "tie within the seed spread"


def no_worse(candidate: list[float], reference: list[float]) -> str:
    """Whether ``candidate`` is no worse than ``reference`` (a claim of matching): the reference
    beats it beyond the spread, it does not hold; inside the spread, it holds only with a mean
    at least the reference's, else it is a tie."""
    if compare(reference, candidate) == "holds":
        return "does not hold"
    return "holds" if mean(candidate) >= mean(reference) else "tie within the seed spread"


def same_settings(saved: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a finished run's settings are the wanted ones, up to :data:`SPEED_ONLY`."""
    def results_part(settings: dict[str, Any]) -> dict[str, Any]:
        part = {section: dict(values) for section, values in settings.items()}
        for section, key in SPEED_ONLY:
            part.get(section, {}).pop(key, None)
        return part

    return results_part(saved) == results_part(wanted)


def pct(values: list[float]) -> str:
    """``mean ± std`` in percent."""
    return f"{100 * mean(values):.2f} ± {100 * spread(values):.2f}"


class Experiment:
    """Base class: subclasses set ``name``, ``claim``, ``paper`` and implement :meth:`arms` and
    :meth:`analyse` (and :meth:`plot`); :meth:`run` trains every arm on every seed."""

    name: ClassVar[str]
    claim: ClassVar[str]
    paper: ClassVar[str]
    #: False for an experiment that measures instead of training (``measures`` says what).
    trains: ClassVar[bool] = True
    measures: ClassVar[str] = ""

    #: Training options every arm shares (on top of :data:`BASE`).
    shared: ClassVar[dict[str, Any]] = {}
    #: Training examples of every arm, whatever the data's size (None: the arms say, or epochs do).
    examples: ClassVar[int | None] = None

    def options(self, setting: Setting) -> dict[str, Any]:
        """The training options every arm shares: :attr:`shared`, and epochs for :attr:`examples`."""
        return {**self.shared, **({"epochs": self.epochs(self.examples, setting)} if self.examples else {})}

    def arms(self, setting: Setting) -> list[Arm]:
        raise NotImplementedError

    def analyse(self, runs: list[dict[str, Any]], setting: Setting) -> Analysis:
        raise NotImplementedError

    def plot(self, runs: list[dict[str, Any]], analysis: Analysis, folder: Path) -> list[str]:
        return []

    def train_size(self, setting: Setting) -> int:
        """Examples in the training split of ``setting.data``."""
        from navit.data.registry import open_source
        from navit.train_data import DataSection

        size = len(open_source(setting.data))
        return size if setting.val_data else round(size * (1 - DataSection().val_fraction))

    def epochs(self, examples: int, setting: Setting) -> float:
        """Epochs that make ``examples`` training examples (``--quick``: 48), whatever the data's size,
        so an experiment takes as long on any data."""
        return (48 if setting.quick else examples) / self.train_size(setting)

    def flops(self, examples: int, setting: Setting, tokens: int = 64) -> float:
        """The training FLOPs of ``examples`` examples of ``tokens`` tokens (``--quick``: 48)."""
        from navit.experiments.flops import example_flops

        return (48 if setting.quick else examples) * example_flops(self.config(Arm("probe", {}), 0, setting), tokens)

    def after_training(self, record: dict[str, Any], run_folder: Path, setting: Setting) -> None:
        """Add measurements of the trained model to ``record`` (e.g. other evaluations)."""

    # -- running ---------------------------------------------------------------------------------
    def config(self, arm: Arm, seed: int, setting: Setting):
        from navit.train_config import TrainConfig

        values = {**BASE, **(QUICK if setting.quick else {}), **self.options(setting), **arm.options}
        if setting.quick and "model_args" in arm.options:
            values["model_args"] = {**QUICK["model_args"], **arm.options["model_args"]}
        values.update(data=setting.data, seed=seed, out=str(setting.folder(self.name) / "runs"), name=f"{arm.name}-s{seed}")
        if setting.val_data:
            values["val_data"] = setting.val_data
        return TrainConfig.from_dict(values)

    def train_arm(self, arm: Arm, seed: int, setting: Setting) -> dict[str, Any]:
        """Train one arm on one seed (or reuse a finished run of the same config) -> its record."""
        from navit.train import train

        cfg = self.config(arm, seed, setting)
        folder = Path(cfg.run.out) / cfg.run.name
        summary_file = folder / "summary.json"
        saved = folder / "config.yaml"
        if summary_file.exists() and saved.exists() and same_settings(yaml.safe_load(saved.read_text()), cfg.to_dict()):
            print(f"[{self.name}] {arm.name} seed {seed}: reusing {folder}")
            summary = json.loads(summary_file.read_text())
        else:
            if folder.exists():
                import shutil

                shutil.rmtree(folder)  # an unfinished run, or one of other settings
            print(f"[{self.name}] training {arm.name} seed {seed}")
            summary = train(cfg)
        record = {
            "arm": arm.name,
            "group": arm.group,
            "seed": seed,
            "options": arm.options,
            "settings": cfg.to_dict(),
            "train_flops": summary["train_flops"],
            "examples_seen": summary["examples_seen"],
            "tokens_seen": summary["tokens_seen"],
            "train_seconds": summary["train_seconds"],
            "accuracy": summary["val_accuracy"],
            "accuracy_vs_tokens": summary["accuracy_vs_tokens"],
        }
        self.after_training(record, folder, setting)
        return record

    def run(self, setting: Setting) -> dict[str, Any]:
        """Every arm on every seed, then ``results.json``, ``report.md`` and the plots."""
        folder = setting.folder(self.name)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        runs = []
        for seed in range(setting.seeds):
            for arm in self.arms(setting):
                runs.append(self.train_arm(arm, seed, setting))
                self.write_results(runs, setting, None, time.perf_counter() - start)
        return self.report(runs, setting, time.perf_counter() - start)

    def report(self, runs: list[dict[str, Any]], setting: Setting, seconds: float) -> dict[str, Any]:
        folder = setting.folder(self.name)
        analysis = self.analyse(runs, setting)
        plots = self.plot(runs, analysis, folder)
        results = self.write_results(runs, setting, analysis, seconds)
        what = f"Data `{setting.data}`, {setting.seeds} seed(s)" if self.trains else self.measures
        training = sum(r.get("train_seconds", 0) for r in runs)
        trained = f"training {training / 60:.1f} min summed over the runs; " if training else ""
        reuse = " (finished runs of the same settings are reused)" if self.trains else ""
        lines = [f"# {self.name}: {self.paper}", "", f"**Claim.** {self.claim}", "",
                 f"{what}{' (quick: numbers mean nothing)' if setting.quick else ''}; {trained}this command took "
                 f"{seconds / 60:.1f} min{reuse}. Command: `{setting.command(self.name)}`.", "",
                 analysis.table, "", "| claim | verdict | detail |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {v.claim} | **{v.verdict}** | {v.detail} |" for v in analysis.verdicts]
        if setting.seeds == 1 and self.trains:
            lines += ["", "One seed: no spread to judge a difference by; run with `--seeds 2` or more."]
        lines += [""] + [f"![{p}]({p})" for p in plots]
        (folder / "report.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"\nwrote {folder / 'results.json'} and {folder / 'report.md'}")
        return results

    def write_results(self, runs: list[dict[str, Any]], setting: Setting, analysis: Analysis | None,
                      seconds: float) -> dict[str, Any]:  # fmt: skip
        results = {
            "experiment": self.name,
            "paper": self.paper,
            "claim": self.claim,
            "data": setting.data,
            "quick": setting.quick,
            "seeds": setting.seeds,
            "seconds": round(seconds, 1),
            "runs": runs,
        }
        if analysis is not None:
            results["verdicts"] = [vars(v) for v in analysis.verdicts]
            results["figures"] = analysis.figures
        path = setting.folder(self.name) / "results.json"
        path.write_text(json.dumps(results, indent=2))
        return results


def by_arm(runs: list[dict[str, Any]], key: str = "accuracy", *, budget: str | None = None) -> dict[str, list[float]]:
    """Arm name -> the values of ``key`` over seeds, or with ``budget`` the accuracy at that budget."""
    out: dict[str, list[float]] = {}
    for run in runs:
        value = run[key] if budget is None else run["accuracy_vs_tokens"][budget]["accuracy"]
        out.setdefault(run["arm"], []).append(value)
    return out


def figure():
    """A new (figure, axes) of the experiments' plot size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5.5, 3.8))


def save_figure(fig, ax, path: Path, xlabel: str, ylabel: str = "validation accuracy (%)", title: str = "") -> str:
    """Label, grid and legend ``ax``, write ``fig`` to ``path`` as PNG; returns the file name."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name
