"""timm NaFlexViT: navit reads timm's checkpoints and gives timm's outputs, packed, on every backend.

Two ways of checking, the same comparisons:

- recorded (always runs, CI included): small models saved by timm with timm's patches and outputs
  for a set of images (``tests/fixtures/timm/``, written by ``tests/fixtures/timm_reference.py``);
- live (where timm imports): every registered NaFlexViT, built small by timm, saved and read back,
  and navit's own writes read by timm.
"""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import PARITY_TOLERANCE, packed_outputs, relative
from fixtures import timm_reference as ref
from PIL import Image

import navit
from navit.attention import available_backends
from navit.model import NaViT
from navit.pretrained import load_timm, write_timm

BACKENDS = [*available_backends("cpu"), "flex", "auto"]  # flex: inference on CPU
RECORDED = ref.HERE / "timm"

try:
    importlib.import_module("timm")
    HAS_TIMM = True
except Exception:  # timm needs torchvision, whose wheels here may not import
    HAS_TIMM = False
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm does not import here")


def recorded(case: str):
    from safetensors.torch import load_file

    expected = load_file(RECORDED / case / "expected.safetensors")
    count = len([k for k in expected if k.startswith("image.")])
    pictures = [Image.fromarray(expected[f"image.{i}"].numpy()) for i in range(count)]
    outputs = [{key: expected[f"{key}.{i}"] for key in ("patches", "tokens", "pooled", "logits")} for i in range(count)]
    return pictures, outputs


def load_small(folder, **config) -> NaViT:
    """navit's model of a timm folder, with the references' token budget (and any config change)."""
    model = navit.load_model(folder)
    if config:
        changed = NaViT(model.config.replace(**config), model.processor).eval()
        changed.load_state_dict(model.state_dict())
        model = changed
    model.processor = model.processor.replace(max_tokens=ref.MAX_TOKENS)
    return model


def assert_same_outputs(model: NaViT, pictures, expected) -> None:
    for (tokens, pooled, logits), want in zip(packed_outputs(model, pictures, seq_len=48), expected, strict=True):
        assert tokens.shape == want["tokens"].shape
        for name, value in (("tokens", tokens), ("pooled", pooled), ("logits", logits)):
            error = relative(value, want[name])
            assert error < PARITY_TOLERANCE, f"{name}: relative error {error:.2e}"


def max_error(model: NaViT, pictures, expected) -> float:
    """The largest relative error of any image's token features or pooled vector."""
    return max(max(relative(tokens, want["tokens"]), relative(pooled, want["pooled"]))
               for (tokens, pooled, _), want in zip(packed_outputs(model, pictures, seq_len=48), expected))  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Recorded from timm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ref.RECORDED)
def test_recorded_timm_outputs_are_matched_packed_on_every_backend(case, backend):
    pictures, expected = recorded(case)
    model = load_small(RECORDED / case, attn_backend=backend)
    assert_same_outputs(model, pictures, expected)


@pytest.mark.parametrize("case", ref.RECORDED)
def test_the_processor_gives_timms_evaluation_patches(case):
    pictures, expected = recorded(case)
    model = load_small(RECORDED / case)
    assert model.processor.grid_rule == "fill" and model.processor.reducing_gap is None
    for picture, want in zip(pictures, expected):
        example = model.processor.to_example(picture)
        torch.testing.assert_close(example.patches, want["patches"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ref.RECORDED)
def test_written_folders_hold_timms_names_shapes_and_values(case, tmp_path):
    """What ``write_timm`` writes, checked without timm: the weights file timm saved, key by key,
    and a config that rebuilds the same model, whose outputs are timm's recorded ones."""
    from safetensors.torch import load_file

    model = load_small(RECORDED / case)
    written = write_timm(model, tmp_path / case)
    saved_by_timm, ours = load_file(RECORDED / case / "model.safetensors"), load_file(written / "model.safetensors")
    if "embeds.cls_token" in saved_by_timm:  # navit writes every prefix token as a register token, the class token first
        cls = saved_by_timm.pop("embeds.cls_token")
        saved_by_timm["embeds.reg_token"] = torch.cat([cls, saved_by_timm["embeds.reg_token"]], dim=1)
    assert sorted(ours) == sorted(saved_by_timm)
    for key, value in saved_by_timm.items():
        assert ours[key].shape == value.shape and torch.equal(ours[key], value), key
    hub, timms = (json.loads((folder / "config.json").read_text()) for folder in (written, RECORDED / case))
    assert hub["num_classes"] == timms["num_classes"] and hub["global_pool"] == timms["global_pool"]
    for key in ("mean", "std", "interpolation"):
        assert hub["pretrained_cfg"][key] == timms["pretrained_cfg"][key], key
    again = load_small(written)
    assert again.config == model.config and again.processor == model.processor
    pictures, expected = recorded(case)
    assert_same_outputs(again, pictures, expected)
    # A fine-tuned change survives the trip, in timm's names.
    with torch.no_grad():
        model.blocks[0].mlp[0].weight.add_(0.5)
    changed = load_file(write_timm(model, tmp_path / "changed") / "model.safetensors")
    moved = [key for key in saved_by_timm if not torch.equal(changed[key], saved_by_timm[key])]
    assert moved == ["blocks.0.mlp.fc1.weight"]


def test_every_piece_shows_in_the_outputs():
    """A wrong position grid, norm, activation or prefix moves the outputs far beyond the tolerance."""
    for case, changes in (
        ("par_gap", dict(pos_keep_aspect=False, final_norm="tokens", pos_interp="bilinear", act="gelu_tanh")),
        ("siglip_cls_qknorm", dict(pos_interp="bicubic", final_norm="pooled", act="gelu", pos_keep_aspect=True)),
    ):
        pictures, expected = recorded(case)
        assert max_error(load_small(RECORDED / case), pictures, expected) < PARITY_TOLERANCE
        for field, value in changes.items():
            error = max_error(load_small(RECORDED / case, **{field: value}), pictures, expected)
            assert error > 10 * PARITY_TOLERANCE, f"{case}: {field}={value} would pass unnoticed"
        model = load_small(RECORDED / case)
        with torch.no_grad():
            model.prefix.zero_()
        assert max_error(model, pictures, expected) > 10 * PARITY_TOLERANCE, f"{case}: the prefix tokens do not matter"


def test_a_timm_folder_reads_as_its_architecture():
    model = navit.load_model(RECORDED / "par_gap")
    c = model.config
    assert (c.prefix_tokens, c.pos_keep_aspect, c.final_norm, c.pool, c.pos_interp) == (4, True, "pooled", "mean", "bicubic")
    assert c.layer_scale is not None and c.num_classes == 5 and c.patch_size == 8 and c.pos_grid == 4
    assert model.processor.max_tokens == 576 and model.processor.resample == "bicubic"
    other = navit.load_model(RECORDED / "siglip_cls_qknorm").config
    assert (other.prefix_tokens, other.qk_norm, other.act, other.pool, other.num_classes) == (2, True, "gelu_tanh", "map", 0)


def test_a_bare_weights_file_needs_its_model_name(tmp_path):
    weights = tmp_path / "weights.safetensors"
    shutil.copy(RECORDED / "par_gap" / "model.safetensors", weights)
    with pytest.raises(ValueError, match="needs its model name"):
        load_timm(weights)
    # Its sizes are not the registered model's (patches of 8, not 16): refused, naming the weight.
    with pytest.raises(ValueError, match="'embeds.proj.weight' takes 192 values per patch"):
        navit.load_model(weights, arch="timm/naflexvit_base_patch16_par_gap.e300_s576_in1k")


def test_unsupported_timm_options_and_names_are_refused_by_name(tmp_path):
    config = json.loads((RECORDED / "par_gap" / "config.json").read_text())
    for change, message in (
        (dict(architecture="naflexvit_base_patch16_radio_v3"), "not a timm NaFlexViT model navit reads"),
        (dict(model_args={**config["model_args"], "rope_type": "axial"}), "rope_type='axial'"),
        (dict(model_args={**config["model_args"], "global_pool": "token"}), "global_pool='token'"),
        (dict(model_args={**config["model_args"], "pos_embed": "factorized"}), "pos_embed='factorized'"),
        (dict(model_args={**config["model_args"], "new_thing": 1}), r"\['new_thing'\]"),
        (dict(architecture="naflexvit_base_patch16_parfac_gap"), "pos_embed='factorized'"),
        (dict(pretrained_cfg={**config["pretrained_cfg"], "interpolation": "random"}), "interpolation='random' is not one"),
    ):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        shutil.copytree(RECORDED / "par_gap", folder)
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            navit.load_model(folder)


def test_mismatched_timm_weights_are_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    for change, message in (
        (lambda w: w.update({"blocks.0.mlp.fc2.weight": torch.zeros(3, 3)}), "blocks.0.mlp.fc2.weight"),
        (lambda w: w.update({"embeds.norm.weight": torch.zeros(24)}), "embeds.norm.weight"),
        (lambda w: w.pop("blocks.1.ls2.gamma"), r"lacks weights for \['blocks.1.ls2.gamma'\]"),
    ):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        shutil.copytree(RECORDED / "par_gap", folder)
        weights = load_file(folder / "model.safetensors")
        change(weights)
        save_file(weights, folder / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            navit.load_model(folder)


def test_fine_tuning_a_timm_model_through_the_cli(tmp_path):
    from navit.cli import main
    from navit.inference import load_checkpoint

    folder = RECORDED / "par_gap"
    assert main(["train", "--init-from", str(folder), "--data", "synthetic:40", "--out", str(tmp_path), "--name", "ft",
                 "--max-steps", "2", "--drop", "beta", "--res-mode", "side", "--res-min", "24", "--res-max", "64",
                 "--workers", "0", "--max-tokens", "16", "--seq-len", "64", "--budgets", "--log-every", "1"]) == 0  # fmt: skip
    model, _, meta = load_checkpoint(tmp_path / "ft")
    assert meta["model"]["prefix_tokens"] == 4 and meta["model"]["final_norm"] == "pooled" and model.head.out_features == 6
    assert meta["processor"]["grid_rule"] == "fill" and meta["processor"]["resample"] == "bicubic"
    pretrained = navit.load_model(folder)
    moved = (model.prefix - pretrained.prefix).abs().max()
    assert 0 < moved < 0.1 * pretrained.prefix.abs().max(), "fine-tuned from the weights, not from scratch"


# ------------------------------------------------------------------------------------------------
# Live against timm


@pytest.fixture(scope="module")
def timm_folders(tmp_path_factory):
    """Every case: (the timm model, the folder timm saved it to)."""
    from timm.models._hub import save_for_hf

    out = {}
    for case in ref.CASES:
        model = ref.build(case)
        folder = tmp_path_factory.mktemp(case)
        save_for_hf(model, folder, safe_serialization=True)
        out[case] = model, folder
    return out


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(ref.CASES))
def test_every_registered_naflexvit_matches_timm_packed(timm_folders, case, backend):
    model, folder = timm_folders[case]
    pictures = ref.images(1)
    expected = [ref.reference(model, picture) for picture in pictures]
    ours = load_small(folder, attn_backend=backend)
    assert_same_outputs(ours, [Image.fromarray(p) for p in pictures], expected)
    for picture, want in zip(pictures, expected):
        torch.testing.assert_close(ours.processor.to_example(Image.fromarray(picture)).patches, want["patches"],
                                   rtol=0, atol=1e-6)  # fmt: skip


@needs_timm
@pytest.mark.parametrize("case", ["gap", "siglip_cls_qknorm"])
def test_written_folders_are_read_by_timm_with_the_same_outputs(timm_folders, case, tmp_path):
    import timm

    _, folder = timm_folders[case]
    model = load_small(folder)
    with torch.no_grad():  # a "fine-tuned" change that must survive the trip
        model.blocks[0].mlp[0].weight.add_(0.5)
    written = write_timm(model, tmp_path / case)
    again = timm.create_model(f"local-dir:{written}", pretrained=True).eval()
    pictures = ref.images(2)
    assert_same_outputs(model, [Image.fromarray(p) for p in pictures], [ref.reference(again, p) for p in pictures])
    assert np.isclose(json.loads((written / "config.json").read_text())["model_args"]["mlp_ratio"] * 24, 96.5)


@needs_timm
def test_a_full_size_bare_weights_file_reads_with_its_model_name(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = timm.create_model("naflexvit_base_patch16_gap", pretrained=False).eval()
    save_file(reference.state_dict(), tmp_path / "weights.safetensors")
    model = navit.load_model(tmp_path / "weights.safetensors", arch="naflexvit_base_patch16_gap.e300_s576_in1k")
    assert model.config.embed_dim == 768 and model.config.prefix_tokens == 4 and model.config.num_classes == 1000
    model.processor = model.processor.replace(max_tokens=64)
    pictures = ref.images(3)[:3]
    expected = [ref.reference(reference, picture, max_tokens=64) for picture in pictures]
    outputs = packed_outputs(model, [Image.fromarray(p) for p in pictures], seq_len=128, per_seq=2)
    for (_, _, logits), want in zip(outputs, expected, strict=True):
        assert relative(logits, want["logits"]) < PARITY_TOLERANCE

