"""The processor: one description of the preprocessing, saved with the model, used everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config, tiny_model

import navit
from navit.data.folder import ImageFolder
from navit.data.loader import PackedLoader
from navit.ops import eval_chain
from navit.packing import PackingConfig
from navit.inference import load_checkpoint
from navit.patchify import patchify
from navit.processor import Processor

# Odd sizes on purpose: sides off the patch grid, extreme aspect ratios, one over the budget.
SIZES = [(37, 61), (16, 16), (130, 9), (300, 211), (17, 250)]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Real PNG and JPEG files of odd sizes in a class folder, decoded by Pillow."""
    root = tmp_path_factory.mktemp("processor") / "images"
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return root, paths


def test_processor_gives_exactly_the_eval_pipelines_patches_for_real_files(image_files):
    root, _ = image_files
    processor = Processor(patch_size=8, max_tokens=40)
    source = ImageFolder(root)
    for budget in (None, 12):
        loader = PackedLoader(source, eval_chain(processor, budget=budget), train=False, num_workers=0,
                              packing=PackingConfig(seq_len=64, num_seqs=2, buffer_size=3))  # fmt: skip
        for item in loader:
            paths = [str(root / key) for key in item.keys]
            batch = processor(paths, budget=budget)
            assert batch.num_examples == len(paths)
            for row, (mine, theirs) in enumerate(zip(per_example(batch), per_example(item.batch))):
                assert torch.equal(mine[0], theirs[0]), f"patches of {paths[row]}"
                assert torch.equal(mine[1], theirs[1]) and mine[2] == theirs[2], f"coords / grid of {paths[row]}"


def per_example(batch):
    """(patches, coords, grid) of each example of ``batch`` in input order."""
    out = []
    for slot in batch.example_slots().tolist():
        seq, e = divmod(slot, batch.max_examples_per_seq)
        mask = batch.segment_ids[seq] == e
        out.append((batch.patches[seq][mask], batch.coords[seq][mask], tuple(batch.grid_sizes[seq, e].tolist())))
    return out


def test_paths_pil_images_and_tensors_give_the_same_patches(image_files):
    _, paths = image_files
    processor = Processor(patch_size=8, max_tokens=40)
    for path in paths:
        pil = Image.open(path)
        uint8 = torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1)
        # Float tensors in [0, 1] (as torchvision's ToTensor gives) are rounded to 8-bit values.
        inputs = (str(path), pil, uint8, uint8.float() / 255, (uint8.float() - 0.4) / 255)
        reference, *others = (processor.to_example(x) for x in inputs)
        for other in others:
            assert other.grid == reference.grid and torch.equal(other.patches, reference.patches), path


def test_patches_are_normalised_per_channel_in_row_col_channel_order():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)  # already on the 8-px grid
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    example = Processor(patch_size=8, max_tokens=64, mean=mean, std=std).to_example(Image.fromarray(pixels))
    assert example.grid == (2, 3)
    scaled = (torch.from_numpy(pixels).float() / 255 - torch.tensor(mean)) / torch.tensor(std)
    expected, _ = patchify(scaled.permute(2, 0, 1), (8, 8))
    torch.testing.assert_close(example.patches, expected, rtol=0, atol=1e-5)


def test_grid_rules_and_budgets():
    image = Image.new("RGB", (400, 100))
    native = Processor(patch_size=16, max_tokens=256)
    rows, cols = native.to_example(image, budget=64).grid
    assert 48 <= rows * cols <= 64 and cols / rows == pytest.approx(4, rel=0.35)
    assert native.to_example(image).grid == (6, 25)  # within max_tokens: the native grid
    square = Processor(patch_size=16, max_tokens=49, grid_rule="square")
    assert square.to_example(image).grid == (7, 7)
    assert square.to_example(image, budget=64).grid == (8, 8)
    batch = native([image, Image.new("RGB", (16, 16))], budget=20)
    assert batch.seq_len == 256 and batch.num_examples == 2


def test_a_clip_model_sees_an_image_as_one_tubelet():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    flat = Processor(patch_size=8).to_example(image)
    clip = Processor(patch_size=8, temporal_patch_size=2, num_axes=3).to_example(image)
    assert clip.grid == (1, 2, 3) and clip.coords[:, 0].eq(0).all() and torch.equal(clip.coords[:, 1:], flat.coords)
    # A tubelet is (time, row, col, channel) flattened: the frame, twice.
    assert torch.equal(clip.patches, torch.cat([flat.patches, flat.patches], 1))
    model = navit.create_model("navit_mini16", patch_size=8, num_axes=3, temporal_patch_size=2, num_classes=3)
    assert model.processor.num_axes == 3 and model(model.processor([image])).shape == (1, 3)


def test_round_trips_through_json_and_must_fit_its_model():
    processor = Processor(patch_size=14, max_tokens=100, grid_rule="square", resample="bilinear", mean=(0.4, 0.5, 0.6))
    assert Processor.from_dict(json.loads(json.dumps(processor.to_dict()))) == processor
    model = navit.create_model("navit_mini16", num_classes=2)
    assert model.processor == Processor(patch_size=16)
    with pytest.raises(ValueError, match="does not fit the model: patch_size=14 vs patch_size=16"):
        model.processor = processor
    with pytest.raises(ValueError, match=r"unknown Processor field\(s\) \['size'\]"):
        Processor.from_dict({"size": 3})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grid_rule="fit"), "grid_rule='fit'"),
        (dict(resample="cubic"), "resample='cubic'"),
        (dict(mean=(0.5,)), "one value per channel"),
        (dict(std=(0.5, 0.0, 0.5)), "std must be positive"),
        (dict(num_axes=4), "num_axes must be 2"),
        (dict(temporal_patch_size=2), "needs num_axes=3"),
        (dict(max_tokens=0), "max_tokens must be >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Processor(**kwargs)


def test_bad_inputs_are_named(tmp_path):
    processor = Processor()
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match=r"input 1 has shape \(1, 8, 8\); expected a \[3, H, W\] tensor"):
        processor([torch.rand(3, 8, 8), torch.rand(1, 8, 8)])
    with pytest.raises(TypeError, match="input 0 has dtype torch.int64"):
        processor([torch.zeros(3, 8, 8, dtype=torch.long)])
    with pytest.raises(TypeError, match="input 0 is a list"):
        processor([[1, 2]])
    with pytest.raises(TypeError, match=r"one tensor of shape \(2, 3, 8, 8\): pass \[clip\]"):
        processor(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="mask is 5x5 pixels but the image is 8x8"):
        processor.to_example(Image.new("RGB", (8, 8)), dense={"mask": Image.new("L", (5, 5))})


def test_saved_models_load_with_their_processor_and_class_names(tmp_path):
    model = navit.create_model("navit_mini16", num_classes=3, depth=1).eval()
    model.processor = model.processor.replace(max_tokens=20, mean=(0.2, 0.3, 0.4))
    navit.save_model(model, tmp_path / "m", class_names=["cat", "dog", "eel"])
    loaded = navit.load_model(tmp_path / "m" / "model.safetensors")
    assert loaded.processor == model.processor and loaded.class_names == ["cat", "dog", "eel"]
    images = [torch.rand(3, 50, 90), Image.new("RGB", (33, 70), (200, 10, 10))]
    with torch.no_grad():
        torch.testing.assert_close(loaded(loaded.processor(images)), model(model.processor(images)))
    with pytest.raises(ValueError, match="has 3 classes but 2 class names"):
        navit.save_model(model, tmp_path / "x", class_names=["a", "b"])


def test_saved_models_keep_their_task_and_its_options(tmp_path):
    from navit.tasks import get_task
    from navit.tasks.segment import Segmenter

    # A segmenter is saved as one (its head is per pixel); a classifier keeps its loss, so a
    # sigmoid model predicts per-class sigmoids after loading, not a softmax.
    classifier = tiny_model()
    segmenter = Segmenter(tiny_config(num_classes=3), classifier.processor).eval()
    navit.save_model(segmenter, tmp_path / "seg", class_names=["bg", "a", "b"])
    loaded = navit.load_model(tmp_path / "seg")
    assert type(loaded) is Segmenter and loaded.class_names == ["bg", "a", "b"]
    torch.testing.assert_close(loaded.state_dict(), segmenter.state_dict())
    sigmoid = get_task("classify", {"loss": "sigmoid"}, [f"c{i}" for i in range(classifier.config.num_classes)])
    navit.save_model(classifier, tmp_path / "sig", task=sigmoid)
    _, task, _ = load_checkpoint(tmp_path / "sig")
    assert task.options.loss == "sigmoid" and task.class_names == sigmoid.class_names
    with pytest.raises(ValueError, match="no task builds a Linear; pass the task"):
        navit.save_model(torch.nn.Linear(2, 2), tmp_path / "x")

    class Mine(navit.NaViT):  # a subclass saves as the task of its nearest registered base
        pass

    navit.save_model(Mine(classifier.config, classifier.processor), tmp_path / "mine")
    assert load_checkpoint(tmp_path / "mine")[1].name == "classify"
    bigger = Mine(classifier.config, classifier.processor)
    bigger.extra = torch.nn.Linear(2, 2)  # weights a classifier does not have: it would not load back
    with pytest.raises(ValueError, match=r"a Mine does not load back as task 'classify'.*extra.bias"):
        navit.save_model(bigger, tmp_path / "bigger")
    # Saving again replaces the checkpoint (and what was written beside it, e.g. by navit eval);
    # a folder holding other things is never wiped.
    (tmp_path / "sig" / "eval.json").write_text("{}")
    navit.save_model(classifier, tmp_path / "sig", task=sigmoid)
    assert not (tmp_path / "sig" / "eval.json").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"run holds more than a checkpoint \(notes.txt\)"):
        navit.save_model(classifier, tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"
    (tmp_path / "sig" / "notes.txt").write_text("keep me too")  # a checkpoint folder the user added to
    with pytest.raises(FileExistsError, match=r"sig holds more than a checkpoint \(notes.txt\)"):
        navit.save_model(classifier, tmp_path / "sig", task=sigmoid)
