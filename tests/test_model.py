"""The NaViT model API: presets, outputs in input order, padding, training, stochastic depth."""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import PATCH, assert_rel_close, image_of_slot, random_images, tiny_config, tiny_model

from navit import NaViT, NaViTConfig, create_model, list_models, pack, pack_images
from navit.model import drop_path, example_ids
from navit.patchify import image_to_example
from navit.pooling import MAPPool

SIZES = [(16, 24), (24, 24), (8, 32), (32, 16), (16, 16), (24, 8)]


def batch_of(sizes=SIZES, seq_len=24, seed=0, **kwargs):
    return pack_images(random_images(sizes, seed=seed), PATCH, seq_len, **kwargs)


# --------------------------------------------------------------------------------------------
# Presets and configuration.


def test_presets_cover_every_size_and_patch():
    names = list_models()
    assert names == sorted(f"navit_{size}{patch}" for size in ("mini", "ti", "s", "b", "l") for patch in (16, 32))


@pytest.mark.parametrize("name", list_models())
def test_every_preset_builds_and_classifies(name):
    # The mini and Ti presets are built at full depth; the others with one block to stay fast.
    full = name.startswith(("navit_ti", "navit_mini"))
    model = create_model(name, num_classes=10, **({} if full else {"depth": 1})).eval()
    patch = int(name.removeprefix("navit_").lstrip("mintisbl"))
    assert model.config.patch_size == patch
    assert len(model.blocks) == (model.config.depth if full else 1)
    if name.startswith("navit_ti"):
        assert model.config.depth == 12
    batch = pack_images(random_images([(patch, 2 * patch), (patch, patch)]), patch, 4)
    with torch.no_grad():
        logits = model(batch)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_larger_presets_are_wider():
    widths = [create_model(f"navit_{size}16", depth=1, num_classes=0).num_features for size in ("ti", "s", "b", "l")]
    assert widths == sorted(set(widths))


def test_create_model_accepts_a_config_and_overrides():
    config = tiny_config(num_classes=5)
    model = create_model(config, num_classes=3, pool="mean")
    assert isinstance(model, NaViT)
    assert model.config == dataclasses.replace(config, num_classes=3, pool="mean")
    assert config.num_classes == 5, "the caller's config is not modified"
    assert model.head.out_features == 3
    assert create_model(config).config == config
    preset = create_model("navit_ti16", depth=2, num_classes=4)
    assert (preset.config.embed_dim, preset.config.depth, preset.head.out_features) == (192, 2, 4)


def test_config_round_trips_through_a_dict():
    config = tiny_config(rope=True, pos_combine="stack")
    assert NaViTConfig.from_dict(config.to_dict()) == config


def test_num_classes_zero_gives_features():
    model = tiny_model(num_classes=0)
    batch = batch_of()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model.embed(batch))


# --------------------------------------------------------------------------------------------
# Outputs.


@pytest.mark.parametrize("pool", ["map", "mean"])
def test_output_shapes_and_padding(pool):
    model = tiny_model(pool=pool)
    batch = batch_of(max_examples_per_seq=4)
    assert not batch.token_mask.all(), "the batch should contain padding"
    with torch.no_grad():
        features = model.forward_features(batch)
        embeddings = model.embed(batch)
        logits = model(batch)
    n, d = len(SIZES), model.config.embed_dim
    assert features.shape == (batch.num_seqs, batch.seq_len, d)
    assert (features[~batch.token_mask] == 0).all()
    assert (features[batch.token_mask].norm(dim=-1) > 0).all()
    assert embeddings.shape == (n, d)
    assert logits.shape == (n, model.config.num_classes)
    torch.testing.assert_close(model.head(embeddings), logits)
    slots = model.pool_slots(features, batch)
    assert slots.shape == (batch.num_seqs, 4, d)
    empty = batch.slot_to_example == -1
    assert empty.any() and (slots[empty] == 0).all()


def test_mean_pool_averages_each_images_tokens():
    model = tiny_model(pool="mean")
    batch = batch_of()
    with torch.no_grad():
        features = model.forward_features(batch)
        embeddings = model.embed(batch)
    owner = image_of_slot(batch)
    for j in range(batch.num_examples):
        torch.testing.assert_close(embeddings[j], features[owner == j].mean(0))


@pytest.mark.parametrize("strategy, pos_embed", [("first_fit", "learned"), ("first_fit_decreasing", "learned"),
                                                ("first_fit", "table"), ("first_fit", "grid")])
def test_outputs_follow_input_order(strategy, pos_embed):
    model = tiny_model(pos_embed=pos_embed)
    images = random_images(SIZES, seed=1)
    permutation = [3, 0, 5, 1, 4, 2]
    with torch.no_grad():
        logits = model(pack_images(images, PATCH, 24, strategy=strategy))
        shuffled = model(pack_images([images[i] for i in permutation], PATCH, 24, strategy=strategy))
        alone = torch.cat([model(pack_images([image], PATCH, 24)) for image in images])
    assert_rel_close(shuffled, logits[permutation], 1e-5, "permuted inputs")
    assert_rel_close(logits, alone, 1e-5, "each image alone")


def test_outputs_of_a_batch_with_leftovers_follow_the_packed_images():
    model = tiny_model()
    images = random_images([(16, 16), (24, 24), (8, 24)], seed=2)  # 4, 9, 3 tokens
    tokens = [image_to_example(image, PATCH, 10) for image in images]
    result = pack(tokens, 10, num_seqs=1, max_examples_per_seq=2)
    assert result.packed == [0, 2] and result.leftover == [1]
    with torch.no_grad():
        logits = model(result.batch)
        expected = torch.cat([model(pack_images([images[i]], PATCH, 16)) for i in result.packed])
    assert_rel_close(logits, expected, 1e-5, "logits")


def test_token_dropped_batches_run_with_fractional_positions():
    from navit import TokenDropper

    model = tiny_model(rope=True).train()
    batch = batch_of(token_dropper=TokenDropper(0.5, seed=0))
    logits = model(batch)
    assert logits.shape == (len(SIZES), model.config.num_classes) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------
# Training.


def test_a_few_adamw_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = tiny_model(attn_backend="bucketed", drop_path=0.1).train()
    batch = batch_of(seq_len=32, seed=5)
    labels = torch.arange(len(SIZES)) % model.config.num_classes
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.6 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


def drop_path_context(batch):
    """The two fields of the model's ForwardContext that drop_path reads."""
    example_index, num_ids = example_ids(batch.segment_ids, batch.max_examples_per_seq)
    return SimpleNamespace(example_index=example_index, num_ids=num_ids)


def test_drop_path_drops_whole_images_independently():
    torch.manual_seed(0)
    rate = 0.5
    batch = pack_images(random_images([(8, 8 * (1 + i % 3)) for i in range(400)]), PATCH, 24)
    x = torch.ones(batch.num_seqs, batch.seq_len, 4)
    out = drop_path(x, rate, drop_path_context(batch), training=True)
    owner = image_of_slot(batch)
    kept, mixed_sequence = [], False
    for seq in range(batch.num_seqs):
        states = set()
        for j in owner[seq][batch.token_mask[seq]].unique().tolist():
            values = out[seq][owner[seq] == j].unique()
            assert len(values) == 1, "an image is dropped or kept as a whole"
            assert values.item() in (0.0, 1 / (1 - rate)), "kept images are rescaled by 1/(1 - rate)"
            states.add(values.item() > 0)
            kept.append(values.item() > 0)
        mixed_sequence |= len(states) == 2
    assert mixed_sequence, "images in one sequence are dropped independently"
    kept = torch.tensor(kept, dtype=torch.float64)
    tolerance = 5 * math.sqrt(rate * (1 - rate) / len(kept))
    assert abs(kept.mean().item() - (1 - rate)) <= tolerance


def test_drop_path_is_identity_in_eval_mode_or_at_rate_zero():
    batch = batch_of()
    x = torch.randn(batch.num_seqs, batch.seq_len, 4)
    ctx = drop_path_context(batch)
    assert drop_path(x, 0.5, ctx, training=False) is x
    assert drop_path(x, 0.0, ctx, training=True) is x


def test_model_drop_path_is_random_in_training_and_off_in_eval():
    model = tiny_model(drop_path=0.5)
    reference = tiny_model(drop_path=0.0)
    batch = batch_of()
    with torch.no_grad():
        model.train()
        first, second = model(batch), model(batch)
        assert not torch.allclose(first, second)
        model.eval()
        torch.testing.assert_close(model(batch), reference(batch))
    model.train()
    logits = model(batch)
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------------
# Errors that say what is wrong.


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'navit_xl16'; available: \['navit_b16'"):
        create_model("navit_xl16")


def test_unknown_config_field_in_overrides():
    with pytest.raises(TypeError, match=r"unknown NaViTConfig field\(s\) \['embed_size'\]"):
        create_model("navit_ti16", embed_size=128)


def test_unknown_attention_backend_is_rejected_when_configuring():
    with pytest.raises(ValueError, match=r"NaViTConfig.attn_backend='flash'; expected one of"):
        create_model(tiny_config(), attn_backend="flash")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(pos_embed="rotary"), "NaViTConfig.pos_embed='rotary'"),
        (dict(pool="cls"), "NaViTConfig.pool='cls'"),
        (dict(depth=0), "NaViTConfig.depth must be >= 1, got 0"),
        (dict(embed_dim=30, num_heads=4), "embed_dim=30 is not divisible by num_heads=4"),
        (dict(embed_dim=12, num_heads=4, rope=True), "rope=True over 2 axes needs an even head_dim of at least 4, got 3"),
        (dict(num_axes=2, temporal_patch_size=2), "temporal_patch_size=2 needs a time axis: num_axes=3"),
        (dict(num_axes=3, embed_dim=32, pos_combine="stack"), "needs embed_dim divisible by num_axes=3, got 32"),
        (dict(num_classes=-1), "num_classes must be >= 0"),
        (dict(prefix_tokens=-1), "prefix_tokens must be >= 0"),
        (dict(final_norm="both"), "NaViTConfig.final_norm='both'"),
        (dict(pos_keep_aspect=True), "pos_keep_aspect=True keeps the aspect of the position grid"),
    ],
)
def test_invalid_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_model_takes_only_a_packed_batch():
    model = tiny_model()
    with pytest.raises(TypeError, match="takes a navit.PackedBatch, got Tensor; build one with model.processor"):
        model(torch.randn(2, 3, 16, 16))


def test_patch_dim_mismatch():
    model = tiny_model()  # patch 8, 3 channels: 192 values per patch
    batch = pack_images(random_images([(32, 32)]), 16, 8)
    expected = r"768 values each, but the model expects patch_size=8 with 3 channels \(8x8x3 = 192 values\)"
    with pytest.raises(ValueError, match=expected):
        model(batch)
    grey = pack_images(random_images([(16, 16)], channels=1), PATCH, 8)
    with pytest.raises(ValueError, match="with 3 channels"):
        model(grey)


def test_absolute_positions_beyond_the_table_fail_clearly():
    model = tiny_model(pos_mode="absolute", pos_max_len=4)
    with pytest.raises(ValueError, match="raise pos_max_len or use pos_mode='fractional'"):
        model(pack_images(random_images([(8, 40)]), PATCH, 8))


def textbook_map_pool(pool, tokens, segment_ids, num_slots):
    """MAP pooling as usually written: project every token to keys and values, then softmax over
    each image's tokens, one image at a time."""
    b, _, dim = tokens.shape
    heads, head_dim = pool.num_heads, pool.head_dim
    query = pool.q(pool.probe).view(heads, head_dim)
    out = tokens.new_zeros(b, num_slots, dim)
    for s in range(b):
        for slot in range(num_slots):
            mine = tokens[s, segment_ids[s] == slot]
            if len(mine) == 0:
                continue
            key, value = pool.kv(mine).view(-1, 2, heads, head_dim).unbind(1)
            weights = ((key * query).sum(-1) * head_dim**-0.5).softmax(0)  # [n, H]
            x = pool.proj((weights[..., None] * value).sum(0).reshape(dim))
            out[s, slot] = x + pool.mlp(pool.norm(x))
    return out


def test_map_pool_equals_the_textbook_form_with_gradients():
    torch.manual_seed(0)
    pool = MAPPool(24, num_heads=3, hidden=96)
    with torch.no_grad():  # non-trivial biases, so the key and value bias terms are exercised
        for module in (pool.q, pool.kv, pool.proj):
            module.bias.normal_()
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 1, 1, 1, 1, 1, -1]])
    tokens = torch.randn(2, 8, 24, requires_grad=True)
    fast = pool(tokens, segment_ids, num_slots=4)
    fast_grads = torch.autograd.grad((fast * torch.arange(96.0).view(4, 24)).sum(), [tokens, *pool.parameters()])
    slow = textbook_map_pool(pool, tokens, segment_ids, num_slots=4)
    slow_grads = torch.autograd.grad((slow * torch.arange(96.0).view(4, 24)).sum(), [tokens, *pool.parameters()])
    assert_rel_close(fast, slow, 1e-5, "MAP pool output")
    assert (fast[0, 3] == 0).all() and (fast[1, 2:] == 0).all(), "empty slots must be zero"
    for (name, _), a, b in zip([("tokens", None), *pool.named_parameters()], fast_grads, slow_grads):
        assert_rel_close(a, b, 1e-5, f"gradient of {name}")


# --------------------------------------------------------------------------------------------
# What the training loop asks of a model.


def math_sdpa(q, k, v, attn_mask=None):
    """Attention as plain matmuls, which torch's flop counter sees (its CPU kernel it does not)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~attn_mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("pool", ["map", "mean"])
@pytest.mark.parametrize("num_axes", [2, 3])
def test_flops_match_torch_flop_counter_for_forward_and_training(pool, num_axes, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from navit import Example
    from navit.patchify import grid_coords

    monkeypatch.setattr(F, "scaled_dot_product_attention", math_sdpa)
    model = tiny_model(attn_backend="dense", pool=pool, num_axes=num_axes)
    grids = [(2, 3), (3, 2), (1, 6)] if num_axes == 2 else [(1, 2, 3), (2, 3, 1), (1, 1, 6)]
    # One example per sequence and no padding: dense attention then costs exactly Σ nᵢ².
    examples = [Example(torch.randn(6, model.config.patch_dim), grid_coords(*g), g) for g in grids]
    batch = pack(examples, 6, max_examples_per_seq=1).batch
    with FlopCounterMode(display=False) as forward:
        model(batch)
    with FlopCounterMode(display=False) as training:
        model(batch).sum().backward()
    assert model.flops(batch) == forward.get_total_flops()
    assert model.flops(batch, training=True) == training.get_total_flops()
    # Attention grows with each example's own length, not with the sequence: the same tokens
    # split into twice the examples save half the Σ nᵢ² (3·6² -> 6·3²) in every layer, and pay
    # for three more rows of the head.
    whole = pack(examples, 6, max_examples_per_seq=2).batch
    split = pack([x.select(torch.arange(k, k + 3)) for x in examples for k in (0, 3)], 6, max_examples_per_seq=2).batch
    cfg = model.config
    saved = cfg.depth * 2 * 2 * cfg.embed_dim * (3 * 6**2 - 6 * 3**2) - 2 * 3 * cfg.embed_dim * cfg.num_classes
    assert model.flops(whole) - model.flops(split) == saved


def test_the_model_declares_weight_decay_exclusions_and_fsdp_units():
    model = tiny_model(pos_embed="learned")
    excluded = model.no_weight_decay()
    assert {"pos_embed.axes.0.table", "pos_embed.axes.1.table", "pool.probe", "patch_embed.bias",
            "blocks.0.norm1.weight", "blocks.1.attn.q_norm.bias"} <= excluded  # fmt: skip
    assert not excluded & {"patch_embed.weight", "blocks.0.attn.qkv.weight", "head.weight"}
    assert model.fsdp_units() == list(model.blocks)
    from navit.two_tower import create_image_text_model

    two = create_image_text_model(tiny_config(num_classes=0), text_depth=2)
    assert {"image.pool.probe", "text.pos_embed", "logit_scale"} <= two.no_weight_decay()
    assert "text.blocks.0.qkv.weight" not in two.no_weight_decay()
    assert two.fsdp_units() == [*two.image.blocks, *two.text.blocks]


# Logits of the first two images, recorded with the version of navit that knew only 2-D images
# (commit f95d286): the N-axis generalisation must not change what a still image gives.
BEFORE_AXES = [
    (dict(), [0.04345, -0.2199, -0.09531, 0.03339, 0.06946, 0.04561, 0.08494,
              0.05589, -0.24124, -0.07748, 0.05778, 0.06265, 0.03807, 0.11037]),
    (dict(pos_embed="sincos", pos_mode="absolute", rope=True),
     [-0.00218, 0.03148, -0.12696, 0.00466, -0.14653, -0.18445, -0.09686,
      -0.00213, 0.03631, -0.1262, 0.01242, -0.14404, -0.18241, -0.09723]),
]  # fmt: skip


@pytest.mark.parametrize("config, expected", BEFORE_AXES, ids=["learned-fractional", "sincos-absolute-rope"])
def test_still_images_give_the_same_logits_as_before_the_axes_were_generalised(config, expected):
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=generator) for h, w in [(16, 24), (24, 24), (8, 32), (32, 16)]]
    model = tiny_model(**config)
    with torch.no_grad():
        logits = model(pack_images(images, PATCH, 24))
    torch.testing.assert_close(logits[:2].flatten(), torch.tensor(expected), rtol=0, atol=2e-5)


def test_a_batch_of_other_axes_is_refused():
    from navit import Example
    from navit.patchify import grid_coords

    model = tiny_model()
    clip = Example(torch.randn(4, model.config.patch_dim), grid_coords(1, 2, 2), (1, 2, 2))
    with pytest.raises(ValueError, match="3 coordinate axes, but the model has num_axes=2"):
        model(pack([clip], 8).batch)


# --------------------------------------------------------------------------------------------
# Prefix tokens (class and register tokens) in packed sequences.


def test_prefix_tokens_lead_every_example_and_come_back_out():
    from navit.batch import PAD
    from navit.prefix import PrefixLayout

    segment_ids = torch.tensor([[0, 0, 0, 1, 1, PAD, PAD], [0, 1, 1, 1, 2, 2, PAD]])
    layout = PrefixLayout(segment_ids, num_slots=3, num_prefix=2)
    assert layout.segment_ids.tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 1, 1, PAD, PAD, PAD, PAD],  # slot 2 is empty: its prefix is padding
        [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, PAD],
    ]
    values = torch.arange(1.0, 15.0).view(2, 7, 1)
    prefix = torch.tensor([[100.0], [200.0]], requires_grad=True)
    wide = layout.insert(values, prefix, fill=-1.0)
    assert wide[..., 0].tolist() == [
        [100, 200, 1, 2, 3, 100, 200, 4, 5, 6, 7, -1, -1],  # padding tokens 6, 7 keep their place at the end
        [100, 200, 8, 100, 200, 9, 10, 11, 100, 200, 12, 13, 14],
    ]
    assert torch.equal(layout.restore(wide), values)
    wide.sum().backward()
    assert prefix.grad.flatten().tolist() == [5.0, 5.0], "each prefix vector is used once per example"


def test_prefix_tokens_are_not_rotated(monkeypatch):
    import navit.model
    from navit.posemb import apply_rope
    from navit.prefix import PrefixLayout

    # Dense attention keeps the packed [B, L] order (the bucketed backend reorders by length).
    model = tiny_model(rope=True, prefix_tokens=2, attn_backend="dense")
    seen = []
    monkeypatch.setattr(navit.model, "apply_rope", lambda x, cos, sin: seen.append((cos, sin)) or apply_rope(x, cos, sin))
    batch = batch_of()
    with torch.no_grad():
        model(batch)
    cos, sin = seen[0]
    layout = PrefixLayout(batch.segment_ids, batch.max_examples_per_seq, 2)
    is_prefix = (layout.source >= batch.seq_len) & (layout.source < batch.seq_len + 2)
    assert is_prefix.sum() == 2 * batch.num_examples
    assert (cos[is_prefix] == 1).all() and (sin[is_prefix] == 0).all()
    own_cos, own_sin = model.rope(batch.coords, batch.token_grid_sizes())
    assert torch.equal(layout.restore(cos), own_cos) and torch.equal(layout.restore(sin), own_sin)
    assert own_sin.abs().max() > 0.1, "the example tokens are rotated"


def test_prefix_tokens_and_layer_scale_count_in_flops_and_weight_decay():
    model = tiny_model(prefix_tokens=3, layer_scale=0.1)
    plain = tiny_model()
    batch = batch_of()
    cfg = model.config
    wide_tokens = 3 * batch.slot_to_example.numel()
    lengths = batch.example_lengths().double()
    extra = cfg.depth * (wide_tokens * (4 * cfg.embed_dim**2 + 2 * cfg.embed_dim * cfg.hidden_dim)
                         + 2 * cfg.embed_dim * int(((lengths + 3) ** 2 - lengths**2).sum()))  # fmt: skip
    assert model.flops(batch) - plain.flops(batch) == 2 * extra
    assert {"prefix", "blocks.0.ls1.gamma", "blocks.1.ls2.gamma"} <= model.no_weight_decay()


@pytest.mark.parametrize("pos_embed", ["learned", "sincos", "fourier", "grid", "table"])
def test_a_model_cast_to_bf16_weights_runs_every_position_embedding(pos_embed):
    # Half-precision weights are a supported way to run (the backends read the weights' dtype):
    # positions computed in float32 must meet the embedding's weights in their dtype.
    model = tiny_model(pos_embed=pos_embed)
    batch = pack_images(random_images([(16, 24), (40, 8)], seed=4), PATCH, 32)
    with torch.no_grad():
        expected = model(batch)
        logits = copy.deepcopy(model).bfloat16()(batch)
    assert logits.dtype == torch.bfloat16
    assert_rel_close(logits.float(), expected, 5e-2, f"bf16 weights, {pos_embed} positions")


# --------------------------------------------------------------------------------------------
# Heads: the encoder's outputs, and the head a task composes on them.


def test_state_dict_keys_stay_those_of_the_encoder_its_pooling_and_its_head():
    # Checkpoints and the pretrained key maps rely on these names.
    keys = set(tiny_model(pos_embed="grid").state_dict())
    assert {"patch_embed.weight", "pos_embed.table", "blocks.1.mlp.3.bias", "norm.weight", "pool.probe",
            "pool.kv.weight", "head.weight", "head.bias"} <= keys  # fmt: skip
    assert {k for k in keys if k.startswith("head.")} == {"head.weight", "head.bias"}
    assert not {k for k in tiny_model(num_classes=0).state_dict() if k.startswith("head.")}


def test_a_head_given_as_a_spec_is_the_one_the_config_implies():
    torch.manual_seed(3)
    implied = NaViT(tiny_config(num_classes=5))
    torch.manual_seed(3)
    given = NaViT(tiny_config(num_classes=0), head={"name": "classifier", "num_classes": 5})
    assert given.config.num_classes == 5 and given.head_spec() == {"name": "classifier", "num_classes": 5}
    torch.testing.assert_close(given.state_dict(), implied.state_dict(), rtol=0, atol=0)
    assert implied.head_spec() == implied.head.spec() and NaViT(tiny_config(num_classes=0)).head_spec() is None


def test_unknown_heads_and_bad_head_configs_are_refused():
    with pytest.raises(ValueError, match=r"unknown head 'boxes'; available: \['classifier', 'detector', 'segmenter', 'text-tower'\]"):
        NaViT(tiny_config(), head={"name": "boxes", "num_classes": 2})
    with pytest.raises(ValueError, match=r"unknown HeadConfig field\(s\) \['queries'\]"):
        NaViT(tiny_config(), head={"name": "classifier", "num_classes": 2, "queries": 4})
    with pytest.raises(ValueError, match="num_classes >= 1, got 0"):
        NaViT(tiny_config(), head={"name": "segmenter", "num_classes": 0})
    with pytest.raises(ValueError, match="segmenter head takes images"):
        NaViT(tiny_config(num_axes=3), head={"name": "segmenter", "num_classes": 2})


def test_a_token_head_reads_every_token_and_builds_no_pooling():
    torch.manual_seed(0)
    model = NaViT(tiny_config(pool="map"), head={"name": "segmenter", "num_classes": 3}).eval()
    assert model.pool is None and not any(k.startswith("pool.") for k in model.state_dict())
    batch = batch_of()
    with torch.no_grad():
        features = model.forward_features(batch)
        logits = model(batch)
        outputs = model.outputs(batch)
    b, length = batch.segment_ids.shape
    assert logits.shape == (b, length, PATCH**2, 3)
    expected = (features @ model.head.weight.T + model.head.bias).view(b, length, PATCH**2, 3)
    torch.testing.assert_close(logits, expected)
    assert set(outputs) == {"tokens", "logits"} and torch.equal(outputs["logits"], logits)
    assert torch.equal(model.forward_head(features, batch, pre_logits=True), features)
    with pytest.raises(ValueError, match="'segmenter' head reads per-token features, so it has no pooling"):
        model.embed(batch)
    plain = tiny_model()  # the same encoder with a classifier: the decoder runs on every token instead
    decoder = 2 * batch.segment_ids.numel() * model.config.embed_dim * PATCH**2 * 3
    assert model.flops(batch) - decoder == plain.flops(batch) - plain.head_flops(batch)


def test_outputs_name_the_tokens_the_pooled_vectors_and_the_logits():
    model = tiny_model()
    batch = batch_of()
    with torch.no_grad():
        outputs = model.outputs(batch)
        torch.testing.assert_close(outputs["tokens"], model.forward_features(batch))
        torch.testing.assert_close(outputs["pooled"], model.embed(batch))
        torch.testing.assert_close(outputs["logits"], model(batch))
    assert set(tiny_model(num_classes=0).outputs(batch)) == {"tokens", "pooled"}


def test_reset_head_makes_a_new_head_and_keeps_the_encoder():
    model = tiny_model(num_classes=5)
    batch = batch_of()
    encoder = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    with torch.no_grad():
        embeddings = model.embed(batch)
    torch.manual_seed(1)
    model.reset_head(3)
    assert model.head.out_features == 3 and model.num_classes == model.config.num_classes == 3
    assert model.head_spec() == {"name": "classifier", "num_classes": 3}
    assert 0 < model.head.weight.std() < 0.03 and (model.head.bias == 0).all(), "initialised as in a new model"
    assert any(p is model.head.weight for p in model.parameters()), "the optimizer sees the new head"
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, encoder[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model.head(embeddings))
        model.reset_head(0)  # no head: pooled vectors out
        torch.testing.assert_close(model(batch), embeddings)
    assert model.head_spec() is None and model.config.num_classes == 0
    model.reset_head(4)
    assert model.head.out_features == 4
    half = tiny_model().bfloat16()
    half.reset_head(2)
    assert half.head.weight.dtype == torch.bfloat16


def test_reset_head_keeps_the_kind_of_head():
    model = NaViT(tiny_config(), head={"name": "segmenter", "num_classes": 3})
    model.reset_head(6)
    assert model.head_spec() == {"name": "segmenter", "num_classes": 6} and model.pool is None
    assert model.head.out_features == PATCH**2 * 6
    with pytest.raises(ValueError, match="num_classes >= 1"):
        model.reset_head(0)
