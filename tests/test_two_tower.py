"""ImageTextModel (shapes, normalisation, the text tower as its head, save/rebuild, checkpoints of
the older layout, a few training steps) and zero-shot helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import navit
from navit import NaViTConfig, pack
from navit.contrastive import sigmoid_contrastive_loss
from navit.synthetic.shapes import SyntheticShapes
from navit.patchify import image_to_example
from navit.text import ByteTokenizer
from navit.heads import TextTowerConfig, TextTowerHead, build_head
from navit.two_tower import ImageTextModel, create_image_text_model
from navit.zeroshot import DEFAULT_TEMPLATES, class_prompts, zero_shot_logits, zero_shot_weights

PATCH = 8
TINY_IMAGE = dict(patch_size=PATCH, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, pos_max_len=16)


def tiny(loss: str = "sigmoid", seed: int = 0) -> ImageTextModel:
    torch.manual_seed(seed)
    return create_image_text_model(
        "navit_ti16", loss=loss, embed_dim=24, text_width=32, text_depth=1,
        image_overrides=TINY_IMAGE, text_max_len=64,
    )


def synthetic_pairs(n: int = 8, seed: int = 0):
    """A packed batch of ``n`` small SyntheticShapes images and their captions, in batch order."""
    source = SyntheticShapes(n, seed=seed, min_side=16, max_side=48)
    tokens = []
    for i in range(n):
        pixels = torch.from_numpy(np.asarray(source.load(i)).copy()).permute(2, 0, 1).float() / 255.0
        tokens.append(image_to_example(pixels, PATCH, 36, index=i))
    result = pack(tokens, seq_len=64)
    captions = [source.caption(i) for i in result.packed]
    return result.batch, captions


def test_shapes_normalisation_and_logit_parameters():
    batch, captions = synthetic_pairs(6)
    for loss, scale, bias in (("sigmoid", 10.0, -10.0), ("softmax", 1 / 0.07, None)):
        model = tiny(loss).eval()
        assert model.image.config.num_classes == 0 and isinstance(model.image.head, nn.Identity)
        ids, mask = model.tokenizer().encode(captions)
        img, txt = model(batch, ids, mask)
        assert img.shape == (6, 24) and txt.shape == (6, 24)
        for emb in (img, txt):
            assert torch.allclose(emb.norm(dim=-1), torch.ones(6), atol=1e-5)
        assert torch.allclose(img, model.encode_image(batch)) and torch.allclose(txt, model.encode_text(ids, mask))
        assert math.isclose(model.logit_scale.exp().item(), scale, rel_tol=1e-5)
        if bias is None:
            assert model.logit_bias is None
        else:
            assert model.logit_bias.item() == bias
        assert model.logits(img, txt).shape == (6, 6)
    # Images of different content get different embeddings (not a constant output).
    assert (img[0] - img[1]).abs().max() > 1e-4 and (txt[0] - txt[1]).abs().max() > 1e-4


def test_factory_defaults_and_validation():
    model = create_image_text_model("navit_ti16", text_depth=1, image_overrides=dict(depth=1))
    cfg = model.config
    assert cfg.embed_dim == cfg.text_width == 192 and cfg.text_heads == 3 and model.image.config.num_classes == 0
    assert model.tokenizer().max_len == 64 and model.tokenizer().vocab_size == cfg.vocab_size
    with pytest.raises(ValueError, match="num_classes"):
        create_image_text_model(image_overrides=dict(num_classes=10))
    with pytest.raises(ValueError, match="loss"):
        create_image_text_model(loss="hinge", image_overrides=dict(depth=1))
    with pytest.raises(ValueError, match="needs num_classes=0, got num_classes=1000"):
        ImageTextModel(NaViTConfig(depth=1))
    with pytest.raises(ValueError, match=r"unknown text-tower field\(s\) \['colour'\]"):
        TextTowerConfig.from_dict({"embed_dim": 8, "colour": 1})
    with pytest.raises(ValueError, match="text_width=30 is not divisible by text_heads=4"):
        TextTowerConfig(text_width=30, text_heads=4)
    with pytest.raises(ValueError, match="needs the encoder's width 192 to be embed_dim=24"):
        ImageTextModel(NaViTConfig(depth=1, num_classes=0), head=TextTowerConfig(embed_dim=24, image_proj=False))


def test_the_image_tower_is_the_encoder_alone_and_the_text_tower_its_registered_head():
    from navit.tasks import get_task

    batch, _ = synthetic_pairs(3)
    model = tiny().eval()
    assert model.image.head_spec() is None and model.image.pool is not None
    assert model.num_classes is None, "it classifies by any class names"
    spec = model.head_spec()
    assert spec == {"name": "text-tower", **model.config.to_dict()} and spec["text_width"] == 32
    assert model.to_dict() == model.image.to_dict(), "the model's config is its encoder's"
    head = build_head(spec, model.image.config)  # the registry rebuilds the same head
    assert type(head) is TextTowerHead and head.config == model.config
    assert {n for n, _ in head.named_parameters()} == {n for n, _ in model.named_parameters() if n[:6] != "image."}
    with torch.no_grad():  # the image tower's outputs are its pooled vectors
        torch.testing.assert_close(model.image(batch), model.image.outputs(batch)["pooled"])
    with pytest.raises(ValueError, match="an image-text model's head is the 'text-tower' head, got 'classifier'"):
        ImageTextModel.from_dict(model.to_dict(), head={"name": "classifier", "num_classes": 2})
    with pytest.raises(ValueError, match="task 'contrastive' takes a model with a 'text-tower' head, not 'segmenter'"):
        get_task("contrastive").model_from_dict(model.to_dict(), None, {"name": "segmenter", "num_classes": 2})
    task = get_task("contrastive", {"loss": "sigmoid", "text_depth": 1})
    built = task.build_model(model.image.config, model.processor)
    assert built.head_spec()["loss"] == "sigmoid" and built.config.text_depth == 1
    assert built.processor is model.processor


def test_the_text_tower_head_on_a_plain_encoder_computes_what_the_image_text_model_does():
    batch, captions = synthetic_pairs(4)
    model = tiny().eval()
    encoder = navit.NaViT(model.image.config, head=model.head_spec()).eval()
    encoder.load_state_dict({(k.removeprefix("image.") if k.startswith("image.") else "head." + k): v
                             for k, v in model.state_dict().items()})  # fmt: skip
    ids, mask = model.tokenizer().encode(captions)
    with torch.no_grad():
        torch.testing.assert_close(encoder(batch), model.encode_image(batch), rtol=0, atol=0)
        torch.testing.assert_close(encoder.head.encode_text(ids, mask), model.encode_text(ids, mask), rtol=0, atol=0)
    assert {"head.text.pos_embed", "head.logit_scale", "head.text.norm.weight"} <= encoder.no_weight_decay()
    assert "head.text_proj.weight" not in encoder.no_weight_decay()
    assert encoder.fsdp_units() == [*encoder.blocks, *encoder.head.text.blocks]
    pool = encoder.pool.flops(batch.num_seqs, batch.seq_len, batch.max_examples_per_seq)
    assert encoder.head_flops(batch) == pool + 2 * 4 * 32 * 24, "the image projection, once per example"


def test_the_weights_keep_the_names_and_order_of_the_older_layout():
    """Checkpoints, optimizer states (by parameter position) and the SigLIP2 name map were written
    with these names in this order: the head's weights sit at the model's top level."""
    names = [n for n, _ in tiny().named_parameters()]
    image = [n for n in names if n.startswith("image.")]
    text = [n for n in names if n.startswith("text.")]
    assert names == ["logit_scale", "logit_bias", *image, *text, "image_proj.weight", "text_proj.weight"]
    assert image[0] == "image.patch_embed.weight" and text[:2] == ["text.pos_embed", "text.token_embed.weight"]


@pytest.mark.parametrize("old_head", ["none", "missing"])
def test_a_checkpoint_of_the_older_flat_layout_loads(old_head, tmp_path):
    """Before the text tower was a head, meta.json held one flat config (the encoder under
    "image", the text settings beside it) and a null head, or no head at all."""
    from navit import load_model, save_model
    from navit.inference import load_checkpoint
    from navit.start import start_from

    batch, captions = synthetic_pairs(3)
    model = tiny("softmax", seed=5).eval()
    with torch.no_grad():
        model.logit_scale.add_(0.25)
    save_model(model, tmp_path / "m", class_names=["tall_ellipse", "wide_rectangle"])
    meta_path = tmp_path / "m" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["head"] == model.head_spec() and meta["model"] == model.image.to_dict()
    flat = {"image": meta["model"], **{k: v for k, v in meta["head"].items() if k != "name"}}
    if old_head == "none":
        meta.update(model=flat, head=None)
    else:
        meta["model"] = flat
        del meta["head"]
    meta_path.write_text(json.dumps(meta))
    loaded, task, _ = load_checkpoint(tmp_path / "m")
    assert type(loaded) is ImageTextModel and task.name == "contrastive"
    assert loaded.head_spec() == model.head_spec() and loaded.image.config == model.image.config
    ids, mask = model.tokenizer().encode(captions)
    with torch.no_grad():
        for a, b in zip(loaded(batch, ids, mask), model(batch, ids, mask)):
            assert torch.equal(a, b)
    assert torch.equal(loaded.logit_scale, model.logit_scale)
    assert load_model(tmp_path / "m")(batch).shape == (3, 2), "and as a zero-shot classifier"
    start = start_from(str(tmp_path / "m"))  # fine-tuning from it takes the image tower
    assert start.config == model.image.config and torch.equal(start.weights["patch_embed.weight"],
                                                              model.image.patch_embed.weight)  # fmt: skip


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_save_and_rebuild_gives_identical_outputs(loss):
    batch, captions = synthetic_pairs(5)
    model = tiny(loss, seed=1).eval()
    with torch.no_grad():  # move the scalars off their init so the state dict really carries them
        model.logit_scale.add_(0.3)
        if model.logit_bias is not None:
            model.logit_bias.sub_(1.5)
    saved = json.loads(json.dumps({"model": model.to_dict(), "head": model.head_spec()}))  # as meta.json holds them
    rebuilt = ImageTextModel.from_dict(saved["model"], head=saved["head"])
    assert rebuilt.config == model.config and rebuilt.image.config == model.image.config
    fresh = [(a - b).abs().max().item() for a, b in zip(rebuilt(batch, *model.tokenizer().encode(captions)),
                                                       model(batch, *model.tokenizer().encode(captions)))]
    assert max(fresh) > 1e-4  # a rebuilt model without the weights differs...
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    ids, mask = model.tokenizer().encode(captions)
    for a, b in zip(model(batch, ids, mask), rebuilt(batch, ids, mask)):
        assert torch.equal(a, b)  # ...with them, it is the same model
    assert torch.equal(model.logit_scale, rebuilt.logit_scale)
    img, txt = model(batch, ids, mask)
    assert torch.equal(model.contrastive_loss(img, txt), rebuilt.contrastive_loss(img, txt))


def test_a_few_training_steps_reduce_the_sigmoid_loss():
    batch, captions = synthetic_pairs(8, seed=3)
    model = tiny("sigmoid", seed=2).train()
    ids, mask = model.tokenizer().encode(captions)
    init_scale, init_bias = model.logit_scale.exp().item(), model.logit_bias.item()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses, tower_losses = [], []
    for step in range(8):
        img, txt = model(batch, ids, mask)
        loss = sigmoid_contrastive_loss(img, txt, logit_scale=model.logit_scale.exp(), logit_bias=model.logit_bias)
        losses.append(loss.item())
        # The same loss at the initial scale and bias: moves only if the towers' embeddings do.
        tower_losses.append(
            sigmoid_contrastive_loss(img.detach(), txt.detach(), logit_scale=init_scale, logit_bias=init_bias).item()
        )
        opt.zero_grad()
        loss.backward()
        if step == 0:  # every part of both towers gets a gradient
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            for name in ("image.patch_embed.weight", "image.blocks.0.attn.qkv.weight", "text.token_embed.weight",
                         "text.blocks.0.qkv.weight", "image_proj.weight", "text_proj.weight",
                         "logit_scale", "logit_bias"):
                assert model.get_parameter(name).grad.abs().sum() > 0, name
        opt.step()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert tower_losses[-1] < 0.5 * tower_losses[0], tower_losses
    for name in ("image.patch_embed.weight", "text.token_embed.weight"):
        assert not torch.equal(before[name], model.get_parameter(name)), name


# ---------------------------------------------------------------------------------------------
# Zero-shot
# ---------------------------------------------------------------------------------------------
def test_class_prompts():
    prompts = class_prompts(["tall_ellipse", "square_rectangle"])
    assert len(prompts) == 2 and all(len(p) == len(DEFAULT_TEMPLATES) for p in prompts)
    assert prompts[0][0] == "a photo of a tall ellipse."
    assert all("tall ellipse" in p and "_" not in p for p in prompts[0])
    assert class_prompts(["wide_rectangle"], ["{}", "the {} here"]) == [["wide rectangle", "the wide rectangle here"]]
    with pytest.raises(ValueError, match="exactly once"):
        class_prompts(["a"], ["no slot"])
    with pytest.raises(TypeError):
        class_prompts("tall_ellipse")


def test_zero_shot_weights_are_the_mean_of_normalised_prompt_embeddings():
    model = tiny("sigmoid", seed=4).eval()
    tok = model.tokenizer()
    names = ["tall_ellipse", "round_ellipse", "wide_rectangle"]
    weights = zero_shot_weights(model, tok, names, batch_size=5)  # batches across class borders
    assert weights.shape == (3, 24)
    assert torch.allclose(weights.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not model.training  # mode untouched
    with torch.no_grad():
        for c, prompts in enumerate(class_prompts(names)):
            expected = F.normalize(model.encode_text(*tok.encode(prompts)).mean(0), dim=-1)
            assert torch.allclose(weights[c], expected, atol=1e-5)
    img = F.normalize(torch.randn(4, 24), dim=-1)
    logits = zero_shot_logits(img, weights)
    assert logits.shape == (4, 3) and torch.allclose(logits, img @ weights.T, atol=1e-6)
    with pytest.raises(ValueError):
        zero_shot_logits(img, weights[:, :5])


class KeywordTextModel(nn.Module):
    """A text tower by construction: bag of the shape words, plus a template-specific nuisance."""

    WORDS = ("tall", "round", "square", "wide", "ellipse", "rectangle")

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the model a device
        gen = torch.Generator().manual_seed(0)
        self.word_vectors = F.normalize(torch.randn(len(self.WORDS), dim, generator=gen), dim=-1)
        self.tokenizer = ByteTokenizer()
        self.dim = dim

    def embed_words(self, text: str) -> torch.Tensor:
        words = text.replace(".", " ").split()
        out = torch.zeros(self.dim)
        for k, w in enumerate(self.WORDS):
            if w in words:
                out += self.word_vectors[k]
        # Everything else (the template) lands in a pseudo-random direction of its own.
        rest = " ".join(w for w in words if w not in self.WORDS)
        noise = torch.randn(self.dim, generator=torch.Generator().manual_seed(sum(map(ord, rest))))
        return out + 0.5 * F.normalize(noise, dim=0)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Deliberately not unit length (norm grows with the text), so the weights must normalise.
        texts = self.tokenizer.decode(ids)
        return torch.stack([len(t) * F.normalize(self.embed_words(t), dim=0) for t in texts])


def test_zero_shot_picks_the_matching_class():
    from navit.synthetic.shapes import CLASS_NAMES

    model = KeywordTextModel()
    weights = zero_shot_weights(model, model.tokenizer, CLASS_NAMES)
    assert weights.shape == (len(CLASS_NAMES), 16)
    for c, prompts in enumerate(class_prompts(CLASS_NAMES)):
        unit = F.normalize(model.encode_text(*model.tokenizer.encode(prompts)), dim=-1)
        assert torch.allclose(weights[c], F.normalize(unit.mean(0), dim=0), atol=1e-6)
    # Image embeddings built to match: the words of the true class, plus noise.
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(len(CLASS_NAMES)).repeat(3)
    img = torch.stack([model.embed_words(CLASS_NAMES[c].replace("_", " ")) for c in labels.tolist()])
    img = img + 0.1 * torch.randn(img.shape, generator=gen)
    pred = zero_shot_logits(img, weights).argmax(dim=1)
    assert torch.equal(pred, labels)
    # Shuffling the class order shuffles the predictions the same way.
    order = [3, 0, 5, 1, 4, 2]
    shuffled = zero_shot_weights(model, model.tokenizer, [CLASS_NAMES[k] for k in order])
    pred2 = zero_shot_logits(img, shuffled).argmax(dim=1)
    assert torch.equal(torch.tensor(order)[pred2], labels)


def test_captions_are_checked_in_the_loader_and_their_truncation_counted():
    from navit.tasks import get_task

    task = get_task("contrastive", {"text_max_len": 64}, ["a", "b"])
    # A lone surrogate (from a broken file name or JSON escape) fails in the loader's targets, where
    # the item is skipped and counted, not in the middle of a step.
    with pytest.raises(ValueError, match=r"caption 'bad \\ud83d' is not valid Unicode text"):
        task.targets({"caption": "bad \ud83d"})
    broken = SyntheticShapes(4)
    broken.class_names = ["fine", "bad \udcff"]
    with pytest.raises(ValueError, match=r"class name of data 'x' 'bad \\udcff' is not valid Unicode"):
        task.check_data(broken, "x")
    model, (batch, captions) = tiny(), synthetic_pairs(4)
    long = [caption + " and a very long tail" * 4 for caption in captions[:3]] + captions[3:]
    task.loss(model, model, batch, {"caption": long})
    task.loss(model, model, batch, {"caption": captions})
    assert task.counts() == {"truncated_captions": 3}


def test_zero_shot_prompts_cut_by_the_text_length_are_reported():
    model = tiny()
    tokenizer = ByteTokenizer(max_len=model.config.text_max_len)
    names = ["terrier with a brindle and white coat, seen from the side, adult", "terrier with a brindle and white "
             "coat, seen from the side, puppy"]  # fmt: skip
    with pytest.warns(UserWarning, match=r"2 of 2 zero-shot prompts are longer than the text tower's 64 tokens"):
        weights = zero_shot_weights(model, tokenizer, names, templates=["a photo of a {}."])
    assert torch.equal(weights[0], weights[1]), "what the warning is about"
