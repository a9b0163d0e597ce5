"""End to end through the real CLI: data synth -> train -> resume -> eval -> predict."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN

from navit.checkpoint import load_train_state, resolve_checkpoint, save_checkpoint
from navit.cli import main
from navit.inference import load_model


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    assert main(["data", "synth", "--out", str(out), "--num-images", "48"]) == 0
    return out


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def train(image_folder, out, name, *extra):
    args = ["train", "--data", str(image_folder), "--out", str(out), "--name", name,
            "--workers", "0", "--epochs", "3", *TINY_TRAIN, *extra]  # fmt: skip
    assert main(args) == 0
    return Path(out) / name


def test_train_resume_eval_predict(image_folder, tmp_path, capsys):
    run = train(image_folder, tmp_path, "full", "--max-steps", "8", "--save-every", "4")
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "eval.json", "summary.json", "accuracy_vs_tokens.png"):
        assert (run / name).exists(), name
    full = losses(run)
    assert sorted(full) == list(range(1, 9))

    # Resume from the step-4 checkpoint in a copy of the run: steps 5..8 must repeat exactly.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": l}) + "\n" for s, l in full.items() if s <= 4)
    )
    assert main(["train", "--resume", str(copy / "checkpoints" / "step_00000004"), "--data", str(image_folder),
                 "--out", str(tmp_path), "--workers", "0", "--epochs", "3", "--max-steps", "8", *TINY_TRAIN]) == 0  # fmt: skip
    assert losses(copy) == full

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--budgets", "4", "9", "--workers", "0"]) == 0
    table = capsys.readouterr().out
    assert "| native |" in table and "| 9 |" in table
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"native", "4", "9"}
    assert results["4"]["tokens_per_image"] <= 4

    images = sorted(image_folder.glob("*/*.png"))[:3]
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    code = main(["predict", "--checkpoint", str(run), "--topk", "2", str(images[0]), str(bad), str(images[1])])
    captured = capsys.readouterr()
    assert code == 1  # one file failed, the others were still predicted
    assert "not_an_image.png: ERROR" in captured.err
    predicted = [line for line in captured.out.splitlines() if "tokens)" in line]
    assert len(predicted) == 2 and str(images[1]) in predicted[1]


def test_square_baseline_squashes_every_image(image_folder, tmp_path):
    run = train(image_folder, tmp_path, "square", "--baseline", "square", "--max-steps", "2")
    model, meta = load_model(run)
    assert meta["square_tokens"] in (4, 9, 16)
    results = json.loads((run / "eval.json").read_text())
    assert results["native"]["tokens_per_image"] == meta["square_tokens"]


def test_fine_tune_from_checkpoint_with_new_classes(image_folder, tmp_path):
    base = train(image_folder, tmp_path, "base", "--max-steps", "2")
    tuned = train(image_folder, tmp_path, "tuned", "--max-steps", "2", "--init-from", str(base),
                  "--res-mode", "side", "--res-min", "32", "--res-max", "64")  # fmt: skip
    a, _ = load_model(base)
    b, _ = load_model(tuned)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)


def test_yaml_config_and_flag_precedence(image_folder, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("max_steps: 1\nlr: 0.0005\nseed: 3\n")
    run = train(image_folder, tmp_path, "yaml", "--config", str(config), "--seed", "4")
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 0.0005 and saved["seed"] == 4 and saved["max_steps"] == 1


def test_bad_options_fail_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit, match="loss"):
        main(["train", "--loss", "hinge", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="max_tokens"):
        main(["train", "--max-tokens", "512", "--seq-len", "256", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_checkpoint_write_is_atomic(tmp_path):
    save_checkpoint(tmp_path, "step_1", torch.nn.Linear(2, 2).state_dict(), {"step": 1}, {"x": torch.ones(1)})
    # A crash mid-save leaves a partial folder behind; 'latest' still names the complete one.
    (tmp_path / ".step_2.partial").mkdir()
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_1"
    assert torch.equal(load_train_state(tmp_path / "step_1")["x"], torch.ones(1))


def test_cli_entry_point_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "navit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("train", "eval", "predict", "data"):
        assert command in result.stdout


def test_contrastive_task_trains_evaluates_zero_shot_and_predicts(tmp_path, capsys):
    run = Path(tmp_path) / "clip"
    assert main(["train", "--task", "contrastive", "--data", "synthetic:48", "--out", str(tmp_path), "--name", "clip",
                 "--workers", "0", "--max-steps", "3", "--text-depth", "1", *TINY_TRAIN]) == 0  # fmt: skip
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"native", "4", "16"} and results["native"]["images"] > 0
    model, meta = load_model(run)
    assert meta["task"] == "contrastive" and len(meta["class_names"]) == 6
    from navit.data.synthetic import SyntheticShapes

    image = tmp_path / "shape.png"
    SyntheticShapes(num_images=1).load(0).save(image)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), str(image), "--topk", "6"]) == 0
    line = capsys.readouterr().out.strip()
    probabilities = [float(p.rstrip("%")) for p in re.findall(r"[\d.]+%", line)]
    assert len(probabilities) == 6 and abs(sum(probabilities) - 100) < 0.5


def test_contrastive_task_needs_captions(tmp_path, image_folder):
    with pytest.raises(SystemExit, match="needs captions"):
        main(["train", "--task", "contrastive", "--data", str(image_folder), "--out", str(tmp_path), *TINY_TRAIN])
