"""Tasks are plug-ins: a new one is its own module plus a registry line, and trains end to end."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN

from navit.cli import main
from navit.config import NaViTConfig, option
from navit.inference import load_checkpoint
from navit.model import NaViT
from navit.tasks import TASKS, Task, TaskLoss, get_task


@dataclass
class AspectOptions:
    scale: float = option(1.0, "multiplier of the log aspect ratio to predict")


class Aspect(Task):
    """A toy regression task defined outside the package: predict the log aspect ratio."""

    name = "aspect"
    Options = AspectOptions
    metric = "within_half"

    def targets(self, item):
        return {"log_aspect": self.options.scale * math.log(item["image"].width / item["image"].height)}

    def build_model(self, config, processor):
        return NaViT(config.replace(num_classes=1), processor)

    def model_from_dict(self, values, processor):
        return NaViT(NaViTConfig.from_dict(values), processor)

    def loss(self, forward, model, batch, targets):
        error = (forward(batch)[:, 0].float() - targets["log_aspect"].float()) ** 2
        return TaskLoss(error.sum(), error.numel())

    @torch.no_grad()
    def evaluate(self, model, loader, device):
        model.eval()
        hits = examples = tokens = 0
        for item in loader:
            error = (model(item.batch)[:, 0] - item.targets["log_aspect"]).abs()
            hits += int((error < 0.5).sum())
            examples += error.numel()
            tokens += item.batch.num_real_tokens
        return {"within_half": hits / examples, "tokens_per_example": tokens / examples, "examples": examples}

    @torch.no_grad()
    def predict(self, model, batch, *, topk=5, inputs=None):
        return [{"log_aspect": round(float(v), 4)} for v in model(batch)[:, 0]]


def test_a_new_task_trains_evaluates_saves_and_predicts_through_the_cli(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(TASKS, "aspect", Aspect)  # the one registry line
    assert main(["train", "--task", "aspect", "--scale", "2", "--data", "synthetic:40", "--out", str(tmp_path),
                 "--name", "a", "--max-steps", "3", *TINY_TRAIN]) == 0  # fmt: skip
    run = Path(tmp_path) / "a"
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["val_within_half"] <= 1 and (run / "within_half_vs_tokens.png").exists()
    model, task, meta = load_checkpoint(run)
    assert isinstance(task, Aspect) and task.options.scale == 2.0 and model.head.out_features == 1
    image = tmp_path / "x.png"
    from navit.synthetic.shapes import SyntheticShapes

    SyntheticShapes(1).load(0).save(image)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), "--json", str(image)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row) == {"path", "tokens", "error", "log_aspect"} and math.isfinite(row["log_aspect"])


def test_task_options_are_checked_by_their_task():
    with pytest.raises(ValueError, match="unknown task 'track'"):
        get_task("track")
    with pytest.raises(ValueError, match=r"unknown option\(s\) of task 'classify' \['text_depth'\]"):
        get_task("classify", {"text_depth": 2})
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        get_task("classify", {"label_smoothing": 1.5})
    assert get_task("contrastive", {"loss": "sigmoid"}, ["a"]).options.loss == "sigmoid"


# ------------------------------------------------------------------------------------------------
# Tasks return (loss_sum, count); the trainer normalises. One step's gradients are what each task's
# loss always meant: the mean over examples (classification), over labelled pixels (segmentation),
# and the contrastive loss itself.


def _classification_step():
    from conftest import random_images, tiny_config

    from navit import pack_images
    from navit.tasks.classify import per_example_loss

    task = get_task("classify", {"label_smoothing": 0.1}, [str(i) for i in range(7)])
    torch.manual_seed(0)
    model = task.build_model(tiny_config(num_classes=7), None).train()
    batch = pack_images(random_images([(16, 24), (24, 24), (8, 32), (16, 16), (32, 16)], seed=4), 8, 32)
    labels = torch.tensor([0, 3, 6, 1, 1])

    def reference():
        return per_example_loss(model(batch), labels, "softmax", 0.1).mean()

    return task, model, batch, {"label": labels}, reference, 5


def _segmentation_step():
    import torch.nn.functional as F
    from conftest import tiny_config

    from navit import pack
    from navit.processor import Processor
    from navit.synthetic.segmentation import SyntheticSegmentation

    source = SyntheticSegmentation(3, seed=1)
    task = get_task("segment", None, source.class_names)
    processor = Processor(patch_size=8, max_tokens=16)
    torch.manual_seed(0)
    model = task.build_model(tiny_config(num_classes=len(source.class_names)), processor).train()
    items = [source.item(i) for i in range(len(source))]
    batch = pack([processor.to_example(item["image"], dense={"mask": item["mask"]}) for item in items], 32).batch
    labels = batch.fields["mask"].masked_fill(~batch.token_mask[..., None], 255)
    labels[0, :3] = 255  # a few unlabelled pixels

    def reference():
        logits = model(batch).float().flatten(0, 2)
        return F.cross_entropy(logits, labels.flatten(), ignore_index=255)  # the mean over labelled pixels

    batch.fields["mask"] = labels
    return task, model, batch, {}, reference, int((labels != 255).sum())


def _contrastive_step():
    from test_two_tower import synthetic_pairs, tiny

    task = get_task("contrastive", {"loss": "softmax", "chunk_size": 3}, ["a"])
    model = tiny("softmax").train()
    batch, captions = synthetic_pairs(6)

    def reference():
        ids, mask = model.tokenizer().encode(captions)
        img, txt = model(batch, ids, mask)
        return model.contrastive_loss(img.float(), txt.float(), chunk_size=3)

    return task, model, batch, {"caption": captions}, reference, 6


@pytest.mark.parametrize("make", [_classification_step, _segmentation_step, _contrastive_step])
def test_the_trainers_normalisation_of_a_task_loss_gives_the_gradient_of_the_tasks_mean(make):
    from navit.train import normalised

    task, model, batch, targets, reference, terms = make()
    expected = reference()
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    result = task.loss(model, model, batch, targets)
    assert result.count == terms
    # Logged: the loss sum over the terms is the mean the task stands for.
    torch.testing.assert_close(result.loss_sum.detach() / result.count, expected.detach(), rtol=1e-6, atol=0)
    normalised(result, result.count, 1).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) > 10
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_contrastive_loss_sum_is_the_ranks_share_with_the_gradient_of_the_global_loss(monkeypatch):
    """Under DDP the ring loss L is every rank's; its loss sum is L * n (this rank's examples)
    for logging, with the gradient of L * total, so that the trainer's world_size / total makes
    it L * world_size: DDP's mean over ranks then gives each rank's full gradient of L."""
    import navit.tasks.contrastive as contrastive
    from navit.train import normalised

    task, model, batch, targets, reference, n = _contrastive_step()
    # This rank holds 6 of the step's 10 examples, on one of 2 ranks.
    monkeypatch.setattr(contrastive.D, "sum_over_ranks", lambda value, info, device: 10.0)
    result = task.loss(model, model, batch, targets)
    loss = reference()
    assert result.count == n
    torch.testing.assert_close(result.loss_sum.detach(), loss.detach() * n)
    (got,) = torch.autograd.grad(normalised(result, 10, 2), model.logit_scale)
    (want,) = torch.autograd.grad(loss * 2, model.logit_scale)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------
# Saving and loading: a checkpoint holds the task, the model's config (a NaViT's: its encoder's)
# and its head spec; every task's model comes back exactly, through the same code.


def _tiny_task_models():
    from conftest import tiny_config

    from navit.heads import TextTowerConfig
    from navit.tasks.segment import Segmenter
    from navit.two_tower import create_image_text_model

    encoder = tiny_config(num_classes=0)
    return {
        "classify": (lambda: NaViT(tiny_config(num_classes=3)), {"name": "classifier", "num_classes": 3}),
        "segment": (lambda: Segmenter(tiny_config(num_classes=3)), {"name": "segmenter", "num_classes": 3}),
        "contrastive": (lambda: create_image_text_model(encoder, text_depth=1),
                        {"name": "text-tower", **TextTowerConfig.for_encoder(encoder, text_depth=1).to_dict()}),
    }


def _outputs(model, batch):
    return model.encode_image(batch) if hasattr(model, "encode_image") else model(batch)


def _saved_and_loaded(task, tmp_path, change_meta=None):
    from conftest import PATCH, random_images

    from navit import pack_images, save_model

    build, head = _tiny_task_models()[task]
    torch.manual_seed(0)
    model = build().eval()
    for p in model.parameters():  # weights unlike any fresh model's, so a rebuilt one cannot pass
        p.data.normal_()
    save_model(model, tmp_path / task, class_names=["a", "b", "c"])
    meta_path = tmp_path / task / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["task"] == task and meta["head"] == head and meta["model"] == model.to_dict()
    if change_meta is not None:
        change_meta(meta)
        meta_path.write_text(json.dumps(meta))
    loaded, loaded_task, _ = load_checkpoint(tmp_path / task)
    assert loaded_task.name == task and type(loaded) is type(model) and loaded_task.class_names == ["a", "b", "c"]
    weights = loaded.state_dict()
    assert list(weights) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value), key
    batch = pack_images(random_images([(16, 24), (8, 8), (24, 16)]), PATCH, 16)
    with torch.no_grad():
        assert torch.equal(_outputs(loaded, batch), _outputs(model, batch))
    return loaded


@pytest.mark.parametrize("task", ["classify", "segment", "contrastive"])
def test_every_tasks_model_saves_and_loads_back_exactly(task, tmp_path):
    _saved_and_loaded(task, tmp_path)


@pytest.mark.parametrize("task", ["classify", "segment", "contrastive"])
def test_checkpoints_written_before_heads_were_saved_still_load(task, tmp_path):
    def as_before(meta):  # what navit wrote then: no head, a segmenter's config with mean pooling, and an
        if task == "contrastive":  # image-text model's one flat config (the encoder under "image")
            meta["model"] = {"image": meta["model"], **{k: v for k, v in meta["head"].items() if k != "name"}}
        del meta["head"]
        if task == "segment":
            meta["model"]["pool"] = "mean"

    loaded = _saved_and_loaded(task, tmp_path, as_before)
    assert loaded.head_spec() == _tiny_task_models()[task][1]


def test_a_plug_in_task_that_rebuilds_its_model_from_the_config_alone_still_loads(monkeypatch, tmp_path):
    from conftest import tiny_config

    from navit import save_model

    class OldStyle(Aspect):
        name = "old_style"

        def model_from_dict(self, values, processor):  # the signature before heads were saved
            return NaViT(NaViTConfig.from_dict(values), processor)

    monkeypatch.setitem(TASKS, "old_style", OldStyle)
    torch.manual_seed(0)
    task = OldStyle(None, ["log_aspect"])
    model = task.build_model(tiny_config(), None)
    save_model(model, tmp_path / "m", task=task)
    loaded, loaded_task, meta = load_checkpoint(tmp_path / "m")
    assert isinstance(loaded_task, OldStyle) and meta["head"] == {"name": "classifier", "num_classes": 1}
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_a_model_is_refused_by_a_task_whose_head_it_does_not_carry(tmp_path):
    from conftest import tiny_config

    from navit import save_model
    from navit.tasks.segment import Segmenter

    with pytest.raises(ValueError, match="task 'classify' takes a model with a 'classifier' head, not 'segmenter'"):
        save_model(Segmenter(tiny_config(num_classes=3)), tmp_path / "m", task="classify")
    assert not (tmp_path / "m").exists()
