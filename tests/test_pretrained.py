"""SigLIP2 NaFlex from Hugging Face: the same outputs as the reference, packed, on every backend.

The reference models are built by ``transformers`` from small configs with random weights, scaled
up so that a wrong piece cannot hide in the tolerance, saved with ``save_pretrained`` and read by
navit from the folder as a user's download would be.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import PARITY_TOLERANCE, packed_outputs, relative, scaled_up
from PIL import Image

import navit
from navit.attention import available_backends
from navit.model import NaViT
from navit.pretrained import load_hf, write_hf
from navit.pretrained.siglip2 import processor_for, text_tower_config, vision_config

transformers = pytest.importorskip("transformers")
from transformers import Siglip2Config, Siglip2Model, Siglip2VisionConfig, Siglip2VisionModel  # noqa: E402
from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil  # noqa: E402

TOLERANCE = PARITY_TOLERANCE
VISION = dict(hidden_size=48, intermediate_size=70, num_hidden_layers=2, num_attention_heads=3, patch_size=8,
              num_patches=16)  # fmt: skip
TEXT = dict(vocab_size=40, hidden_size=48, intermediate_size=56, num_hidden_layers=2, num_attention_heads=3,
            max_position_embeddings=12, projection_size=48, bos_token_id=None, eos_token_id=None, pad_token_id=0)  # fmt: skip
SIZES = [(37, 61), (100, 20), (16, 16), (300, 211), (9, 250), (64, 64), (23, 8), (120, 121)]


def images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("siglip2_vision")
    reference = scaled_up(Siglip2VisionModel(Siglip2VisionConfig(**VISION)))
    reference.save_pretrained(folder)
    Siglip2ImageProcessorPil(patch_size=8, max_num_patches=40).save_pretrained(folder)
    return folder, reference


def reference_outputs(reference, processor, pictures):
    """The reference's per-token features and pooled vector of each image, run one at a time."""
    out = []
    for picture in pictures:
        inputs = processor(images=[picture], return_tensors="pt")
        with torch.no_grad():
            result = reference(**inputs)
        n = int(inputs["pixel_attention_mask"].sum())
        out.append((result.last_hidden_state[0, :n], result.pooler_output[0]))
    return out


def navit_outputs(model: NaViT, pictures, seq_len: int = 80):
    """navit's per-token features and pooled vector of each image, all packed together."""
    return [(tokens, pooled) for tokens, pooled, _ in packed_outputs(model, pictures, seq_len)]


@pytest.fixture(scope="module")
def vision_expected(vision_folder):
    """The reference's outputs on :func:`images`, computed once for the tests that compare with them."""
    folder, reference = vision_folder
    return reference_outputs(reference, Siglip2ImageProcessorPil.from_pretrained(folder), images())


@pytest.mark.parametrize("backend", [*available_backends("cpu"), "flex", "auto"])  # flex: inference on CPU
def test_vision_model_gives_the_references_outputs_packed_on_every_backend(vision_folder, vision_expected, backend):
    folder, _ = vision_folder
    model = load_hf(folder)
    model.config = model.config.replace(attn_backend=backend)
    for (ref_tokens, ref_pooled), (tokens, pooled) in zip(vision_expected, navit_outputs(model, images())):
        assert tokens.shape == ref_tokens.shape
        assert relative(tokens, ref_tokens) < TOLERANCE and relative(pooled, ref_pooled) < TOLERANCE


def test_the_processor_gives_the_reference_processors_patches(vision_folder):
    folder, _ = vision_folder
    model = navit.load_model(folder)
    reference = Siglip2ImageProcessorPil.from_pretrained(folder)
    odd = images(1) + [Image.new("L", (70, 30), 90), Image.new("RGB", (2000, 9), (5, 90, 200)), Image.new("RGB", (3, 3))]
    for picture in odd:
        expected = reference(images=[picture], do_convert_rgb=True, return_tensors="pt")
        n = int(expected["pixel_attention_mask"].sum())
        example = model.processor.to_example(picture)
        assert example.grid == tuple(expected["spatial_shapes"][0].tolist())
        torch.testing.assert_close(example.patches, expected["pixel_values"][0, :n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("settings", [dict(do_normalize=False), dict(rescale_factor=1 / 127.5), dict(do_rescale=False),
                                      dict(resample=5), dict(resample=0), dict(image_mean=0.25, image_std=0.75)],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))  # fmt: skip
def test_every_preprocessor_setting_is_followed(vision_folder, tmp_path, settings):
    # Rescaling and normalisation fold into navit's mean and std; Hamming is PIL's filter 5; a
    # scalar mean and std hold for every channel. None of them may fall back to the defaults.
    folder, _ = vision_folder
    Siglip2ImageProcessorPil(patch_size=8, max_num_patches=40, **settings).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    processor = processor_for(load_hf(folder).config, tmp_path)
    reference = Siglip2ImageProcessorPil.from_pretrained(tmp_path)
    default = processor_for(load_hf(folder).config, folder)
    for picture in images(2)[:3]:
        expected = reference(images=[picture], return_tensors="pt")
        n = int(expected["pixel_attention_mask"].sum())
        torch.testing.assert_close(processor.to_example(picture).patches, expected["pixel_values"][0, :n], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(default.to_example(picture).patches, expected["pixel_values"][0, :n], atol=1e-3)


def test_settings_and_configs_navit_cannot_follow_are_refused_by_name(vision_folder, two_tower_folder, tmp_path):
    folder, _ = vision_folder
    config = load_hf(folder).config
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_resize": False}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: do_resize=False is not supported"):
        processor_for(config, tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(ValueError, match=r"image_mean=\[0.5, 0.5\] has 2 values for a 3-channel model"):
        processor_for(config, tmp_path)
    hf = json.loads((two_tower_folder[0] / "config.json").read_text())
    hf["text_config"]["hidden_act"] = "quick_gelu"
    with pytest.raises(ValueError, match="SigLIP2 text hidden_act='quick_gelu' is not one of"):
        text_tower_config(hf)
    with pytest.raises(ValueError, match="num_patches=250 is not a square"):
        vision_config({**VISION, "num_patches": 250})
    four = NaViT(config.replace(in_chans=4), processor_for(config.replace(in_chans=4), folder))
    assert four.processor is None, "no processor feeds 4 channels: the model loads without one"
    written = write_hf(four, tmp_path / "four")
    assert not (written / "preprocessor_config.json").exists()
    assert load_hf(written).config == four.config


def test_a_wrong_piece_does_not_hide_in_the_tolerance(vision_folder, vision_expected):
    folder, _ = vision_folder
    model = load_hf(folder)
    expected = vision_expected
    for field, value in (("act", "gelu"), ("pos_interp", "bicubic")):
        wrong = NaViT(model.config.replace(**{field: value}), model.processor).eval()
        wrong.load_state_dict(model.state_dict())
        errors = [relative(pooled, ref) for (_, ref), (_, pooled) in zip(expected, navit_outputs(wrong, images()))]
        assert max(errors) > 10 * TOLERANCE, f"{field}={value} would pass unnoticed"


def tokenizer_files(folder) -> None:
    """A small word-level tokenizer, saved in the Hugging Face layout (tests need no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "a", "photo", "of", "picture", "an", "image", "tall", "wide", "round", "square",
             "ellipse", "rectangle", "."]  # fmt: skip
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="module")
def two_tower_folder(tmp_path_factory):
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("siglip2")
    config = Siglip2Config(text_config=TEXT, vision_config=VISION)
    reference = scaled_up(Siglip2Model(config), seed=1)
    reference.save_pretrained(folder)
    Siglip2ImageProcessorPil(patch_size=8, max_num_patches=40).save_pretrained(folder)
    tokenizer_files(folder)
    return folder, reference


def test_two_tower_model_gives_the_references_embeddings_and_logits(two_tower_folder):
    folder, reference = two_tower_folder
    model = load_hf(folder)
    assert model.config.text_pool == "last" and not model.config.image_proj
    tokenizer = model.tokenizer()
    ids, mask = tokenizer.encode(["a photo of a tall ellipse .", "an image of a wide rectangle", "square"])
    assert ids.shape == (3, 12) and tokenizer.last_num_truncated == 0
    tokenizer.encode(["a photo of a tall ellipse . a photo of a wide rectangle .", "square"])
    assert tokenizer.last_num_truncated == 1, "cut at 12 tokens, and counted as the byte tokenizer counts"
    processor = Siglip2ImageProcessorPil.from_pretrained(folder)
    pictures = images(2)[:4]
    inputs = processor(images=pictures, return_tensors="pt")
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask.long(), **inputs)
        batch = model.processor(pictures, seq_len=80, max_examples_per_seq=4)
        img, txt = model(batch, ids, mask)
        logits = model.logits(img, txt)
    assert relative(img, expected.image_embeds) < TOLERANCE
    assert relative(txt, expected.text_embeds) < TOLERANCE
    assert relative(logits, expected.logits_per_image) < TOLERANCE
    # Zero-shot over class names, through the same tokenizer and the learned scale and bias.
    classifier = navit.zeroshot.ZeroShotClassifier(model, tokenizer, ["tall_ellipse", "wide_rectangle"])
    with torch.no_grad():
        assert classifier(batch).shape == (4, 2)


def test_the_two_tower_model_is_the_encoder_with_a_text_tower_head_saved_as_any_model(two_tower_folder, tmp_path):
    """SigLIP2's text model, its biased text head, no image projection and the sigmoid loss's
    scalars are one ``text-tower`` head; a navit checkpoint of it loads back through the path
    every model takes."""
    from navit.inference import load_checkpoint

    folder, _ = two_tower_folder
    model = load_hf(folder)
    spec = model.head_spec()
    assert spec["name"] == "text-tower" and spec["text_pool"] == "last"
    assert spec["text_proj_bias"] and not spec["image_proj"] and spec["loss"] == "sigmoid"
    assert model.to_dict() == model.image.to_dict() and model.image.head_spec() is None
    navit.save_model(model, tmp_path / "ckpt", class_names=["a", "b"])
    loaded, task, meta = load_checkpoint(tmp_path / "ckpt")
    assert task.name == "contrastive" and meta["head"] == spec and loaded.head_spec() == spec
    for (key, a), (other, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert key == other and torch.equal(a, b), key
    batch = model.processor(images(2)[:2], seq_len=80)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(batch), model.encode_image(batch), rtol=0, atol=0)


def test_saving_back_in_the_hugging_face_layout_round_trips(vision_folder, two_tower_folder, tmp_path):
    pictures = images(3)[:4]
    for (folder, reference), cls in ((vision_folder, Siglip2VisionModel), (two_tower_folder, Siglip2Model)):
        model = load_hf(folder)
        with torch.no_grad():  # a "fine-tuned" change that must survive the trip
            next(model.parameters()).add_(0.5)
        out = write_hf(model, tmp_path / cls.__name__)
        again = cls.from_pretrained(out).eval()
        assert set(again.state_dict()) == set(reference.state_dict())
        # What transformers reads back computes what the navit model computes, with the
        # preprocessing written beside it.
        inputs = Siglip2ImageProcessorPil.from_pretrained(out)(images=pictures, return_tensors="pt")
        batch = model.processor(pictures, seq_len=80, max_examples_per_seq=4)
        with torch.no_grad():
            if cls is Siglip2VisionModel:
                pooled = [p for _, p in navit_outputs(model, pictures)]
                assert relative(torch.stack(pooled), again(**inputs).pooler_output) < TOLERANCE
            else:
                ids, mask = model.tokenizer().encode(["a photo of a tall ellipse .", "square", "an image"])
                expected = again(input_ids=ids, attention_mask=mask.long(), **inputs)
                img, txt = model(batch, ids, mask)
                assert relative(img, expected.image_embeds) < TOLERANCE
                assert relative(txt, expected.text_embeds) < TOLERANCE
                assert relative(model.logits(img, txt), expected.logits_per_image) < TOLERANCE
        ours = load_hf(out)
        for (key, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(ours.state_dict().items())):
            assert torch.equal(a, b), key
        assert json.loads((out / "preprocessor_config.json").read_text())["max_num_patches"] == 40
    # The two-tower folder carries its tokenizer and the token ids it uses.
    tokenizer = ours.tokenizer()
    assert tokenizer.encode(["a photo of a cat"])[0].tolist() == model.tokenizer().encode(["a photo of a cat"])[0].tolist()
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["pad_token_id"], text["eos_token_id"]) == (tokenizer.tokenizer.pad_token_id, tokenizer.tokenizer.eos_token_id)
    # The weights file of a pretrained folder reads as its folder.
    assert isinstance(navit.load_model(out / "model.safetensors"), type(ours))


def test_a_folder_without_its_preprocessor_config_warns_and_a_wrong_patch_size_is_refused(vision_folder, tmp_path):
    folder, _ = vision_folder
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    with pytest.warns(UserWarning, match=rf"{bare} has no preprocessor_config.json: using SigLIP2's default"):
        model = load_hf(bare)
    assert model.processor.max_tokens == 256 and model.processor.resample == "bilinear"
    Siglip2ImageProcessorPil(patch_size=16, max_num_patches=40).save_pretrained(bare)
    with pytest.raises(ValueError, match=r"preprocessor_config.json: patch_size=16 does not match config.json's patch_size=8"):
        load_hf(bare)


def test_mismatched_weights_are_refused_by_name(vision_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = vision_folder
    for change, message in (
        (lambda w: w.update({"encoder.layers.0.mlp.fc1.weight": torch.zeros(3, 3)}), "encoder.layers.0.mlp.fc1.weight"),
        (lambda w: w.update({"extra.weight": torch.zeros(1)}), "'extra.weight' has no counterpart"),
        (lambda w: w.pop("post_layernorm.bias"), r"lacks weights for \['norm.bias'\]"),
        (lambda w: w.pop("encoder.layers.1.self_attn.k_proj.bias"), "has no 'encoder.layers.1.self_attn.k_proj.bias' to fuse"),
        (lambda w: w.update({"embeddings.position_embedding.weight": torch.zeros(9, 48)}), "has 9 positions; config.json's num_patches=16"),
    ):
        broken = tmp_path / message[:8].strip("'\\[")
        broken.mkdir()
        (broken / "config.json").write_text((folder / "config.json").read_text())
        weights = {k.removeprefix("vision_model."): v for k, v in load_file(folder / "model.safetensors").items()}
        change(weights)
        save_file(weights, broken / "model.safetensors")
        with pytest.raises(ValueError, match=f"{broken}: .*{message}"):
            load_hf(broken)


def test_fine_tuning_a_pretrained_model_through_the_cli(vision_folder, tmp_path):
    from navit.cli import main
    from navit.inference import load_checkpoint

    folder, _ = vision_folder
    assert main(["train", "--init-from", str(folder), "--data", "synthetic:40", "--out", str(tmp_path), "--name", "ft",
                 "--max-steps", "2", "--drop", "beta", "--res-mode", "side", "--res-min", "24", "--res-max", "64",
                 "--workers", "0", "--max-tokens", "16", "--seq-len", "64", "--budgets", "--log-every", "1"]) == 0  # fmt: skip
    model, _, meta = load_checkpoint(tmp_path / "ft")
    assert meta["model"]["pos_embed"] == "grid" and meta["model"]["mlp_dim"] == 70 and model.head.out_features == 6
    assert meta["processor"]["grid_rule"] == "fill" and meta["processor"]["max_tokens"] == 16
    pretrained = load_hf(folder)
    moved = (model.blocks[0].attn.qkv.weight - pretrained.blocks[0].attn.qkv.weight).abs().max()
    assert 0 < moved < 0.1 * pretrained.blocks[0].attn.qkv.weight.abs().max(), "fine-tuned from the weights, not from scratch"
