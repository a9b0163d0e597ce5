"""Object detection (``--task detect``): the built-in set and the COCO source, boxes through every
augmentation, Hungarian matching, the box head on packed sequences, COCO mAP through
pycocotools, prediction in each input's own pixels, and a short run end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import TINY_TRAIN, tiny_config
from navit import Processor, load_model, save_model
from navit.boxes import box_iou, generalized_box_iou
from navit.cli import main
from navit.data.coco import CocoDetection
from navit.data.registry import open_source
from navit.inference import load_checkpoint
from navit.ops import ResolutionSampler, train_chain
from navit.synthetic.detection import SyntheticDetection
from navit.synthetic.shapes import CLASS_SPECS, RATIO_RANGES
from navit.tasks import get_task
from navit.tasks.detect import BoxTargets, DetectOptions, Detector, coco_map, match
from navit.tasks.detect_assign import ASSIGNMENTS, centre_match

pytest.importorskip("scipy")
pytest.importorskip("pycocotools")
OTHER_ASSIGNMENT = next(a for a in ASSIGNMENTS if a != DetectOptions().assign)  # the option not by default


# ------------------------------------------------------------------------------------------------
# Data


def test_synthetic_det_classes_follow_the_true_proportions_of_each_box():
    source = open_source("synthetic-det:60")
    counts, aspects = [], set()
    for i in range(len(source)):
        item = source.item(i)
        width, height = item["image"].size
        aspects.add(width > height)
        counts.append(len(item["boxes"]))
        for (x1, y1, x2, y2), label in zip(item["boxes"], item["box_labels"]):
            low, high = RATIO_RANGES[CLASS_SPECS[label][1]]
            ratio = (y2 - y1) / (x2 - x1)  # the polygon's extent, turned by at most 5 degrees
            assert 0.8 * low <= ratio <= 1.25 * high, f"item {i}: a {source.class_names[label]} box is {ratio:.2f} tall"
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert max(counts) >= 3 and min(counts) >= 1 and aspects == {True, False}


def test_synth_det_writes_the_coco_layout_that_the_coco_source_reads_back(tmp_path, capsys):
    assert main(["data", "synth-det", "--out", str(tmp_path), "--num-images", "6"]) == 0
    coco = open_source(str(tmp_path))
    assert isinstance(coco, CocoDetection) and len(coco) == 6
    assert isinstance(open_source(str(tmp_path / "annotations.json")), CocoDetection)
    generated = SyntheticDetection(6)
    assert coco.class_names == generated.class_names
    for i in range(6):
        ours, theirs = coco.item(i), generated.item(i)
        assert np.abs(ours["boxes"] - theirs["boxes"]).max() < 0.02
        assert ours["box_labels"].tolist() == theirs["box_labels"].tolist()
    assert main(["data", "check", str(tmp_path)]) == 0


def _coco_folder(tmp_path, annotations, images=None):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "b.png")
    data = {
        "images": images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                             {"id": 2, "file_name": "b.png", "width": 20, "height": 20}],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "bus"}],
    }  # fmt: skip
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    return tmp_path


def test_coco_boxes_classes_crowds_and_negatives(tmp_path):
    folder = _coco_folder(tmp_path, [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 30], "iscrowd": 1},
    ])  # fmt: skip
    coco = CocoDetection(folder)
    assert coco.class_names == ["bus", "cat"], "categories in id order"
    item = coco.item(0)
    assert item["boxes"].tolist() == [[2, 3, 12, 8]] and item["box_labels"].tolist() == [1], "the crowd box is left out"
    assert coco.item(1)["boxes"].shape == (0, 4), "an image without boxes is a negative"


def test_bad_annotations_are_named_by_file_and_annotation_id(tmp_path, capsys):
    folder = _coco_folder(tmp_path, [
        {"id": 21, "image_id": 1, "category_id": 7, "bbox": [30, 3, 20, 5]},  # outside its 40-wide image
        {"id": 22, "image_id": 1, "category_id": 7, "bbox": [2, 3, 0, 5]},  # zero width
        {"id": 23, "image_id": 2, "category_id": 99, "bbox": [2, 3, 4, 5]},  # unknown category
        {"id": 24, "image_id": 9, "category_id": 7, "bbox": [2, 3, 4, 5]},  # unknown image
    ], images=[{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
               {"id": 2, "file_name": "b.png", "width": 20, "height": 20},
               {"id": 3, "file_name": "gone.png"}])  # fmt: skip
    assert main(["data", "check", str(folder)]) == 1
    lines = capsys.readouterr().out.splitlines()
    expected = {21: ("a.png", "box outside its image"), 22: ("a.png", "box of zero or negative size"),
                23: ("b.png", "unknown category id"), 24: ("annotations.json", "annotation of an unknown image")}  # fmt: skip
    for ann_id, (file, cause) in expected.items():
        assert any(f"{file}: annotation {ann_id}: {cause}" in line for line in lines), (ann_id, lines)
    assert any(line.endswith("gone.png: missing image") for line in lines)
    with pytest.raises(ValueError, match="box outside its image\nannotation 21"):
        CocoDetection(folder).item(0)  # the loader counts skips by the first line, the cause


# ------------------------------------------------------------------------------------------------
# Boxes through the augmentations


class WhiteBoxes:
    """Dark pictures of any aspect ratio with 1 to 3 white rectangles, their boxes exact."""

    class_names = ["box"]

    def item(self, index: int):
        rng = np.random.default_rng(index)
        width, height = int(rng.integers(48, 200)), int(rng.integers(48, 200))
        image, boxes = Image.new("RGB", (width, height)), []
        for _ in range(int(rng.integers(1, 4))):
            x1, y1 = int(rng.integers(0, width - 12)), int(rng.integers(0, height - 12))
            x2, y2 = int(rng.integers(x1 + 8, width + 1)), int(rng.integers(y1 + 8, height + 1))
            boxes.append([x1, y1, x2, y2])
        draw = ImageDraw.Draw(image)
        for x1, y1, x2, y2 in boxes:
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=(255, 255, 255))
        return {"image": image, "boxes": np.array(boxes, float), "box_labels": np.zeros(len(boxes), int)}


def test_boxes_land_on_exactly_the_patches_that_hold_them_after_crop_flip_and_resize():
    p, source = 8, WhiteBoxes()
    chain = train_chain(Processor(patch_size=p, max_tokens=300, resample="box"), crop_min=0.4, flip=True,
                        resolution=ResolutionSampler(res_mode="side", res_min=48, res_max=160),
                        extra=(BoxTargets(min_visible=0.0),))  # fmt: skip
    mirrored, cut = set(), 0
    for index in range(30):
        item = chain(source.item(index), np.random.default_rng(index))
        example, (width, height) = item["example"], item["canvas"]
        mirrored.add(item["geometry"].sx < 0)
        cut += int((item["box_visible"] < 1).sum())
        rows, cols = example.grid
        covered = np.zeros((rows, cols))
        for cx, cy, w, h in item["det_boxes"].numpy() * [width, height, width, height]:
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
            edges_x, edges_y = np.arange(cols + 1) * p, np.arange(rows + 1) * p
            wide = np.clip(np.minimum(edges_x[1:], box[2]) - np.maximum(edges_x[:-1], box[0]), 0, None) / p
            tall = np.clip(np.minimum(edges_y[1:], box[3]) - np.maximum(edges_y[:-1], box[1]), 0, None) / p
            covered = np.maximum(covered, tall[:, None] * wide[None, :])
        brightness = ((example.patches.view(rows, cols, -1, 3).mean((-1, -2)) + 1) / 2).numpy()
        # Overlapping rectangles make the union brighter than any one box: compare where one box rules.
        assert np.abs(np.minimum(covered, 1) - brightness).max() < 0.5, f"item {index}: a box left its pixels"
        assert np.abs(covered - brightness)[(covered == 0) | (covered == 1)].max() < 0.15
    assert mirrored == {True, False} and cut > 0, "flipped, unflipped and cut boxes were all checked"


def test_a_box_that_a_crop_leaves_mostly_outside_is_dropped_with_its_label():
    item = {"image": Image.new("RGB", (100, 100)), "boxes": np.array([[0.0, 0, 20, 20], [40, 40, 60, 60]]),
            "box_labels": np.array([4, 2])}  # fmt: skip
    from navit.ops.geometry import Affine, _Cut, move

    cut = move(item, _Cut((15, 15, 100, 100)), Affine(tx=-15, ty=-15), (85, 85))  # keeps 25 of 400 px of box 0
    assert np.allclose(cut["box_visible"], [25 / 400, 1.0])
    cut["canvas"], cut["geometry"] = (85, 85), Affine()
    kept = BoxTargets(min_visible=0.3)(cut, None)
    assert kept["det_labels"].tolist() == [2] and len(kept["det_boxes"]) == 1
    assert BoxTargets(min_visible=0.05)(cut, None)["det_labels"].tolist() == [4, 2]


# ------------------------------------------------------------------------------------------------
# Matching, the head, the metric


def test_giou_and_iou_on_hand_examples():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [4.0, 0, 6, 2], [0.0, 0, 2, 2]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 7, 0.0, 1.0]]))
    assert torch.allclose(generalized_box_iou(a, b), torch.tensor([[1 / 7 - 2 / 9, -1 / 3, 1.0]]))


def test_hungarian_matching_pairs_each_box_with_the_token_of_its_own_example_that_fits_it():
    # Tokens 0, 1 belong to example 0; tokens 2, 3 to example 1. Token 3 fits box 0 perfectly but
    # is in the wrong example; token 1 fits box 0 and token 0 box 1; token 2 fits box 2.
    boxes = torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.25, 0.25, 0.3, 0.3], [0.5, 0.5, 0.4, 0.4], [0.25, 0.25, 0.3, 0.3]])
    owner = torch.tensor([0, 0, 1, 1])
    gt = torch.tensor([[0.25, 0.25, 0.3, 0.3], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]])
    tokens, truths = match(torch.zeros(4, 3), boxes, owner, gt, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]),
                           (2.0, 5.0, 2.0))  # fmt: skip
    assert dict(zip(truths.tolist(), tokens.tolist())) == {0: 1, 1: 0, 2: 2}


def test_centre_assignment_gives_each_box_the_token_whose_patch_holds_its_centre():
    # Example 0: a grid of 2 rows x 3 columns (tokens 0-5, row-major); example 1: 4 rows x 1 column
    # with its token of row 2 dropped (tokens 6, 7, 8 at rows 0, 1, 3).
    cells = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [0, 0], [1, 0], [3, 0]])
    grids = torch.tensor([[2, 3]] * 6 + [[4, 1]] * 3)
    owner = torch.tensor([0] * 6 + [1] * 3)
    gt = torch.tensor([[0.9, 0.2, 0.1, 0.1],   # example 0, centre in row 0, column 2: token 2
                       [0.4, 0.8, 0.5, 0.3],   # example 0, row 1, column 1: token 4
                       [0.5, 0.3, 0.5, 0.1],   # example 1, row 1 (1.2 rows down), taken: row 0, token 6
                       [0.5, 0.55, 0.8, 0.1],  # example 1, row 2 (dropped; 2.2 rows down), row 1 taken: row 3
                       [0.5, 0.3, 0.2, 0.05]])  # example 1, row 1, the smallest box: it takes token 7 first
    tokens, truths = centre_match(cells, grids, owner, gt, torch.tensor([0, 0, 1, 1, 1]))
    assert dict(zip(truths.tolist(), tokens.tolist())) == {0: 2, 1: 4, 4: 7, 2: 6, 3: 8}


def test_the_assign_option_is_checked_and_the_centre_loss_takes_the_token_that_holds_the_centre():
    with pytest.raises(ValueError, match="assign='nearest'; expected one of"):
        get_task("detect", {"assign": "nearest"}, ["a", "b"])
    torch.manual_seed(0)
    model = Detector(tiny_config(num_classes=2))
    batch = model.processor([torch.rand(3, 16, 32)], seq_len=64)  # 2 rows x 4 columns of 8 px
    truth = torch.tensor([0.45, 0.7, 0.2, 0.4])  # its centre is in row 1, column 1: token 5
    with torch.no_grad():  # token 6 (row 1, column 2) predicts the box exactly, token 5 does not
        model.head.box[-1].bias.copy_(torch.logit(truth) - model.head.box_bias(batch)[0, 6])
        token_5 = model(batch)["boxes"][0, 5]
    targets = {"boxes": [truth[None]], "labels": [torch.tensor([1])]}
    centre = get_task("detect", {"assign": "centre"}, ["a", "b"]).loss(model, model, batch, targets)
    hungarian = get_task("detect", {"assign": "hungarian"}, ["a", "b"]).loss(model, model, batch, targets)
    assert centre.logs["loss_l1"] == pytest.approx(float((token_5 - truth).abs().sum()), rel=1e-4)
    assert centre.logs["loss_l1"] > 0.1 and hungarian.logs["loss_l1"] < 1e-5


def test_the_box_head_gives_each_example_the_same_outputs_packed_as_alone():
    torch.manual_seed(0)
    model = Detector(tiny_config(num_classes=3)).eval()
    for p in model.head.parameters():  # move the zero-initialised box layer off its start
        torch.nn.init.normal_(p, std=0.3)
    pictures = [torch.rand(3, h, w) for h, w in ((24, 64), (40, 16), (32, 32), (16, 48))]
    packed = model.processor(pictures, seq_len=96, max_examples_per_seq=4)
    assert packed.num_seqs < len(pictures)
    with torch.no_grad():
        together = model(packed)
        for j, picture in enumerate(pictures):
            alone_batch = model.processor([picture])
            alone = model(alone_batch)
            for key in ("boxes", "logits"):
                mine = packed.unpack(together[key])[j]
                theirs = alone_batch.unpack(alone[key])[0]
                assert torch.allclose(mine, theirs, atol=1e-5), f"picture {j}: {key} differ packed"


def test_the_untrained_head_starts_every_token_at_its_own_patch_of_its_own_grid():
    model = Detector(tiny_config(num_classes=2)).eval()
    batch = model.processor([torch.rand(3, 16, 48)])  # a grid of 2 rows by 6 columns
    boxes = batch.unpack(model(batch)["boxes"])[0]  # [2, 6, 4]
    assert torch.allclose(boxes[1, 4], torch.tensor([4.5 / 6, 1.5 / 2, 1 / 6, 1 / 2]), atol=1e-4)


def test_coco_map_through_pycocotools_is_one_for_a_perfect_prediction_and_less_when_shifted():
    truth = [(np.array([[10.0, 10, 50, 40], [60, 5, 90, 95]]), np.array([0, 1])), (np.zeros((0, 4)), np.zeros(0))]
    perfect = [(truth[0][0], np.array([0.9, 0.8]), truth[0][1]), (np.zeros((0, 4)), np.zeros(0), np.zeros(0))]
    scores = coco_map(truth, perfect, ["a", "b"])
    assert scores["map"] == pytest.approx(1.0) and scores["ap50"] == pytest.approx(1.0)
    assert scores["ap_small"] is None, "no small box: COCO's -1 becomes None"
    shifted = [(truth[0][0] + [8, 0, 8, 0], np.array([0.9, 0.8]), truth[0][1]), perfect[1]]
    worse = coco_map(truth, shifted, ["a", "b"])
    assert worse["map"] < 0.7 and worse["ap50"] == pytest.approx(1.0)
    wrong_class = [(truth[0][0], np.array([0.9, 0.8]), np.array([1, 0])), perfect[1]]
    assert coco_map(truth, wrong_class, ["a", "b"])["map"] == 0.0


def test_the_loss_is_normalised_by_boxes_and_its_gradient_reaches_the_head():
    model = Detector(tiny_config(num_classes=2))
    task = get_task("detect", class_names=["a", "b"])
    batch = model.processor([torch.rand(3, 32, 64), torch.rand(3, 48, 24)], seq_len=64, max_examples_per_seq=2)
    targets = {"boxes": [torch.tensor([[0.3, 0.5, 0.2, 0.4]]), torch.zeros(0, 4)],
               "labels": [torch.tensor([1]), torch.zeros(0, dtype=torch.long)]}  # fmt: skip
    result = task.loss(model, model, batch, targets)
    assert result.count == 1 and set(result.logs) == {"loss_class", "loss_l1", "loss_giou"}
    result.loss_sum.backward()
    assert model.head.box[-1].weight.grad.abs().sum() > 0 and model.head.classes.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Prediction in the input's own pixels


def _tiling(boxes):
    boxes = np.array([b["box"] for b in boxes])
    return boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max(), boxes[:, 2] - boxes[:, 0]


@pytest.mark.parametrize("grid_rule", ["native", "square"])
def test_predict_json_boxes_are_in_the_inputs_own_pixels_exif_turn_included(tmp_path, capsys, grid_rule):
    # An untrained head puts each token's box on its own patch: together they tile the input.
    torch.manual_seed(0)
    processor = Processor(patch_size=8, max_tokens=32, grid_rule=grid_rule)
    model = Detector(tiny_config(num_classes=2), processor)
    save_model(model, tmp_path / "model", class_names=["a", "b"])
    turned = Image.new("RGB", (40, 96))  # stored 40 wide, 96 tall; shown turned: 96 wide, 40 tall
    exif = turned.getexif()
    exif[0x0112] = 6
    turned.save(tmp_path / "turned.jpg", exif=exif)
    Image.new("RGB", (120, 30)).save(tmp_path / "wide.png")
    args = ["predict", "--checkpoint", str(tmp_path / "model"), "--json", "--threshold", "0", "--topk", "999",
            "--out", str(tmp_path / "drawn"), str(tmp_path / "turned.jpg"), str(tmp_path / "wide.png")]  # fmt: skip
    assert main(args) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for result, (width, height) in zip(results, [(96, 40), (120, 30)]):
        x1, y1, x2, y2, widths = _tiling(result["boxes"])
        assert (x1, y1) == pytest.approx((0, 0), abs=0.01) and (x2, y2) == pytest.approx((width, height), abs=0.01)
        cols = round(width / widths.mean())
        assert np.allclose(widths, width / cols, atol=0.02), "each box one patch wide, in input pixels"
        assert len(result["boxes"]) == 2 * result["tokens"], "a box per token and class"
        assert Image.open(result["drawing"]).size == (width, height)


def test_python_api_detect_gives_boxes_in_each_inputs_pixels():
    model = Detector(tiny_config(num_classes=2), Processor(patch_size=8, max_tokens=16)).eval()
    images = [Image.new("RGB", (64, 16)), torch.rand(3, 40, 24)]
    found = model.detect(images, threshold=0.0, topk=1000)
    batch = model.processor(images)
    again = model.detect(batch, [(64, 16), (24, 40)], threshold=0.0, topk=1000)
    for one, two, (width, height) in zip(found, again, [(64, 16), (24, 40)]):
        assert torch.equal(one["boxes"], two["boxes"])
        assert float(one["boxes"][:, 2].max()) == pytest.approx(width) and float(one["boxes"][:, 3].max()) == pytest.approx(height)
        assert one["scores"].shape == one["labels"].shape == (len(one["boxes"]),)
    with pytest.raises(ValueError, match="sizes"):
        model.detect(batch)


# ------------------------------------------------------------------------------------------------
# End to end


def test_a_short_detection_run_writes_map_per_token_budget_and_loads_as_a_detector(tmp_path):
    args = ["train", "--task", "detect", "--data", "synthetic-det:40", "--max-steps", "4", "--out", str(tmp_path),
            "--name", "det", *TINY_TRAIN, "--crop-min", "0.6", "--assign", OTHER_ASSIGNMENT]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "det"
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"native", "4", "16"}
    assert {"map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "tokens_per_example"} <= set(results["native"])
    assert 0 <= results["native"]["map"] <= 1 and (run / "map_vs_tokens.png").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) and "loss_giou" in row for row in rows)
    model = load_model(run)
    assert isinstance(model, Detector) and model.class_names == SyntheticDetection(1).class_names
    assert load_checkpoint(run)[1].options.assign == OTHER_ASSIGNMENT, "the assignment is saved with the checkpoint"
