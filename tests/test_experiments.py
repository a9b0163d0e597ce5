"""``navit experiment``: each claim's quick version end to end, verdicts, and the training knobs
the experiments need (FLOP budgets, resolution centre, drop schedules, square baselines, the
fixed split, token dropping at inference)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from navit.cli import main
from navit.data.registry import open_source
from navit.synthetic.hard import KINDS, SyntheticLargest
from navit.ops import ResolutionSampler, eval_chain
from navit.experiments import EXPERIMENTS
from navit.experiments.base import Setting, compare, no_worse
from navit.experiments.compute import flops_to_reach
from navit.experiments.posemb import best_of
from navit.processor import Processor
from navit.train import train
from navit.train_data import open_data
from navit.train_config import TrainConfig

DATA = "synthetic-hard:60"


def run_quick(tmp_path, name, seeds=1):
    assert main(["experiment", name, "--data", DATA, "--out", str(tmp_path), "--quick", "--seeds", str(seeds)]) == 0
    return read_report(tmp_path / name)


def read_report(folder):
    results = json.loads((folder / "results.json").read_text())
    report = (folder / "report.md").read_text()
    plots = [line for line in report.splitlines() if line.startswith("![")]
    assert plots, "the report shows its plots"
    for line in plots:
        Image.open(folder / line.split("(")[1].rstrip(")")).verify()  # a real PNG
    return results, report


@pytest.fixture(scope="module")
def token_drop_quick(tmp_path_factory):
    """``navit experiment token-drop --quick``, run once for the tests that read it."""
    return run_quick(tmp_path_factory.mktemp("xp"), "token-drop")


def quick_records(name, tmp_path):
    """The settings of every arm of experiment ``name`` as ``--quick`` would train them (the
    records' ``settings``, without training)."""
    experiment, setting = EXPERIMENTS[name](), Setting(DATA, tmp_path, quick=True, seeds=1)
    return [{"arm": arm.name, "options": arm.options, "settings": experiment.config(arm, 0, setting).to_dict()}
            for arm in experiment.arms(setting)]  # fmt: skip


def made_up(accuracy=None, at=None, seen=None, groups=None, **fields):
    """Run records with made-up outcomes, seed by seed: ``accuracy[arm]``, ``at[budget][arm]``
    (accuracy at a token budget) and ``seen[arm]`` (examples seen) are lists over seeds."""
    accuracy, at, seen, groups = accuracy or {}, at or {}, seen or {}, groups or {}
    arms = list(accuracy or next(iter(at.values())))
    seeds = len(next(iter((accuracy or next(iter(at.values()))).values())))
    return [{"arm": arm, "group": groups.get(arm, ""), "seed": seed, "accuracy": accuracy.get(arm, [0.5] * seeds)[seed],
             "accuracy_vs_tokens": {b: {"accuracy": values[arm][seed], "tokens_per_example": int(b)}
                                    for b, values in at.items()},
             "examples_seen": seen.get(arm, [100] * seeds)[seed], "train_flops": 1e12,
             **{key: value[arm][seed] for key, value in fields.items()}}
            for seed in range(seeds) for arm in arms]  # fmt: skip


def verdicts_of(name, runs, tmp_path):
    """``(claim, verdict)`` of every verdict experiment ``name`` reaches on ``runs``, after
    writing its report and plots from them."""
    setting = Setting(DATA, tmp_path, quick=True, seeds=2)
    experiment = EXPERIMENTS[name]()
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    results = experiment.report(runs, setting, 1.0)
    _, report = read_report(tmp_path / name)
    for verdict in results["verdicts"]:
        assert f"| {verdict['claim']} | **{verdict['verdict']}** |" in report
    return [(v["claim"], v["verdict"]) for v in results["verdicts"]]


def flat_settings(run):
    return {(section, k): json.dumps(v, sort_keys=True) for section, values in run["settings"].items()
            for k, v in values.items()}  # fmt: skip


def assert_arms_differ_only_where_they_say(runs):
    """Two runs differ only in options one of them sets (and the run name and seed)."""
    from navit.train_config import flat_options

    names = {flat: f.name for flat, (section, f) in flat_options().items()}
    first = flat_settings(runs[0])
    for run in runs[1:]:
        differing = {key for key, value in flat_settings(run).items() if first[key] != value}
        allowed = {names.get(k, k) for k in [*run["options"], *runs[0]["options"]]} | {"name", "seed", "args"}
        assert {k for _, k in differing} <= allowed, (run["arm"], differing)


# --------------------------------------------------------------------------------------------
# Verdicts.


def test_a_difference_inside_the_seed_spread_is_a_tie():
    assert compare([0.60, 0.62], [0.50, 0.55]) == "holds"
    assert compare([0.50, 0.55], [0.60, 0.62]) == "does not hold"
    assert compare([0.60, 0.70], [0.55, 0.62]) == "tie within the seed spread"
    assert compare([0.6], [0.6]) == "tie within the seed spread"
    # the best of several must beat each of the others beyond the spread
    assert best_of({"sum": [0.60, 0.62], "stack": [0.50, 0.55], "product": [0.40, 0.45]}, "c").verdict == "sum"
    tie = best_of({"sum": [0.60, 0.62], "stack": [0.50, 0.61], "product": [0.40, 0.45]}, "c")
    assert tie.verdict == "tie within the seed spread" and "stack 55.50 ± 7.78%" in tie.detail
    # "No worse" holds inside the spread only with a mean at least the reference's.
    assert no_worse([0.40, 0.80], [0.59, 0.60]) == "holds"
    assert no_worse([0.18, 0.62], [0.59, 0.60]) == "tie within the seed spread"
    assert no_worse([0.50, 0.55], [0.59, 0.60]) == "does not hold"
    assert no_worse([0.61, 0.62], [0.59, 0.60]) == "holds"


def test_flops_to_reach_interpolates_in_log_flops():
    curve = [(1e12, 0.30), (2e12, 0.40), (4e12, 0.50)]
    assert flops_to_reach(curve, 0.45) == pytest.approx(math.sqrt(2) * 2e12)
    assert flops_to_reach(curve, 0.25) == 1e12  # reached at the first budget already
    assert flops_to_reach(curve, 0.55) is None


# --------------------------------------------------------------------------------------------
# Each experiment, quick.


def test_compute_trains_every_arm_to_its_flop_budget(tmp_path):
    results, report = run_quick(tmp_path, "compute")
    runs = results["runs"]
    assert len(runs) == 4 * 3 and {r["group"] for r in runs} == {"NaViT", "ViT 16 tok", "ViT 36 tok", "ViT 64 tok"}
    budgets = sorted({r["settings"]["optim"]["max_flops"] for r in runs})
    assert budgets[1] == pytest.approx(2 * budgets[0]) and budgets[2] == pytest.approx(4 * budgets[0])
    for run in runs:  # each stops at the first step past its budget: a step is under 1 GFLOP here
        assert run["settings"]["optim"]["max_flops"] <= run["train_flops"] < run["settings"]["optim"]["max_flops"] + 1e9
        assert run["accuracy_vs_tokens"].keys() >= {"native", "16", "36", "64"}
    vit16 = [r for r in runs if r["group"] == "ViT 16 tok"]
    vit64 = [r for r in runs if r["group"] == "ViT 64 tok"]
    assert vit16[0]["accuracy_vs_tokens"]["native"]["tokens_per_example"] == 16
    assert vit64[0]["accuracy_vs_tokens"]["native"]["tokens_per_example"] == 64
    # at equal FLOPs, 16-token ViT sees about 4x the images of the 64-token one
    assert vit16[-1]["examples_seen"] > 2.5 * vit64[-1]["examples_seen"]
    assert_arms_differ_only_where_they_say(runs)
    assert "NaViT matches ViT's best accuracy with <= 1/4 of its compute" in report
    assert {v["claim"] for v in results["verdicts"]} >= {"NaViT sees more images per FLOP (paper: ~5x)"}


@pytest.mark.parametrize("name, arms", [("resolution", 6), ("token-drop", 7), ("posemb", 14)])
def test_each_arm_changes_only_its_own_options(tmp_path, name, arms):
    # The settings train_arm trains with (token-drop's run end to end below).
    runs = quick_records(name, tmp_path)
    assert len(runs) == arms and len({r["arm"] for r in runs}) == arms
    assert_arms_differ_only_where_they_say(runs)
    assert len({r["settings"]["model"]["args"].get("pos_embed", "learned") for r in runs}) == (5 if name == "posemb" else 1)


def test_token_drop_runs_end_to_end_and_its_schedules_see_the_same_images(token_drop_quick):
    results, report = token_drop_quick
    assert [r["arm"] for r in results["runs"]] == [r["arm"] for r in quick_records("token-drop", Path("xp"))]
    assert_arms_differ_only_where_they_say(results["runs"])
    for verdict in results["verdicts"]:
        assert verdict["verdict"] in ("holds", "does not hold", "tie within the seed spread")
        assert f"| {verdict['claim']} | **{verdict['verdict']}** |" in report
    runs = {r["arm"]: r for r in results["runs"]}
    schedules = [runs[a] for a in ("fixed-half", "increasing", "decreasing")]
    assert len({r["examples_seen"] for r in schedules}) == 1
    claims = {v["claim"] for v in results["verdicts"]}
    assert {"decreasing beats fixed-half", "increasing beats fixed-half", "decreasing beats increasing"} <= claims
    assert runs["none"]["tokens_seen"] / runs["none"]["examples_seen"] > runs["constant"]["tokens_seen"] / runs["constant"]["examples_seen"]


def test_budget_evaluates_one_model_by_resizing_and_by_dropping(tmp_path, capsys):
    results, report = run_quick(tmp_path, "budget", seeds=2)
    runs = results["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for run in runs:
        for budget in ("8", "16", "24"):
            dropped = run["accuracy_vs_dropped_tokens"][budget]
            assert dropped["tokens_per_example"] <= int(budget)
            assert dropped["examples"] == run["accuracy_vs_tokens"][budget]["examples"]  # the same validation images
        assert run["accuracy_vs_dropped_tokens"]["native"] == run["accuracy_vs_tokens"]["native"]
    assert "| 8 |" in report and "resizing beats dropping at 8 tokens" in report
    # run again: finished runs of the same settings are reused, not retrained
    capsys.readouterr()
    again, _ = run_quick(tmp_path, "budget", seeds=2)
    assert capsys.readouterr().out.count("reusing") == 2
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in runs]
    # settings that change only the speed (loader workers, threads) do not make a run stale; others do
    configs = sorted((tmp_path / "budget" / "runs").glob("*/config.yaml"))
    for config, (section, key, value) in zip(configs, [("data", "workers", 3), ("optim", "lr", 0.5)]):
        settings = yaml.safe_load(config.read_text())
        settings[section][key] = value
        settings["run"]["threads"] = 1
        config.write_text(yaml.safe_dump(settings))
    run_quick(tmp_path, "budget", seeds=2)
    out = capsys.readouterr().out
    assert out.count("reusing") == 1 and "navit seed 0: reusing" in out and "training navit seed 1" in out
    # A run killed before it finished (no summary) is trained again from scratch, not resumed or reused.
    killed = tmp_path / "budget" / "runs" / "navit-s1"
    (killed / "summary.json").unlink()
    (killed / "left-over").write_text("from the killed run")
    again, _ = run_quick(tmp_path, "budget", seeds=2)
    out = capsys.readouterr().out
    assert "navit seed 0: reusing" in out and "training navit seed 1" in out and out.count("reusing") == 1
    assert (killed / "summary.json").exists() and not (killed / "left-over").exists()
    assert len(again["runs"]) == 2


def test_token_drop_verdicts_follow_made_up_runs(tmp_path):
    acc = {"none": [0.50, 0.52], "constant": [0.60, 0.62], "beta": [0.55, 0.70], "resolution": [0.40, 0.45],
           "fixed-half": [0.60, 0.61], "increasing": [0.50, 0.55], "decreasing": [0.70, 0.72]}  # fmt: skip
    at = {b: acc for b in ("16", "36", "64")}
    assert verdicts_of("token-drop", made_up(acc, at), tmp_path) == [
        ("constant beats none", "holds"), ("beta beats constant", "tie within the seed spread"),
        ("resolution beats constant", "does not hold"), ("decreasing beats fixed-half", "holds"),
        ("increasing beats fixed-half", "does not hold"), ("decreasing beats increasing", "holds"),
    ]  # fmt: skip
    assert "| constant | 61.00 ± 1.41 |" in (tmp_path / "token-drop" / "report.md").read_text()


def test_resolution_verdicts_follow_made_up_runs(tmp_path):
    at = {"16": {"fixed": [0.30, 0.31], "side-normal-low": [0.50, 0.52]},
          "36": {"fixed": [0.50, 0.52], "side-normal-low": [0.45, 0.51]},
          "64": {"fixed": [0.80, 0.81], "side-normal-low": [0.70, 0.71], "side-normal-mid": [0.60, 0.61],
                 "side-normal-high": [0.65, 0.72], "side-uniform": [0.72, 0.73], "area-uniform": [0.60, 0.62]}}  # fmt: skip
    arms = list(at["64"])
    at = {b: {arm: values.get(arm, [0.4, 0.4]) for arm in arms} for b, values in at.items()}
    assert verdicts_of("resolution", made_up(at=at), tmp_path) == [
        ("sampled (side-normal-low) beats fixed at 16 tokens", "holds"),
        ("sampled (side-normal-low) beats fixed at 36 tokens", "tie within the seed spread"),
        ("sampled (side-normal-low) beats fixed at 64 tokens", "does not hold"),
        ("the normal biased to low resolution beats the middle and high ones", "holds / tie within the seed spread"),
        ("the normal biased to low resolution beats uniform side sampling", "does not hold"),
        ("side-length sampling beats area sampling (both uniform)", "holds"),
    ]
    assert "against side-normal-mid / side-normal-high; best normal: side-normal-low" in (tmp_path / "resolution" / "report.md").read_text()


def test_posemb_verdicts_follow_made_up_runs(tmp_path):
    from navit.experiments.posemb import COMBINES, KINDS

    arms = [f"{k}-{m}-sum" for k in KINDS for m in ("abso", "frac")] + [f"{k}-frac-{c}" for k in KINDS for c in COMBINES[1:]]
    arms += ["vit-resized", "pix2struct"]
    at = {b: {arm: [0.40, 0.41] for arm in arms} for b in ("16", "36", "64", "144", "256")}
    for b, arm, values in [
        ("144", "learned-frac-sum", [0.60, 0.61]), ("256", "learned-frac-sum", [0.60, 0.61]),
        ("256", "pix2struct", [0.55, 0.65]),  # tie at 256
        ("64", "learned-frac-sum", [0.50, 0.52]), ("64", "vit-resized", [0.40, 0.60]),  # no worse: inside, mean higher
        ("64", "pix2struct", [0.60, 0.62]),  # beats the chosen one
        ("256", "sincos-frac-sum", [0.30, 0.31]), ("256", "sincos-frac-stack", [0.45, 0.47]),
        ("256", "sincos-frac-product", [0.46, 0.50]),  # sincos: stack and product tie for best
        ("256", "fourier-frac-product", [0.70, 0.71]), ("256", "fourier-abso-sum", [0.38, 0.45]),
    ]:  # fmt: skip
        at[b][arm] = values
    got = dict(verdicts_of("posemb", made_up(at=at), tmp_path))
    assert got == {
        "factorized (learned-frac-sum) beats vit-resized at 144 tokens (unseen)": "holds",
        "factorized (learned-frac-sum) beats vit-resized at 256 tokens (unseen)": "holds",
        "factorized (learned-frac-sum) beats pix2struct at 144 tokens (unseen)": "holds",
        "factorized (learned-frac-sum) beats pix2struct at 256 tokens (unseen)": "tie within the seed spread",
        "learned-frac-sum is no worse than vit-resized at 64 tokens (trained)": "holds",
        "learned-frac-sum is no worse than pix2struct at 64 tokens (trained)": "does not hold",
        "learned: fractional beats absolute at 256 tokens (unseen)": "holds",
        "sincos: fractional beats absolute at 256 tokens (unseen)": "does not hold",
        "fourier: fractional beats absolute at 256 tokens (unseen)": "tie within the seed spread",
        "learned fractional: the best combination at 256 tokens (unseen)": "sum",
        "sincos fractional: the best combination at 256 tokens (unseen)": "tie within the seed spread",
        "fourier fractional: the best combination at 256 tokens (unseen)": "product",
    }


def test_compute_verdicts_follow_made_up_runs(tmp_path):
    # NaViT against three ViTs at three FLOP budgets; the best ViT changes with the budget.
    table = {"NaViT": ([0.50, 0.51], [0.60, 0.61], [0.70, 0.71]), "ViT 16 tok": ([0.40, 0.41], [0.45, 0.46], [0.50, 0.51]),
             "ViT 36 tok": ([0.45, 0.46], [0.62, 0.64], [0.55, 0.56]), "ViT 64 tok": ([0.30, 0.31], [0.50, 0.52], [0.60, 0.62])}  # fmt: skip
    per_flop = {"NaViT": 500, "ViT 16 tok": 400, "ViT 36 tok": 200, "ViT 64 tok": 100}  # examples per TFLOP
    runs = [{"arm": f"{group}-{level}", "group": group, "seed": seed, "accuracy": accs[i][seed],
             "settings": {"optim": {"max_flops": level * 1e12}}, "train_flops": level * 1e12,
             "examples_seen": per_flop[group] * level}
            for seed in range(2) for group, accs in table.items() for i, level in enumerate((1, 2, 4))]  # fmt: skip
    setting = Setting(DATA, tmp_path, quick=True, seeds=2)
    analysis = EXPERIMENTS["compute"]().analyse(runs, setting)
    assert [(v.claim, v.verdict) for v in analysis.verdicts] == [
        ("NaViT beats the best ViT at 1 TFLOPs", "holds"),  # against ViT 36
        ("NaViT beats the best ViT at 2 TFLOPs", "does not hold"),  # against ViT 36
        ("NaViT beats the best ViT at 4 TFLOPs", "holds"),  # against ViT 64
        ("NaViT matches ViT's best accuracy with <= 1/4 of its compute", "does not hold"),
        ("NaViT sees more images per FLOP (paper: ~5x)", "5.00x"),  # over ViT 64, the best at 4 TFLOPs
    ]
    # ViT 64's 61% is reached between NaViT's 60.5% at 2 and 70.5% at 4 TFLOPs, in log FLOPs
    assert analysis.figures["flops_ratio_to_match_vit_best"] == pytest.approx(2 ** 0.05 / 2)
    runs = [dict(r, accuracy=r["accuracy"] + 0.2) if r["group"] == "NaViT" else r for r in runs]
    matched = EXPERIMENTS["compute"]().analyse(runs, setting).verdicts[3]
    assert matched.verdict == "holds" and "reaches it at 0.25x ViT's compute" in matched.detail


def test_budget_verdicts_follow_made_up_runs(tmp_path):
    from navit.experiments.budget import BUDGETS

    resize = {b: [0.30 + 0.1 * i, 0.31 + 0.1 * i] for i, b in enumerate(BUDGETS)}
    drop = dict(zip(BUDGETS, ([0.20, 0.21], [0.38, 0.45], [0.60, 0.61], [0.40, 0.50], [0.40, 0.50], [0.40, 0.50])))
    runs = [{"arm": "navit", "seed": seed, "accuracy_vs_tokens": {str(b): {"accuracy": resize[b][seed]} for b in BUDGETS},
             "accuracy_vs_dropped_tokens": {str(b): {"accuracy": drop[b][seed]} for b in BUDGETS}}
            for seed in range(2)]  # fmt: skip
    assert verdicts_of("budget", runs, tmp_path)[:4] == [
        ("accuracy rises with the budget: 64 tokens beat 8 (resizing)", "holds"),
        ("resizing beats dropping at 8 tokens", "holds"),
        ("resizing beats dropping at 16 tokens", "tie within the seed spread"),
        ("resizing beats dropping at 24 tokens", "does not hold"),
    ]


def test_the_report_gives_the_command_that_reruns_it():
    from navit.experiments.base import Setting

    setting = Setting("photos/", Path("xp"), seeds=3, val_data="val/")
    assert setting.command("compute") == "navit experiment compute --data photos/ --val-data val/ --out xp --seeds 3"
    assert Setting("d", Path("o"), quick=True).command("budget") == "navit experiment budget --data d --out o --quick --seeds 2"


def test_bad_experiment_arguments_fail_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--seeds must be >= 1"):
        main(["experiment", "budget", "--seeds", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["experiment", "budget", "--data", str(tmp_path / "missing"), "--out", str(tmp_path), "--quick"])


def test_attention_share_runs_from_the_command_line_and_times_the_attention_core(tmp_path, monkeypatch):
    """The experiment's clock is made to run 100 s further in every call of the attention core
    (one per layer): the step with the core must be the one timed as the slower, by that much,
    whatever else the CPU does meanwhile."""
    import time
    from types import SimpleNamespace

    from navit.experiments import attention_share
    from navit.model import NaViT

    extra = [0.0]
    monkeypatch.setattr(attention_share, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + extra[0]))

    class SlowCore:
        def __init__(self, backend):
            self._backend = backend

        def __getattr__(self, name):
            return getattr(self._backend, name)

        def attend(self, *args):
            extra[0] += 100.0
            return self._backend.attend(*args)

        def attend_slots(self, *args):
            extra[0] += 100.0
            return self._backend.attend_slots(*args)

    backend_of = NaViT.attention_backend
    monkeypatch.setattr(NaViT, "attention_backend", lambda self, device: SlowCore(backend_of(self, device)))
    monkeypatch.setattr(attention_share, "WIDTHS", (64, 256))
    assert main(["experiment", "attention-share", "--out", str(tmp_path), "--quick"]) == 0
    results, report = read_report(tmp_path / "attention-share")
    rows = results["runs"]
    assert [r["width"] for r in rows] == [64, 256]
    flops = [r["attention_flops_share"] for r in rows]
    assert flops[0] > flops[1] > 0
    # per layer, forward: 4·Σn²·d for attention, 8·L·d² + 4·L·d·h for the rest (n <= 256, so Σn² <= 256·L)
    d = 64
    assert flops[0] < 12 * 256 * d / (12 * 256 * d + 3 * 2 * 12 * d * d)
    for row in rows:  # the step with the core takes 200 s longer than the step without it
        assert row["step_seconds"] > 200 and 190 < row["attention_time_share"] * row["step_seconds"] < 210
    assert results["verdicts"][0] == {"claim": "attention's share of step FLOPs falls with width", "verdict": "holds",
                                      "detail": " → ".join(f"{100 * s:.1f}%" for s in flops)}  # fmt: skip
    assert "| 64 |" in report and "| 256 |" in report


def test_attention_share_verdicts_follow_made_up_rows(tmp_path):
    def row(width, flops, seconds):
        return {"width": width, "tokens": 1000, "step_flops": 1e9, "attention_flops_share": flops,
                "attention_time_share": seconds, "step_seconds": 0.1}  # fmt: skip

    rows = [row(64, 0.30, 0.20), row(128, 0.20, 0.25), row(256, 0.10, 0.15)]
    setting = Setting(DATA, tmp_path, quick=True)
    verdicts = EXPERIMENTS["attention-share"]().analyse(rows, setting).verdicts
    assert [(v.verdict, v.detail) for v in verdicts] == [("holds", "30.0% → 20.0% → 10.0%"),
                                                          ("holds overall", "20.0% → 25.0% → 15.0%")]  # fmt: skip
    rising = EXPERIMENTS["attention-share"]().analyse([row(64, 0.1, 0.1), row(128, 0.2, 0.2)], setting).verdicts
    assert [v.verdict for v in rising] == ["does not hold", "does not hold"]


def test_every_experiment_has_a_claim_and_a_paper_reference():
    assert sorted(EXPERIMENTS) == ["attention-share", "budget", "compute", "posemb", "resolution", "token-drop"]
    for cls in EXPERIMENTS.values():
        assert cls.claim and cls.paper


# --------------------------------------------------------------------------------------------
# The training knobs the experiments use.


def small(tmp_path, **options):
    values = dict(data=DATA, model_args={"embed_dim": 32, "depth": 1, "num_heads": 2}, seq_len=128, num_seqs=2,
                  max_tokens=36, warmup_steps=1, workers=0, budgets=[], out=str(tmp_path), log_every=1)  # fmt: skip
    return TrainConfig.from_dict({**values, **options})


def test_max_flops_ends_the_run_at_its_budget(tmp_path):
    summary = train(small(tmp_path, max_flops=2e8, name="flops"))
    steps = summary["steps"]
    assert summary["train_flops"] >= 2e8
    records = [json.loads(line) for line in (tmp_path / "flops" / "metrics.jsonl").read_text().splitlines()]
    before_last = [r for r in records if r["step"] == steps - 1]
    assert not before_last or before_last[0]["train_flops"] < 2e8
    # the run evaluated by dropping tokens to a budget, from the command line
    assert main(["eval", "--checkpoint", str(tmp_path / "flops"), "--budgets", "5", "--by", "drop", "--workers", "0",
                 "--out", str(tmp_path / "dropped")]) == 0  # fmt: skip
    dropped = json.loads((tmp_path / "dropped" / "eval.json").read_text())
    assert dropped["5"]["tokens_per_example"] == 5 and dropped["native"]["tokens_per_example"] > 5


def test_max_flops_refuses_what_it_cannot_schedule(tmp_path):
    with pytest.raises(ValueError, match="give max_steps or max_flops"):
        small(tmp_path, max_flops=1e9, max_steps=3)
    with pytest.raises(ValueError, match="drop_schedule='linear' follows the examples"):
        small(tmp_path, max_flops=1e9, drop="constant", drop_schedule="linear")


def test_square_tokens_sets_the_square_baseline_grid(tmp_path):
    summary = train(small(tmp_path, baseline="square", square_tokens=16, max_steps=1, budgets=[]))
    assert summary["accuracy_vs_tokens"]["native"]["tokens_per_example"] == 16
    with pytest.raises(ValueError, match="square_tokens=20 must be a square number"):
        small(tmp_path, baseline="square", square_tokens=20)
    with pytest.raises(ValueError, match="add --baseline square"):
        small(tmp_path, square_tokens=16)


def test_runs_of_every_seed_hold_out_the_same_images(tmp_path):
    held = [open_data(small(tmp_path, seed=seed))[1] for seed in (0, 1)]
    assert [held[0].describe(i) for i in range(len(held[0]))] == [held[1].describe(i) for i in range(len(held[1]))]
    other = open_data(small(tmp_path, split_seed=1))[1]
    assert [other.describe(i) for i in range(len(other))] != [held[0].describe(i) for i in range(len(held[0]))]


def test_res_mean_moves_the_centre_of_the_sampled_sides():
    rng = np.random.default_rng(0)
    sides = {m: [ResolutionSampler("side", 64, 256, "truncnorm", m).sample_size(100, 100, rng)[0] for _ in range(400)]
             for m in (0.0, 0.5, 1.0)}  # fmt: skip
    low, mid, high = (float(np.mean(sides[m])) for m in (0.0, 0.5, 1.0))
    assert low < 140 and 145 < mid < 175 and high > 180
    with pytest.raises(ValueError, match="res_mean must be in"):
        ResolutionSampler("side", 64, 256, "truncnorm", 1.5)
    assert TrainConfig.from_dict({"res_mode": "side", "res_mean": 0.75}).data.resolution_sampler().res_mean == 0.75


def test_increasing_schedule_starts_without_dropping():
    cfg = TrainConfig.from_dict({"drop": "constant", "drop_rate": 0.5, "drop_schedule": "linear",
                                 "drop_schedule_start": 0.0, "drop_schedule_end": 1.0})  # fmt: skip
    schedule = cfg.data.drop_rate_schedule()
    assert schedule(0.0) == 0.0 and schedule(0.5) == 0.5 and schedule(1.0) == 1.0


def test_keep_drops_tokens_at_inference_the_same_way_every_time():
    processor = Processor(patch_size=16, max_tokens=64)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    full = eval_chain(processor)({"image": image, "__name__": "a"})["example"]
    kept = eval_chain(processor, keep=10)({"image": image, "__name__": "a"})["example"]
    again = eval_chain(processor, keep=10)({"image": image, "__name__": "a"})["example"]
    other = eval_chain(processor, keep=10)({"image": image, "__name__": "b"})["example"]
    assert kept.num_tokens == 10 and kept.grid == full.grid
    assert torch.equal(kept.coords, again.coords) and not torch.equal(kept.coords, other.coords)
    index = kept.coords[:, 0] * full.grid[1] + kept.coords[:, 1]
    assert torch.equal(kept.patches, full.patches[index])  # a subset of the native tokens, unchanged
    with pytest.raises(ValueError, match="not both"):
        eval_chain(processor, keep=10, budget=16)


# --------------------------------------------------------------------------------------------
# The harder built-in set.


def test_synthetic_hard_labels_the_kind_of_the_largest_shape():
    source = open_source("synthetic-hard:60")
    assert isinstance(source, SyntheticLargest) and source.class_names == list(KINDS)
    labels = [source.label(i) for i in range(60)]
    assert np.bincount(labels).tolist() == [10] * 6
    aspects, distractors = {c: [] for c in range(6)}, []
    for i in range(60):
        item = source.item(i)
        first, *rest = item["shapes"]
        assert first["kind"] == KINDS[item["label"]] and len(rest) <= 4
        distractors.append(len(rest))
        assert all(s["radius"] <= 0.7 * first["radius"] and s["kind"] != first["kind"] for s in rest)
        x, y = first["center"]
        pixel = np.asarray(item["image"].convert("RGB"))[int(y), int(x)]
        assert pixel.max() < 110  # the largest shape is drawn (dark) at its centre
        aspects[item["label"]].append(math.log(item["image"].width / item["image"].height))
    assert np.mean(np.asarray(distractors) >= 2) > 0.8
    assert np.array_equal(np.asarray(source.item(7)["image"]), np.asarray(source.item(7)["image"]))
    means = [np.mean(a) for a in aspects.values()]
    assert max(means) - min(means) < 1.5  # aspect ratio does not give the label away


def test_attention_share_removes_only_the_attention_core():
    """The step it subtracts keeps the real backend's plans and token order (the bucketed slot
    order, where the linear layers skip padding): only softmax(QK^T)V is gone."""
    import torch

    from navit.attention.bucketed import BucketedBackend
    from navit.experiments.attention_share import SkipAttention
    from navit.model import prepare_attention

    skip = SkipAttention(BucketedBackend())
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 1, 1, 1, 1]])
    state, order = prepare_attention(skip, segment_ids)
    assert order is not None and order.enter(torch.zeros(2, 6, 1)).shape[0] == 11  # real tokens only
    v = torch.randn(11, 2, 4)
    assert skip.attend_slots(v, v, v, state) is v and skip.attend(v, v, v, state) is v
