"""Semantic segmentation at native resolution: data, alignment, the packed model, loss, metrics, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import PATCH, TINY_TRAIN, assert_rel_close, tiny_config
from PIL import Image

import navit
from navit import pack
from navit.attention import available_backends
from navit.data import segmentation as seg
from navit.data.registry import open_source
from navit.ops import ResolutionSampler, eval_chain, train_chain
from navit.packing import PackingConfig
from navit.batch import PAD
from navit.evaluate import evaluate_budgets
from navit.processor import Processor
from navit.synthetic.segmentation import SyntheticSegmentation
from navit.tasks import get_task
from navit.tasks.segment import Segmenter, confusion, scores
from navit.token_drop import ConstantRate, TokenDropper

CLASSES = ["background", "a", "b", "c"]


def segmenter(**overrides) -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(tiny_config(num_classes=len(CLASSES), **overrides), Processor(patch_size=PATCH, max_tokens=64)).eval()


def coded_item(height: int, width: int, seed: int = 0) -> dict:
    """An image whose pixels spell out its mask (grey level 60 × class), so alignment is checkable."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(3):
        top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
        mask[top : top + rng.integers(3, height // 2 + 4), left : left + rng.integers(3, width // 2 + 4)] = rng.integers(1, 4)
    return {"image": Image.fromarray(np.repeat(mask[..., None] * 60, 3, 2)), "mask": Image.fromarray(mask), "label": 0}


# ------------------------------------------------------------------------------------------------
# Data


def test_the_built_in_set_labels_exactly_the_pixels_of_each_object():
    source = open_source("synthetic-seg:12:3")
    assert source.class_names[0] == "background" and len(source.class_names) == 7
    for i in range(len(source)):
        item = source.item(i)
        image, mask = np.asarray(item["image"]).astype(int), np.asarray(item["mask"])
        assert image.shape[:2] == mask.shape and mask.max() <= 6
        assert (mask > 0).mean() > 0.05, "objects cover a real share of the image"
        assert image[mask > 0].max() < 120 < image[mask == 0].min(), "object pixels are dark, background light"
    again = open_source("synthetic-seg:12:3").item(5)
    assert np.array_equal(np.asarray(again["mask"]), np.asarray(source.item(5)["mask"]))
    many = open_source("synthetic-seg:60:3")
    shapes = {np.asarray(many.item(i)["mask"]).shape for i in range(len(many))}
    assert any(h > 2 * w for h, w in shapes) and any(w > 2 * h for h, w in shapes), "any aspect ratio"


def test_a_folder_written_by_the_cli_reads_back_with_its_classes(tmp_path):
    from navit.cli import main

    assert main(["data", "synth-seg", "--out", str(tmp_path / "seg"), "--num-images", "5"]) == 0
    folder = open_source(str(tmp_path / "seg"))
    assert isinstance(folder, seg.SegmentationFolder) and folder.class_names == SyntheticSegmentation().class_names
    assert Image.open(next((tmp_path / "seg" / "masks").iterdir())).mode == "P", "palette masks"
    built_in = SyntheticSegmentation(5)
    for i in range(5):
        assert np.array_equal(np.asarray(folder.item(i)["mask"]), np.asarray(built_in.item(i)["mask"]))
    # Linked sub-folders are read as in an ImageFolder.
    extra = tmp_path / "extra"
    for part in ("images", "masks"):
        (extra / part).mkdir(parents=True)
        first = sorted((tmp_path / "seg" / part).iterdir())[0]
        (extra / part / first.name).write_bytes(first.read_bytes())
        (tmp_path / "seg" / part / "linked").symlink_to(extra / part)
    assert len(open_source(str(tmp_path / "seg"))) == 6
    (tmp_path / "seg" / "classes.txt").unlink()  # without it: 0 .. the largest index a mask uses
    largest = max(int(np.asarray(built_in.item(i)["mask"]).max()) for i in range(5))
    assert open_source(str(tmp_path / "seg")).class_names == [str(i) for i in range(largest + 1)]


def write_pair(root, name, image: Image.Image, mask: Image.Image) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    image.save(root / "images" / f"{name}.png")
    mask.save(root / "masks" / f"{name}.png")


def palette_image(values: np.ndarray, colour: tuple[int, int, int] = (1, 1, 1)) -> Image.Image:
    """A palette ("P") mask holding ``values`` as indices, each index shown as ``colour``: read as
    grey levels instead of indices, every pixel would say class 1."""
    mask = Image.fromarray(values.astype(np.uint8), mode="P")
    mask.putpalette(list(colour) * 256)
    return mask


def test_bad_masks_are_refused_naming_the_file(tmp_path):
    good = coded_item(20, 30)
    cases = {
        "palette": (good["image"], palette_image(np.full((20, 30), 5)), r"values \[5\] beyond the 4 classes"),
        "size": (good["image"], good["mask"].resize((31, 20)), "is 31x20 pixels but its image"),
        "colour": (good["image"], good["mask"].convert("RGB"), "is a RGB image; masks must be single-channel"),
        "index": (good["image"], Image.fromarray(np.full((20, 30), 9, np.uint8)), r"values \[9\] beyond the 4 classes"),
    }
    for name, (image, mask, message) in cases.items():
        root = tmp_path / name
        write_pair(root, "x", image, mask)
        (root / "classes.txt").write_text("\n".join(CLASSES))
        with pytest.raises(ValueError, match=message) as error:
            open_source(str(root)).item(0)
        assert "x.png" in str(error.value)
    # A palette mask in range reads as its indices, not as the colours its palette shows.
    indices = np.asarray(good["mask"])
    write_pair(tmp_path / "palette-ok", "x", good["image"], palette_image(indices))
    (tmp_path / "palette-ok" / "classes.txt").write_text("\n".join(CLASSES))
    assert np.array_equal(np.asarray(open_source(str(tmp_path / "palette-ok")).item(0)["mask"]), indices)
    ignored = tmp_path / "ignore"
    write_pair(ignored, "x", good["image"], Image.fromarray(np.full((20, 30), 255, np.uint8)))
    (ignored / "classes.txt").write_text("\n".join(CLASSES))
    assert np.asarray(open_source(str(ignored)).item(0)["mask"]).max() == 255, "255 is the ignore label"
    missing = tmp_path / "missing"
    write_pair(missing, "x", good["image"], good["mask"])
    good["image"].save(missing / "images" / "y.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) .* have no mask .*y.png"):
        open_source(str(missing))


def test_a_bad_mask_is_skipped_and_counted_by_the_training_loader(tmp_path):
    from navit.data.loader import PackedLoader

    for i in range(6):
        item = coded_item(24, 32, seed=i)
        write_pair(tmp_path, f"{i}", item["image"], item["mask"] if i != 3 else item["mask"].resize((8, 8)))
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    loader = PackedLoader(open_source(str(tmp_path)), train_chain(Processor(patch_size=PATCH, max_tokens=16)),
                          targets=lambda item: {}, packing=PackingConfig(seq_len=32, num_seqs=2), num_workers=0)  # fmt: skip
    with pytest.warns(UserWarning, match="3.png"):
        examples = sum(batch.batch.num_examples for batch in loader)
    assert examples == 5 and sum(loader.skipped.values()) == 1


def test_manifests_with_masks_and_exif_turned_images(tmp_path):
    item = coded_item(20, 30)
    item["image"].save(tmp_path / "a.png")
    item["mask"].save(tmp_path / "a_mask.png")
    # A JPEG stored on its side with EXIF orientation 6 (turn 90°); its mask drawn on the stored pixels.
    stored = item["image"].transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "b.jpg", exif=exif.tobytes(), quality=100)
    item["mask"].transpose(Image.Transpose.ROTATE_90).save(tmp_path / "b_mask.png")
    # The same JPEG, its mask drawn on the image as shown (already turned): taken as it is.
    stored.save(tmp_path / "c.jpg", exif=exif.tobytes(), quality=100)
    item["mask"].save(tmp_path / "c_mask.png")
    (tmp_path / "list.csv").write_text("path,mask\na.png,a_mask.png\nb.jpg,b_mask.png\nc.jpg,c_mask.png\n")
    (tmp_path / "list.jsonl").write_text('{"path": "a.png", "mask": "a_mask.png"}\n')
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    source = open_source(str(tmp_path / "list.csv"))
    assert isinstance(source, seg.SegmentationManifest) and source.class_names == CLASSES
    assert len(source) == 3
    for i in range(3):
        got = source.item(i)
        assert got["image"].size == (30, 20) and np.array_equal(np.asarray(got["mask"]), np.asarray(item["mask"]))
    assert len(open_source(str(tmp_path / "list.jsonl"))) == 1
    (tmp_path / "bad.csv").write_text("path,mask\na.png,\n")
    with pytest.raises(ValueError, match="line 2: missing or empty 'mask'"):
        open_source(str(tmp_path / "bad.csv"))


def test_the_mask_stays_aligned_through_crop_flip_resolution_and_dropping():
    """Nearest-neighbour resizing on both: every kept token's pixels must equal 60 × its mask."""
    processor = Processor(patch_size=PATCH, max_tokens=64, resample="nearest", reducing_gap=None, mean=(0, 0, 0),
                          std=(1, 1, 1))  # fmt: skip
    transform = train_chain(processor, resolution=ResolutionSampler("side", 40, 90), crop_min=0.4, flip=True,
                            dropper=TokenDropper(ConstantRate(0.5)))  # fmt: skip
    flipped = 0
    for seed in range(12):
        item = coded_item(37, 71, seed)
        example = transform(item, np.random.default_rng(seed))["example"]
        pixels = (example.patches * 255).round().view(example.num_tokens, PATCH * PATCH, 3)
        assert example.num_tokens < example.grid[0] * example.grid[1], "tokens were dropped"
        assert torch.equal(pixels[..., 0], example.fields["mask"].float() * 60), f"misaligned at seed {seed}"
        full = eval_chain(processor)(item)["example"]
        flipped += not torch.equal(full.fields["mask"], example.fields["mask"])
    assert flipped, "the augmentation changed something"


# ------------------------------------------------------------------------------------------------
# Model, loss, metrics


def coded_batch(sizes, model: Segmenter, drop: float = 0.0):
    examples = [model.processor.to_example(x["image"], dense={"mask": x["mask"]}) for x in
                [coded_item(h, w, i) for i, (h, w) in enumerate(sizes)]]  # fmt: skip
    if drop:
        examples = TokenDropper(ConstantRate(drop))(examples, generator=torch.Generator().manual_seed(0))
    return examples


@pytest.mark.parametrize("backend", [*available_backends("cpu"), "auto"])
def test_pixel_logits_and_gradients_are_the_same_packed_as_alone(backend):
    model = segmenter(attn_backend=backend, prefix_tokens=2)
    examples = coded_batch([(24, 40), (16, 16), (40, 24), (8, 48)], model)

    def run(chosen, seq_len):
        leaves = [navit.Example(x.patches.clone().requires_grad_(), x.coords, x.grid, x.fields) for x in chosen]
        batch = pack(leaves, seq_len).batch
        logits = model(batch)
        per_example = batch.unpack(logits)
        sum(((e * torch.arange(e.numel()).view(e.shape) % 7)).sum() for e in per_example).backward()
        return per_example, [leaf.patches.grad for leaf in leaves], batch

    packed, grads, batch = run(examples, 48)
    assert int((batch.slot_to_example[0] != PAD).sum()) >= 2, "examples share a sequence"
    alone, alone_grads, _ = run(examples[1:2], 24)
    assert_rel_close(packed[1], alone[0], 1e-5, "pixel logits")
    assert_rel_close(grads[1], alone_grads[0], 1e-5, "patch gradients")


def test_the_loss_is_the_mean_pixel_cross_entropy_over_labelled_pixels_of_kept_tokens():
    model = segmenter()
    task = get_task("segment", None, CLASSES)
    examples = coded_batch([(24, 40), (16, 16), (40, 24)], model, drop=0.3)
    examples[0].fields["mask"][0, :5] = seg.IGNORE
    batch = pack(examples, 40).batch
    result = task.loss(model, model, batch, {})
    pieces = []
    for x in examples:
        logits = model.head(model.forward_features(pack([x], 40).batch))[0, : x.num_tokens].view(-1, len(CLASSES))
        labels = x.fields["mask"].flatten()
        pieces.append(torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none")[labels != 255])
    expected = torch.cat(pieces).mean()
    torch.testing.assert_close(result.loss_sum / result.count, expected, rtol=1e-5, atol=1e-6)
    assert result.count == sum(len(p) for p in pieces) and task.flops(model, batch, {}) == model.flops(batch, training=True)


def test_label_maps_put_each_pixel_back_where_it_came_from():
    model = segmenter()
    items = [coded_item(h, w, i) for i, (h, w) in enumerate([(24, 40), (16, 32), (40, 16)])]  # multiples of the patch
    examples = [model.processor.to_example(x["image"], dense={"mask": x["mask"]}) for x in items]
    batch = pack(examples, 48).batch
    onehot = torch.nn.functional.one_hot(batch.fields["mask"].clamp(max=3), len(CLASSES)).float() * 10
    maps = model.label_maps(onehot, batch, [x["mask"].size[::-1] for x in items])
    for got, item in zip(maps, items):
        assert np.array_equal(got.numpy(), np.asarray(item["mask"]))
    bigger = model.label_maps(onehot, batch, [(48, 80), (32, 64), (80, 32)])  # twice the size: each pixel twice
    for got, item in zip(bigger, items):
        assert np.array_equal(got.numpy()[::2, ::2], np.asarray(item["mask"]))


def test_segmenter_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    import test_model

    model = segmenter(attn_backend="dense")
    examples = coded_batch([(16, 24), (24, 16)], model)
    batch = pack(examples, 6, max_examples_per_seq=1).batch
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", test_model.math_sdpa)
        with FlopCounterMode(display=False) as counter:
            model(batch)
    assert model.flops(batch) == counter.get_total_flops()


def test_scores_count_iou_per_class_and_leave_out_what_is_absent():
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 3]])
    counts = confusion(prediction, truth, 4)
    assert counts.sum() == 6, "ignored pixels are not counted"
    result = scores(counts, CLASSES)
    # background: 1 hit / (2 true + 2 predicted - 1); a: 2 / (2 + 3 - 2); b: 1 / 2; c: absent
    assert result["class_iou"] == {"background": pytest.approx(1 / 3), "a": pytest.approx(2 / 3), "b": 0.5, "c": None}
    assert result["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0.5) / 3)
    assert result["pixel_accuracy"] == pytest.approx(4 / 6)


def grey_reader(model: Segmenter, mapping: list[int]) -> Segmenter:
    """``model`` with its forward replaced by a reader of the coded images' grey levels (60 ×
    class, with mean 0 and std 1): logits [B, L, p², C] that pick ``mapping[class]`` for every
    pixel, so what evaluation and prediction must report follows from the mask alone."""
    table = torch.tensor(mapping)

    def forward(batch):
        grey = batch.patches.view(*batch.patches.shape[:2], -1, 3)[..., 0]  # [B, L, p²]
        truth = (grey * 255 / 60).round().long().clamp(0, len(mapping) - 1)
        return torch.nn.functional.one_hot(table[truth], len(CLASSES)).float() * 10

    model.forward = forward
    return model


def test_evaluation_and_prediction_report_what_a_known_mask_says(tmp_path):
    # Classes background, a and b are read right; every "c" pixel is predicted "a".
    mapping = [0, 1, 2, 1]
    processor = Processor(patch_size=PATCH, max_tokens=64, mean=(0, 0, 0), std=(1, 1, 1))
    model = grey_reader(segmenter(), mapping)
    model.processor = processor
    items = [coded_item(h, w, seed) for seed, (h, w) in enumerate([(24, 40), (32, 16), (40, 48)])]  # within 64 tokens
    for i, item in enumerate(items):
        write_pair(tmp_path / "data", f"{i}", item["image"], item["mask"])
    (tmp_path / "data" / "classes.txt").write_text("\n".join(CLASSES))
    truth = np.concatenate([np.asarray(x["mask"]).ravel() for x in items])
    n = np.bincount(truth, minlength=4)
    assert (n > 0).all(), "every class is in the masks"
    task = get_task("segment", None, CLASSES)
    result = evaluate_budgets(model, task, open_source(str(tmp_path / "data")), processor, budgets=[])["native"]
    expected_iou = {"background": 1.0, "a": n[1] / (n[1] + n[3]), "b": 1.0, "c": 0.0}
    assert result["class_iou"] == pytest.approx(expected_iou, abs=1e-6)
    assert result["miou"] == pytest.approx(sum(expected_iou.values()) / 4)
    assert result["pixel_accuracy"] == pytest.approx(1 - n[3] / n.sum())
    assert result["examples"] == 3 and result["tokens_per_example"] == pytest.approx((15 + 8 + 30) / 3)
    # Prediction: the mask at the input's size, the shares of its classes, and the PNG that holds it.
    picture = items[2]["image"]
    predicted = np.asarray(mapping)[np.asarray(items[2]["mask"])]
    (result,) = task.predict(model, processor([picture]), inputs=[picture])
    assert np.array_equal(result["mask"], predicted)
    counts = np.bincount(predicted.ravel(), minlength=4)
    assert result["classes"] == pytest.approx({CLASSES[i]: c / counts.sum() for i, c in enumerate(counts) if c})
    assert list(result["classes"]) == [CLASSES[i] for i in np.argsort(-counts, kind="stable") if counts[i]]
    saved = task.save_prediction(result, picture, tmp_path / "out", "x")
    assert np.array_equal(np.asarray(Image.open(saved["mask"])), predicted)


# ------------------------------------------------------------------------------------------------
# End to end


def test_train_eval_and_predict_from_the_command_line(tmp_path, capsys):
    from navit.cli import main

    base = ["--task", "segment", "--data", "synthetic-seg:40", "--out", str(tmp_path), "--max-steps", "3",
            "--drop", "beta", "--res-mode", "side", "--res-min", "32", "--res-max", "96", *TINY_TRAIN]  # fmt: skip
    assert main(["train", *base, "--name", "navit"]) == 0
    assert main(["train", *base, "--name", "square", "--baseline", "square"]) == 0
    for name in ("navit", "square"):
        report = json.loads((tmp_path / name / "eval.json").read_text())
        assert set(report) == {"native", "4", "16"} and 0 <= report["native"]["miou"] <= 1
        assert set(report["native"]["class_iou"]) == set(SyntheticSegmentation().class_names)
    assert (tmp_path / "navit" / "miou_vs_tokens.png").exists()
    assert main(["eval", "--checkpoint", str(tmp_path / "navit"), "--budgets", "8", "--workers", "0",
                 "--out", str(tmp_path / "again")]) == 0  # fmt: skip
    assert set(json.loads((tmp_path / "again" / "eval.json").read_text())) == {"native", "8"}
    # Dropping tokens leaves patches without a prediction: refused for segmentation, not scored as background.
    with pytest.raises(SystemExit, match="by='drop' cannot evaluate the 'segment' task.*--by resize"):
        main(["eval", "--checkpoint", str(tmp_path / "navit"), "--budgets", "8", "--by", "drop", "--workers", "0"])
    with pytest.raises(SystemExit, match="needs masks"):  # data without masks is refused, not scored 0
        main(["eval", "--checkpoint", str(tmp_path / "navit"), "--data", "synthetic:8", "--workers", "0"])

    pictures = [tmp_path / "wide.png", tmp_path / "tall.jpg"]
    Image.new("RGB", (90, 31), (200, 190, 180)).save(pictures[0])
    Image.new("RGB", (27, 64), (20, 30, 40)).save(pictures[1])
    with pytest.raises(SystemExit, match="give an output folder"):
        main(["predict", "--checkpoint", str(tmp_path / "square"), str(pictures[0])])
    capsys.readouterr()
    for name in ("navit", "square"):
        out = tmp_path / f"masks-{name}"
        assert main(["predict", "--checkpoint", str(tmp_path / name), "--out", str(out), "--json",
                     *map(str, pictures)]) == 0  # fmt: skip
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        for line, picture in zip(lines, pictures):
            mask = Image.open(line["mask"])
            assert mask.size == Image.open(picture).size and mask.mode == "P", "the input's own size"
            assert Image.open(line["overlay"]).size == mask.size
            names = SyntheticSegmentation().class_names
            counts = np.bincount(np.asarray(mask).flatten(), minlength=len(names))
            shares = {names[i]: c / counts.sum() for i, c in enumerate(counts) if c}
            assert line["classes"] == pytest.approx(shares, abs=1e-6), "the PNG holds the predicted class indices"


def test_fine_tuning_from_a_classifier_keeps_the_encoder_and_makes_a_new_decoder(tmp_path):
    from navit.cli import main
    from navit.inference import load_checkpoint

    assert main(["train", "--data", "synthetic:24", "--out", str(tmp_path), "--name", "cls", "--max-steps", "1",
                 *TINY_TRAIN]) == 0  # fmt: skip
    assert main(["train", "--task", "segment", "--data", "synthetic-seg:24", "--out", str(tmp_path), "--name", "seg",
                 "--init-from", str(tmp_path / "cls"), "--max-steps", "1", "--lr", "1e-9", *TINY_TRAIN]) == 0  # fmt: skip
    classifier, _, _ = load_checkpoint(tmp_path / "cls")
    model, task, _ = load_checkpoint(tmp_path / "seg")
    assert task.name == "segment" and isinstance(model, Segmenter)
    assert torch.allclose(model.blocks[0].attn.qkv.weight, classifier.blocks[0].attn.qkv.weight, atol=1e-6)
    assert model.head.out_features == model.config.patch_size**2 * 7 != classifier.head.out_features
