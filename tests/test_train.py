"""End to end through the real CLI: data synth -> train -> resume -> eval -> predict."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_TRAIN

from navit.checkpoint import load_train_state, resolve_checkpoint, save_checkpoint
from navit.cli import build_parser, main, training_config
from navit.inference import load_checkpoint, predict_files
from navit.train_data import open_data
from navit.config import NaViTConfig
from navit.train_config import TrainConfig


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    assert main(["data", "synth", "--out", str(out), "--num-images", "48"]) == 0
    return out


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"repeated steps in metrics: {steps}"
    return {r["step"]: r["loss"] for r in records}


def train(image_folder, out, name, *extra):
    args = ["train", "--data", str(image_folder), "--out", str(out), "--name", name,
            "--workers", "0", "--epochs", "3", *TINY_TRAIN, *extra]  # fmt: skip
    assert main(args) == 0
    return Path(out) / name


def test_train_resume_eval_predict(image_folder, tmp_path, capsys):
    run = train(image_folder, tmp_path, "full", "--max-steps", "8", "--save-every", "4", "--lr", "0.003", "--log-every", "3")
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "eval.json", "summary.json", "accuracy_vs_tokens.png"):
        assert (run / name).exists(), name
    full = losses(run)
    assert sorted(full) == [3, 6]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["examples_seen"] > 8 and summary["train_flops"] > 0
    assert summary["tokens_seen"] >= summary["examples_seen"]

    # Resume from the step-4 checkpoint of a copy that also logged steps 5..8 before "crashing":
    # the run's own config is used (lr 0.003 is not repeated), no step is logged twice, and
    # steps 5..8 repeat exactly, the record of step 6 (over steps 4 to 6) included.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["train", "--resume", str(copy / "checkpoints" / "step_00000004")]) == 0
    assert losses(copy) == full
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.003 and saved["data"]["train"] == str(image_folder)
    assert saved["run"]["resume"] is None, "config.yaml is a template for new runs, not a resume"
    # A resume whose options change the model stops in one line and leaves the run as it was.
    for change in ("depth=2", "embed_dim=16"):  # a missing block, other shapes
        with pytest.raises(SystemExit, match="cannot resume .*: the weights do not fit the model"):
            main(["train", "--resume", str(copy), "--model-args", change])
    assert yaml.safe_load((copy / "config.yaml").read_text()) == saved

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--budgets", "4", "9", "--workers", "0"]) == 0
    table = capsys.readouterr().out
    assert "| native |" in table and "| 9 |" in table
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"native", "4", "9"}
    assert results["4"]["tokens_per_example"] <= 4
    # A checkpoints folder has no config.yaml beside it: the checkpoint's own config still finds
    # the run's validation split (not the default data).
    assert main(["eval", "--checkpoint", str(run / "checkpoints"), "--budgets", "--workers", "0",
                 "--out", str(tmp_path / "again")]) == 0  # fmt: skip
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert set(again) == {"native"} and again["native"] == results["native"]

    images = sorted(image_folder.glob("*/*.png"))[:3]
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    capsys.readouterr()
    code = main(["predict", "--checkpoint", str(run), "--topk", "2", str(images[0]), str(bad), str(images[1])])
    captured = capsys.readouterr()
    assert code == 1  # one file failed, the others were still predicted
    assert "not_an_image.png: ERROR" in captured.err
    predicted = [line for line in captured.out.splitlines() if "tokens)" in line]
    assert len(predicted) == 2 and str(images[1]) in predicted[1]


def test_predict_takes_folders_and_globs_in_batches_and_prints_json(image_folder, tmp_path, capsys):
    run = train(image_folder, tmp_path, "p", "--max-steps", "1")
    folder = image_folder / "tall_ellipse"
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), "--json", "--batch-size", "3", "--topk", "2",
                 str(folder), str(image_folder / "wide_*" / "*.png")]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = sorted(folder.glob("*.png")) + sorted(image_folder.glob("wide_*/*.png"))
    assert [row["path"] for row in rows] == [str(p) for p in expected]
    for row in rows:
        assert set(row) == {"path", "labels", "tokens", "error"} and row["error"] is None
        assert len(row["labels"]) == 2 and row["labels"][0]["score"] >= row["labels"][1]["score"]
        assert set(row["labels"][0]) == {"label", "score"} and 1 <= row["tokens"] <= 16
    # The same files in one batch of their own give the same outputs (batching changes nothing).
    model, task, _ = load_checkpoint(run)
    alone = list(predict_files(model, task, [rows[4]["path"]], topk=2))
    assert alone[0]["labels"] == rows[4]["labels"]
    assert main(["predict", "--checkpoint", str(run), "--json", str(tmp_path / "nothing_*.png")]) == 1
    assert "nothing_*.png" in json.loads(capsys.readouterr().out)["error"]


def test_square_baseline_squashes_every_image(image_folder, tmp_path):
    run = train(image_folder, tmp_path, "square", "--baseline", "square", "--max-steps", "2")
    model, _, meta = load_checkpoint(run)
    processor = meta["processor"]
    assert processor["grid_rule"] == "square" and processor["max_tokens"] in (4, 9, 16)
    assert model.processor.to_dict() == processor
    results = json.loads((run / "eval.json").read_text())
    assert results["native"]["tokens_per_example"] == processor["max_tokens"]


def test_fine_tune_from_checkpoint_with_new_classes(image_folder, tmp_path):
    base = train(image_folder, tmp_path, "base", "--max-steps", "2")
    tuned = train(image_folder, tmp_path, "tuned", "--max-steps", "2", "--init-from", str(base),
                  "--res-mode", "side", "--res-min", "32", "--res-max", "64")  # fmt: skip
    a, _, _ = load_checkpoint(base)
    b, _, _ = load_checkpoint(tuned)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    # The fine-tuned run resumes from its own checkpoint, even once its starting point is gone.
    shutil.rmtree(base)
    assert main(["train", "--resume", str(tuned), "--max-steps", "3"]) == 0
    assert json.loads((tuned / "summary.json").read_text())["steps"] == 3


def test_yaml_config_nested_or_flat_and_flag_precedence(image_folder, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("optim: {max_steps: 1, lr: 0.0005}\nseed: 3\nmodel_args: {mlp_ratio: 2.0}\n")
    run = train(image_folder, tmp_path, "yaml", "--config", str(config), "--seed", "4")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.0005 and saved["run"]["seed"] == 4 and saved["optim"]["max_steps"] == 1
    # --model-args on the command line merges into the file's model args.
    assert saved["model"]["args"] == {"mlp_ratio": 2.0, "embed_dim": 32, "depth": 1, "num_heads": 2, "pos_max_len": 32}
    assert TrainConfig.from_dict(saved).to_dict() == saved


def test_presets_are_honoured_and_the_quick_start_model_is_its_own_preset():
    default = TrainConfig().model_config()
    assert (default.embed_dim, default.depth, default.num_heads, default.pos_mode) == (128, 4, 4, "absolute")
    base = TrainConfig.from_dict({"model": "navit_b16"}).model_config()
    assert (base.embed_dim, base.depth, base.num_heads) == (768, 12, 12)
    shallow = TrainConfig.from_dict({"model": "navit_b16", "model_args": {"depth": 2}}).model_config()
    assert (shallow.embed_dim, shallow.depth) == (768, 2)


def test_an_epoch_is_one_pass_over_the_examples_even_with_token_dropping(image_folder, tmp_path):
    common = ["--epochs", "2", "--budgets", "--max-tokens", "16", "--seq-len", "32"]
    plain = json.loads((train(image_folder, tmp_path, "plain", *common) / "summary.json").read_text())
    dropped = json.loads((train(image_folder, tmp_path, "drop", *common, "--drop", "constant", "--drop-rate", "0.5")
                          / "summary.json").read_text())  # fmt: skip
    train_images = len(open_data(TrainConfig().with_options({"data": str(image_folder)}))[0])
    assert 30 <= train_images <= 46, "about 80% of the 48 images train"
    for summary in (plain, dropped):
        # Training stops once two passes are done: less than one batch (2 x 32 tokens) beyond.
        assert 2 * train_images <= summary["examples_seen"] < 2 * train_images + 64
        assert summary["epochs"] == pytest.approx(summary["examples_seen"] / train_images, abs=1e-3)
    # Half the tokens per example: more examples per step, so fewer steps and tokens for two passes.
    assert dropped["steps"] < 0.8 * plain["steps"]
    assert dropped["tokens_seen"] < 0.7 * plain["tokens_seen"]
    assert dropped["train_flops"] < 0.8 * plain["train_flops"]


def test_eval_matches_classes_by_name_and_refuses_unknown_ones(image_folder, tmp_path, capsys):
    run = train(image_folder, tmp_path, "classes", "--max-steps", "3")
    subset = tmp_path / "subset"
    for folder in sorted(image_folder.iterdir())[1:]:  # without the first class, "round_ellipse"
        shutil.copytree(folder, subset / folder.name)
    assert main(["eval", "--checkpoint", str(run), "--data", str(subset), "--budgets", "--workers", "0",
                 "--out", str(tmp_path / "subset_eval")]) == 0  # fmt: skip
    accuracy = json.loads((tmp_path / "subset_eval" / "eval.json").read_text())["native"]["accuracy"]
    # The expected accuracy, file by file, from predictions and folder names.
    model, task, _ = load_checkpoint(run)
    files = sorted(str(p) for p in subset.glob("*/*.png"))
    hits = [r["labels"][0]["label"] == Path(r["path"]).parent.name for r in predict_files(model, task, files, topk=1)]
    assert accuracy == pytest.approx(sum(hits) / len(hits))

    # Training with that folder as --val-data matches its classes the same way.
    val_run = train(image_folder, tmp_path, "val", "--max-steps", "2", "--val-data", str(subset), "--budgets")
    model, task, _ = load_checkpoint(val_run)
    hits = [r["labels"][0]["label"] == Path(r["path"]).parent.name for r in predict_files(model, task, files, topk=1)]
    assert json.loads((val_run / "eval.json").read_text())["native"]["accuracy"] == pytest.approx(sum(hits) / len(hits))

    (subset / "zebra").mkdir()
    shutil.copy(files[0], subset / "zebra" / "z.png")
    with pytest.raises(SystemExit, match=r"has classes \['zebra'\] that the model does not know"):
        main(["eval", "--checkpoint", str(run), "--data", str(subset), "--workers", "0"])


def test_eval_and_predict_report_checkpoint_problems_in_one_line(image_folder, tmp_path):
    for command in (["eval"], ["predict", str(image_folder)]):
        with pytest.raises(SystemExit, match=r"^navit \w+: checkpoint path .*missing does not exist$"):
            main([command[0], "--checkpoint", str(tmp_path / "missing"), *command[1:]])
    run = train(image_folder, tmp_path, "damaged", "--max-steps", "1")
    weights = resolve_checkpoint(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SystemExit, match=r"^navit predict: checkpoint weights .*model.safetensors are damaged"):
        main(["predict", "--checkpoint", str(run), str(image_folder)])


def test_bad_options_fail_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--loss", "hinge", "--out", str(tmp_path)])
    assert "argument --loss: invalid choice: 'hinge'" in capsys.readouterr().err
    for command in (["eval", "--checkpoint", "x", "--frames", "0"], ["predict", "--checkpoint", "x", "--batch-size", "0", "y"]):
        with pytest.raises(SystemExit):
            main(command)
        assert "expected an integer >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="max_tokens"):
        main(["train", "--max-tokens", "512", "--seq-len", "256", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="text_depth is an option of task contrastive"):
        main(["train", "--text-depth", "3", "--out", str(tmp_path)])
    for flags, message in ((["--lr", "0"], "lr must be > 0"), (["--device", "gpu"], "device 'gpu' is not one of")):
        with pytest.raises(SystemExit, match=message):
            main(["train", *flags, "--out", str(tmp_path)])
    # YAML 1.1 reads 1e-3 as text: a number field takes it as the number; a text field keeps it.
    flags = build_parser().parse_args(["train", "--model-args", "drop_path=1e-3", "--label-smoothing", "1e-1",
                                       "--name", "1e3"])  # fmt: skip
    cfg = training_config(flags)
    assert (cfg.model_config().drop_path, cfg.task.options.label_smoothing, cfg.run.name) == (1e-3, 0.1, "1e3")
    with pytest.raises(ValueError, match=r"text_max_len='inf' must be an integer"):
        TrainConfig().with_options({"task": "contrastive", "text_max_len": "inf"})
    assert TrainConfig().with_options({"budgets": ["1e2", 36]}).eval.budgets == [100, 36]
    with pytest.raises(ValueError, match=r"budgets\[1\]='many' must be an integer"):
        TrainConfig().with_options({"budgets": [16, "many"]})
    assert NaViTConfig(depth=np.int64(2), mlp_ratio=np.float32(2.0)).depth == 2  # numpy numbers are numbers
    config = tmp_path.parent / "numbers.yaml"
    config.write_text("lr: 1e-3\nmax_steps: 2.0\n")  # YAML 1.1 reads 1e-3 as a string
    assert cli_config(config).optim.lr == 1e-3 and cli_config(config).optim.max_steps == 2
    config.write_text("warmup_steps: 2.5\n")
    with pytest.raises(SystemExit, match=r"warmup_steps=2.5 must be an integer"):
        main(["train", "--config", str(config), "--out", str(tmp_path)])
    config.write_text("optim: {lr: fast}\n")
    with pytest.raises(SystemExit, match=r"lr='fast' must be a finite number"):
        main(["train", "--config", str(config), "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def cli_config(path) -> TrainConfig:
    return training_config(build_parser().parse_args(["train", "--config", str(path)]))


def test_every_train_option_has_help_and_its_choices():
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    flags = [a for a in train._actions if a.option_strings and a.dest not in ("help",)]
    assert len(flags) > 40
    for action in flags:
        assert action.help and len(action.help) > 10, action.option_strings
        if action.dest != "config":
            assert "default" in action.help, action.option_strings
    choice = {a.dest: a.choices for a in flags if a.choices}
    assert choice["task"] == ("classify", "contrastive", "segment", "detect") and choice["res_mode"] == ("native", "side", "area")
    assert "navit_b16" in next(a.help for a in flags if a.dest == "model")


def test_checkpoint_write_is_atomic(tmp_path):
    save_checkpoint(tmp_path, "step_1", torch.nn.Linear(2, 2).state_dict(), {"step": 1}, {"x": torch.ones(1)})
    # A crash mid-save leaves a partial folder behind; 'latest' still names the complete one.
    (tmp_path / ".step_2.partial").mkdir()
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_1"
    assert resolve_checkpoint(tmp_path / "step_1" / "model.safetensors") == tmp_path / "step_1"
    assert torch.equal(load_train_state(tmp_path / "step_1")["x"], torch.ones(1))


def test_cli_entry_point_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "navit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("train", "eval", "predict", "data"):
        assert command in result.stdout


def test_contrastive_task_trains_evaluates_zero_shot_and_predicts(tmp_path, capsys, image_folder):
    run = Path(tmp_path) / "clip"
    assert main(["train", "--task", "contrastive", "--data", "synthetic:48", "--out", str(tmp_path), "--name", "clip",
                 "--workers", "0", "--max-steps", "3", "--text-depth", "1", *TINY_TRAIN]) == 0  # fmt: skip
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"native", "4", "16"} and results["native"]["examples"] > 0
    assert json.loads((run / "summary.json").read_text())["truncated_captions"] == 0
    # Zero-shot evaluation needs labels, not captions: a plain class folder will do.
    assert main(["eval", "--checkpoint", str(run), "--data", str(image_folder), "--budgets", "--workers", "0",
                 "--out", str(tmp_path / "folder-eval")]) == 0  # fmt: skip
    model, task, meta = load_checkpoint(run)
    assert meta["task"] == "contrastive" and len(meta["class_names"]) == 6 and meta["task_options"]["text_depth"] == 1
    # Evaluated as zero-shot classification of the validation split, example by example:
    val = open_data(TrainConfig.from_dict(meta["config"]))[1]
    zero_shot = task.inference_model(model)
    with torch.no_grad():
        hits = [int(zero_shot(model.processor([val.load(i)])).argmax()) == val.label(i) for i in range(len(val))]
    assert results["native"]["accuracy"] == pytest.approx(sum(hits) / len(hits))
    from navit.synthetic.shapes import SyntheticShapes

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


def test_init_from_takes_every_matching_weight_including_an_image_tower(tmp_path, capsys):
    from conftest import tiny_config

    from navit import create_model, save_model
    from navit.start import initialise_from, start_from
    from navit.two_tower import create_image_text_model

    two_tower = create_image_text_model(tiny_config(num_classes=0), text_depth=1)
    save_model(two_tower, tmp_path / "clip", class_names=["a", "b"])
    classifier = create_model(tiny_config(num_classes=3))
    initialise_from(classifier, start_from(str(tmp_path / "clip")))
    for name, value in classifier.state_dict().items():
        if name.startswith("head."):  # the new task's head keeps its fresh weights
            continue
        assert torch.equal(value, two_tower.image.state_dict()[name]), name
    assert "re-initialised ['head.bias', 'head.weight']" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no weight of .* fits the model"):
        initialise_from(create_model(tiny_config(embed_dim=16, num_classes=3)), start_from(str(tmp_path / "clip")))


def test_predict_inputs_expand_like_the_training_loader_and_name_outputs_apart(tmp_path):
    from navit.inference import expand_inputs, output_names

    (tmp_path / "in" / ".cache").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for path in ("in/a.PNG", "in/.cache/thumb.png", "in/._a.png", "in/notes.txt", "elsewhere/linked.jpg",
                 "in/a[1].png", "in/a1.png"):  # fmt: skip
        (tmp_path / path).write_bytes(b"")
    (tmp_path / "in" / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "in" / "sub.png").mkdir()  # a folder named like an image
    root = str(tmp_path / "in")
    assert expand_inputs([root]) == [f"{root}/a.PNG", f"{root}/a1.png", f"{root}/a[1].png", f"{root}/link/linked.jpg"]
    assert expand_inputs([f"{root}/*"]) == [f"{root}/a.PNG", f"{root}/a1.png", f"{root}/a[1].png"]
    assert expand_inputs([f"{root}/a[1].png"]) == [f"{root}/a[1].png"], "an existing path is not a glob"
    assert expand_inputs([f"{root}/none-*.png"]) == [f"{root}/none-*.png"], "kept, so its error shows in place"
    assert output_names(["a/x.png", "b/x.png", "c/x-2.png", "d/x.jpg"]) == ["x", "x-2", "x-2-2", "x-3"]
