"""Dirty data, crashes mid-run, untrusted files and impossible configurations."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TRAIN
from PIL import Image

from navit.checkpoint import load_meta, load_train_state, load_weights, resolve_checkpoint
from navit.cli import main
from navit.data.loader import PackedLoader
from navit.data.folder import ImageFolder
from navit.ops import train_chain
from navit.packing import PackingConfig
from navit.processor import Processor
from navit.train_config import TrainConfig


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "shapes"
    main(["data", "synth", "--out", str(out), "--num-images", "36"])
    return out


# ------------------------------------------------------------------------------------------
# Bad and unusual inputs


def write_odd_files(folder: Path) -> dict[str, int]:
    """A class folder mixing good, odd-but-valid and broken files; returns expected counts."""
    cls = folder / "odd"
    cls.mkdir(parents=True)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(cls / "one_pixel.png")
    Image.new("L", (3, 300)).save(cls / "tall_1_to_100.png")
    Image.new("RGB", (500, 5)).save(cls / "wide_100_to_1.png")
    Image.new("I;16", (40, 30)).save(cls / "sixteen_bit.png")
    Image.new("CMYK", (30, 40)).save(cls / "cmyk.jpg")
    Image.new("P", (20, 20)).save(cls / "palette.gif")
    (cls / "zero_bytes.jpg").write_bytes(b"")
    (cls / "not_an_image.png").write_text("just text")
    good = Image.new("RGB", (64, 64))
    good.save(cls / "truncated.jpg")
    data = (cls / "truncated.jpg").read_bytes()
    (cls / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "other").mkdir()
    Image.new("RGB", (40, 60)).save(folder / "other" / "fine.png")
    (folder / "other" / "folder_named.png").mkdir()  # a directory that looks like an image
    return {"good": 7, "bad": 3}


def test_odd_images_are_packed_and_broken_ones_counted(tmp_path):
    expected = write_odd_files(tmp_path / "data")
    source = ImageFolder(tmp_path / "data")
    make = lambda **options: PackedLoader(source, train_chain(Processor(patch_size=16, max_tokens=64)),  # noqa: E731
                                          packing=PackingConfig(seq_len=64, num_seqs=2, buffer_size=4), num_workers=0,
                                          **options)  # fmt: skip
    loader = make()
    with pytest.warns(UserWarning, match="skipping"):
        seen = [key for item in loader for key in item.keys]
    assert len(seen) == expected["good"], "every decodable image is packed, however odd"
    assert sum(loader.skipped.values()) == expected["bad"]
    names = {Path(key).name for key in seen}
    assert {"one_pixel.png", "tall_1_to_100.png", "wide_100_to_1.png"} <= names
    with pytest.raises(ValueError, match="fail_fast"):
        list(make(fail_fast=True))


def test_extreme_aspect_ratios_keep_their_shape():
    processor = Processor(patch_size=16, max_tokens=64)
    assert processor.to_example(Image.new("RGB", (1, 1))).grid == (1, 1)
    rows, cols = processor.to_example(Image.new("RGB", (1600, 16))).grid
    assert rows == 1 and cols == 64  # 100:1 fits the budget as one row of patches
    rows, cols = processor.to_example(Image.new("RGB", (16, 1600))).grid
    assert cols == 1 and rows == 64


# ------------------------------------------------------------------------------------------
# Crashes and resumption


def losses(run: Path) -> dict[int, float]:
    """Loss per step; for steps logged twice (before a crash and after resuming) the last wins."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_sigkill_then_resume_gives_the_same_losses(image_folder, tmp_path):
    args = [sys.executable, "-m", "navit", "train", "--data", str(image_folder), "--out", str(tmp_path),
            *TINY_TRAIN, "--max-steps", "14", "--save-every", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "--name", "clean"], check=True, capture_output=True, env=env, timeout=300)
    reference = losses(tmp_path / "clean")

    victim = subprocess.Popen([*args, "--name", "killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_00000004"):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    checkpoint = resolve_checkpoint(tmp_path / "killed")
    assert int(load_meta(checkpoint)["step"]) < 14, "the run was killed before it finished"

    subprocess.run([*args[:3], "train", "--resume", str(tmp_path / "killed"), "--data", str(image_folder),
                    "--out", str(tmp_path), *TINY_TRAIN, "--max-steps", "14"], check=True, capture_output=True,
                   env=env, timeout=300)  # fmt: skip
    assert losses(tmp_path / "killed") == reference


def test_nan_loss_stops_with_the_step_or_skips(image_folder, tmp_path, capsys):
    # A learning rate of 1e30 blows the weights up within a step or two.
    common = ["train", "--data", str(image_folder), "--out", str(tmp_path), *TINY_TRAIN, "--max-steps", "6",
              "--lr", "1e30", "--grad-clip", "1e30", "--warmup-steps", "1"]  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+"):
        main([*common, "--name", "stop"])
    assert main([*common, "--name", "skip", "--nan-policy", "skip"]) == 0
    assert "step skipped" in capsys.readouterr().out


def test_damaged_checkpoint_names_the_file(image_folder, tmp_path):
    main(["train", "--data", str(image_folder), "--out", str(tmp_path), "--name", "run", *TINY_TRAIN, "--max-steps", "1"])
    checkpoint = resolve_checkpoint(tmp_path / "run")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_weights(checkpoint)
    (checkpoint / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json"):
        load_meta(checkpoint)


def test_rank_death_ends_torchrun_in_bounded_time(image_folder, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*torchrun, "-m", "navit", "train", "--data", str(image_folder), "--out", str(tmp_path),
           "--name", "doomed", *TINY_TRAIN, "--max-steps", "100000"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = tmp_path / "doomed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.1)
    assert metrics.exists(), "training never started"
    children = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    os.kill(int(children[1]), signal.SIGKILL)
    start = time.time()
    code = agent.wait(timeout=120)
    assert code != 0 and time.time() - start < 120


# ------------------------------------------------------------------------------------------
# Untrusted files


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    with open(checkpoint / "train_state.pt", "wb") as f:
        pickle.dump({"optimizer": Exploit()}, f)
    with pytest.raises(ValueError, match="train_state.pt"):
        load_train_state(checkpoint)
    assert not marker.exists(), "the pickle's code ran"


def test_yaml_config_cannot_construct_objects(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"lr: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SystemExit, match="cannot read config"):
        main(["train", "--config", str(config), "--out", str(tmp_path / "runs")])
    assert not marker.exists()
    assert yaml.safe_load("lr: 0.1") == {"lr": 0.1}


# ------------------------------------------------------------------------------------------
# Impossible configurations fail before any work


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(model="navit_xxl16"), "unknown model"),
        (dict(model_args={"attn_backend": "magic"}), "attn_backend"),
        (dict(res_mode="side", res_min=300, res_max=100), "res_min <= res_max"),
        (dict(res_mode="side", res_min=8, res_max=64), "smaller than the patch size"),
        (dict(max_tokens=512, seq_len=256), "exceeds seq_len"),
        (dict(max_examples_per_seq=0), "max_examples_per_seq"),
        (dict(drop="beta", drop_rate=0.9, drop_max=0.5), "mean"),
        (dict(task="contrastive", label_smoothing=0.2), "label_smoothing is an option of task classify, not of 'contrastive'"),
        (dict(loss="hinge"), "loss='hinge'"),
        (dict(seqs_per_batch=4), "'seqs_per_batch' is now called 'num_seqs'"),
        (dict(lr_rate=0.1), "unknown option 'lr_rate'"),
        (dict(budgets=[0]), "must be >= 1"),
        (dict(data={"train": "synthetic", "colour": 1}), "unknown option 'colour'"),
    ],
)
def test_impossible_configs_fail_early(overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrainConfig.from_dict(overrides)


def test_empty_class_folder_and_empty_dataset_fail_before_training(tmp_path):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "data" / "cats" / "a.png")
    (tmp_path / "data" / "dogs").mkdir()
    with pytest.raises(SystemExit, match="dogs"):
        main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), *TINY_TRAIN])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_skipped_and_counted(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "data" / "a" / "ok.png")
    locked = tmp_path / "data" / "a" / "locked.png"
    Image.new("RGB", (32, 32)).save(locked)
    locked.chmod(0)
    loader = PackedLoader(ImageFolder(tmp_path / "data"), train_chain(Processor(patch_size=16, max_tokens=4)),
                          packing=PackingConfig(seq_len=8, num_seqs=1, buffer_size=2), num_workers=0)  # fmt: skip
    with pytest.warns(UserWarning, match="locked.png"):
        assert sum(item.targets["label"].numel() for item in loader) == 1
    assert sum(loader.skipped.values()) == 1


def test_a_resume_drops_metrics_lines_a_crash_cut_short(tmp_path):
    from navit.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": 1.0 / step, "grad_norm": None})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # killed while writing
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("2")  # a row cut after its step: not a second record of step 2
    resumed = MetricsLogger(tmp_path, resume_step=2)
    resumed.log({"step": 3, "loss": 0.3, "grad_norm": None})
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 0.3
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows == ["step,loss,grad_norm", "1,1.0,", "2,0.5,", "3,0.3,"]
