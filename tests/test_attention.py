"""Masked attention: no token sees another image or padding, whatever the backend.

The core invariant of Patch n' Pack is isolation: an image's logits and the gradients with respect
to its pixels do not depend on which images it is packed with. Every backend must also agree with
the dense reference.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil

import pytest
import torch
from conftest import PATCH, assert_rel_close, labelled_image, random_images, tiny_model, with_backend
from hypothesis import given, settings
from hypothesis import strategies as st

import navit.attention.bucketed as bucketed
import navit.model
import navit.attention.flex as flex
import navit.attention.varlen as varlen
from navit import pack, pack_images
from navit.attention import BACKENDS, CPU_DENSE_ABOVE, Situation, auto_backend, available_backends, choose, get_backend
from navit.attention.base import HALF_DTYPES
from navit.attention.bucketed import BucketedBackend, matmul_attention
from navit.attention.varlen import VarlenBackend
from navit.batch import PAD
from navit.batch import Example
from navit.patchify import grid_coords, image_to_example

CPU_BACKENDS = available_backends("cpu")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# The studied image (index TARGET, a 2x3 patch grid) shares its sequence with three others.
SIZES = [(24, 24), (16, 24), (8, 32), (16, 16), (32, 32)]
TARGET = 1
PACKED_LEN, ALONE_LEN = 24, 8
ISOLATION_CONFIGS = [
    dict(pool=pool, rope=rope, pos_embed=pos_embed, pos_mode=pos_mode)
    for pool in ("map", "mean")
    for rope in (False, True)
    for pos_embed, pos_mode in (("learned", "fractional"), ("sincos", "absolute"))
] + [  # timm NaFlexViT's pieces: register tokens, layer scale, the norm after pooling, its position grid
    dict(pool="mean", prefix_tokens=2, layer_scale=0.5, final_norm="pooled", pos_embed="grid", pos_interp="bicubic",
         pos_keep_aspect=True),
    dict(pool="map", prefix_tokens=3, rope=True, pos_embed="learned", pos_mode="fractional"),
]  # fmt: skip


def config_id(config):
    return "-".join(f"{k}={v}" for k, v in config.items())


# --------------------------------------------------------------------------------------------
# Backend-level checks against a naive per-image attention.


def reference_attention(q, k, v, segment_ids):
    """Softmax attention computed image by image: the definition of masked packed attention."""
    out = torch.zeros_like(q)
    for seq in range(q.shape[0]):
        for slot in segment_ids[seq].unique().tolist():
            if slot == PAD:
                continue
            idx = torch.nonzero(segment_ids[seq] == slot).squeeze(1)
            qs, ks, vs = (t[seq, idx].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
            weights = torch.softmax(qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
            out[seq, idx] = (weights @ vs).transpose(0, 1)
    return out


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=12),
    max_images=st.none() | st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "bucketed-dense-fallback"])
def test_backend_matches_per_image_attention(backend, lengths, max_images, seed):
    batch = pack([labelled_image(i, n) for i, n in enumerate(lengths)], 20, max_examples_per_seq=max_images).batch
    generator = torch.Generator().manual_seed(seed)
    b, length = batch.segment_ids.shape
    q, k, v = torch.randn(3, b, length, 2, 8, generator=generator, dtype=torch.float64)
    if backend == "bucketed-dense-fallback":  # the adaptive plan's dense branch, forced
        attention = BucketedBackend(dense_above=0.0)
        assert attention.prepare(batch.segment_ids).dense_mask is not None
    else:
        attention = get_backend(backend)
    out = attention.attend(q, k, v, attention.prepare(batch.segment_ids))
    assert out.shape == q.shape
    real = batch.token_mask
    expected = reference_attention(q, k, v, batch.segment_ids)
    torch.testing.assert_close(out[real], expected[real], rtol=1e-10, atol=1e-10)
    assert torch.isfinite(out).all(), "padding must not produce NaNs"


@pytest.mark.parametrize("masked", [False, True])
def test_matmul_attention_is_exact_softmax_attention(masked):
    generator = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 4, 2, 9, 8, generator=generator, dtype=torch.float64)
    key_mask = torch.rand(4, 1, 1, 9, generator=generator) < 0.6 if masked else None
    if masked:
        key_mask[..., 0] = True  # every row keeps a real key, as in a bucket
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    torch.testing.assert_close(matmul_attention(q, k, v, key_mask), expected, rtol=1e-12, atol=1e-12)


def spy_on_matmul_attention(monkeypatch) -> list[int]:
    """The lengths of the buckets that take the matmul path, as they come."""
    lengths = []

    def spy(q, *rest):
        lengths.append(q.shape[-2])
        return matmul_attention(q, *rest)

    monkeypatch.setattr(bucketed, "matmul_attention", spy)
    return lengths


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bucketed_half_precision_uses_matmul_attention_within_half_precision_error(dtype, monkeypatch):
    calls = spy_on_matmul_attention(monkeypatch)
    batch = pack([labelled_image(i, n) for i, n in enumerate([17, 5, 12, 30, 3, 9, 24])], 32).batch
    generator = torch.Generator().manual_seed(0)
    exact = torch.randn(3, *batch.segment_ids.shape, 2, 16, generator=generator, dtype=torch.float64)
    q, k, v = (t.to(dtype).requires_grad_() for t in exact)
    attention = BucketedBackend()
    out = attention.attend(q, k, v, attention.prepare(batch.segment_ids))
    assert out.dtype == dtype and calls, "half precision on CPU takes the matmul path"
    real = batch.token_mask
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64) * real[..., None, None]
    out.backward(grad_out.to(dtype))
    # The reference sees the same rounded inputs, in float64, image by image.
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*ref_inputs, batch.segment_ids)
    expected.backward(grad_out)
    pairs = [("out", out, expected), *zip("qkv", (q.grad, k.grad, v.grad), (t.grad for t in ref_inputs))]
    for name, got, want in pairs:
        error = (got[real].double() - want[real]).norm() / want[real].norm()
        assert error < 2e-2, f"{dtype} {name}: relative error {error:.3g}"
    assert torch.isfinite(out).all()


def test_bucketed_takes_the_matmul_path_only_for_short_half_precision_buckets(monkeypatch):
    lengths = spy_on_matmul_attention(monkeypatch)
    batch = pack([labelled_image(i, n) for i, n in enumerate([20, 7])], 32).batch  # two buckets
    attention = BucketedBackend(matmul_max_len=8)
    q = torch.randn(*batch.segment_ids.shape, 2, 8)
    attention.attend(q, q, q, attention.prepare(batch.segment_ids))
    assert lengths == [], "fp32 keeps the flash kernel"
    half = q.bfloat16()
    attention.attend(half, half, half, attention.prepare(batch.segment_ids))
    assert lengths == [7], "only the bucket within matmul_max_len"


def test_backend_registry_on_cpu():
    assert CPU_BACKENDS[:2] == ["dense", "bucketed"]
    if not CUDA:
        assert CPU_BACKENDS == ["dense", "bucketed"]
    assert isinstance(auto_backend(torch.device("cpu"), half_precision=False), BucketedBackend)
    # In fp32 the bucketed plan may switch to one dense call; in half precision buckets always won.
    assert auto_backend(torch.device("cpu"), half_precision=False).dense_above is not None
    assert auto_backend(torch.device("cpu"), half_precision=True).dense_above is None
    assert set(BACKENDS) == {"dense", "bucketed", "varlen", "flex"}
    with pytest.raises(ValueError, match="unknown attention backend 'sparse'"):
        get_backend("sparse")


def test_the_dense_switch_is_for_gathered_calls_only():
    # One long image and a short one per row: the buckets' scores are over 0.3 of the dense ones,
    # so a per-call plan switches to one dense call; a model in slot order keeps its buckets,
    # where the dense call would also run every layer on the padding (benchmarks/dense_switch.py).
    segment_ids = torch.tensor([[0] * 200 + [1] * 20 + [PAD] * 36, [0] * 150 + [PAD] * 106])
    backend = auto_backend(torch.device("cpu"), half_precision=False)
    assert backend.prepare(segment_ids).dense_mask is not None
    plan = backend.prepare_slots(segment_ids)
    assert plan.in_slot_order and sorted(b.size for b in plan.buckets) == [(1, 20), (1, 150), (1, 200)]


@pytest.mark.parametrize("has_varlen", [True, False])
@pytest.mark.parametrize("has_flex", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("grad", [True, False])
def test_auto_routing_on_cuda(dtype, grad, has_flex, has_varlen, monkeypatch):
    # The decision alone (no kernel runs): varlen needs half precision, flex serves fp32 and any
    # build without varlen, dense is the last resort.
    monkeypatch.setattr(varlen, "available", lambda: has_varlen)
    monkeypatch.setattr(flex, "available", lambda: has_flex)
    chosen = choose("auto", Situation(torch.device("cuda"), dtype, grad)).name
    half = dtype != torch.float32
    expected = "varlen" if half and has_varlen else "flex" if has_flex else "dense"
    assert chosen == expected
    assert auto_backend(torch.device("cuda"), half_precision=half).name == expected


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_auto_routing_on_cpu(dtype, grad):
    # Buckets, in fp32 and fp64 with the switch to one dense call, in half precision without it;
    # flex fits CPU inference but auto leaves it to CUDA.
    backend = choose("auto", Situation(torch.device("cpu"), dtype, grad))
    assert isinstance(backend, BucketedBackend)
    assert backend.dense_above == (None if dtype in HALF_DTYPES else CPU_DENSE_ABOVE)


@pytest.mark.parametrize(
    "name, situation, reason",
    [
        ("flex", ("cpu", torch.float32, True), "it has no backward on cpu"),
        ("varlen", ("cpu", torch.bfloat16, False), "it runs on cuda only"),
        ("varlen", ("cuda", torch.float32, False), "it takes float16 / bfloat16 only"),
    ],
)
def test_a_backend_named_where_it_cannot_run_says_why_and_what_would(name, situation, reason, monkeypatch):
    monkeypatch.setattr(varlen, "available", lambda: True)  # the kernel is there; the situation is not
    device, dtype, grad = situation
    with pytest.raises(RuntimeError) as error:
        choose(name, Situation(torch.device(device), dtype, grad))
    message = str(error.value)
    assert message.startswith(f"attention backend {name!r} cannot run here ({device}, ")
    assert reason in message and "use attn_backend='auto' or one of ['dense', 'bucketed'" in message


# --------------------------------------------------------------------------------------------
# Model-level isolation.


def logits_and_pixel_grads(model, images, seq_len, weights, device="cpu", autocast_dtype=None):
    """Logits of ``images`` packed together, and d(sum(weights · logits)) / d(pixels) per image."""
    leaves = [image.clone().requires_grad_() for image in images]
    batch = pack_images(leaves, PATCH, seq_len).to(device)
    half = autocast_dtype is not None
    with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.bfloat16, enabled=half):
        logits = model(batch)
    (logits.float() * weights.to(device)).sum().backward()
    return logits.detach().float().cpu(), [leaf.grad for leaf in leaves], batch


def isolation_results(model, device="cpu", autocast_dtype=None, alone_model=None):
    """(packed logits, packed pixel grads, alone logits, alone pixel grads) of the TARGET image."""
    images = random_images(SIZES, seed=1)
    weights = torch.randn(len(SIZES), model.config.num_classes, generator=torch.Generator().manual_seed(2))
    logits, grads, batch = logits_and_pixel_grads(model, images, PACKED_LEN, weights, device, autocast_dtype)
    # The test is only meaningful if the target really shares its sequence.
    seq = int(batch.example_slots()[TARGET]) // batch.max_examples_per_seq
    assert int((batch.slot_to_example[seq] != PAD).sum()) >= 3
    alone_logits, alone_grads, alone = logits_and_pixel_grads(
        alone_model or model, [images[TARGET]], ALONE_LEN, weights[TARGET : TARGET + 1], device
    )
    assert alone.num_seqs == 1 and not alone.token_mask.all(), "alone, the target sits next to padding"
    return logits[TARGET], grads[TARGET], alone_logits[0], alone_grads[0], logits


def check_isolation(model, device="cpu", rtol=1e-5):
    packed, packed_grad, alone, alone_grad, all_logits = isolation_results(model, device)
    # Non-trivial logits: the head is not zero and images get clearly different outputs.
    assert model.head.weight.abs().max() > 0
    assert (all_logits[0] - all_logits[TARGET]).abs().max() > 1e-2 * all_logits.abs().max()
    assert_rel_close(packed, alone, rtol, "logits")
    assert_rel_close(packed_grad, alone_grad, rtol, "pixel gradients")


@pytest.mark.parametrize("config", ISOLATION_CONFIGS, ids=config_id)
@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "auto"])
def test_an_image_is_unaffected_by_the_images_packed_with_it(backend, config):
    check_isolation(tiny_model(attn_backend=backend, **config))


@pytest.mark.parametrize("config", ISOLATION_CONFIGS[:4], ids=config_id)
def test_isolation_in_bf16_on_cpu_against_dense_fp32(config):
    dense = tiny_model(attn_backend="dense", **config)
    auto = with_backend(dense, "auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        backend = auto.attention_backend(torch.device("cpu"))
    assert isinstance(backend, BucketedBackend) and backend.dense_above is None, "CPU autocast counts as half"
    # Packed with others in bf16 (matmul attention per bucket) vs alone through dense fp32.
    packed, packed_grad, alone, alone_grad, _ = isolation_results(
        auto, autocast_dtype=torch.bfloat16, alone_model=dense
    )
    assert_rel_close(packed, alone, 5e-2, "bf16 bucketed logits")
    cosine = torch.nn.functional.cosine_similarity(packed_grad.flatten(), alone_grad.flatten(), dim=0)
    assert cosine > 0.98, f"bf16 bucketed pixel gradients: cosine {cosine:.4f}"


AXIS_GRIDS = {
    1: [(9,), (5,), (7,), (3,), (12,)],
    2: [(3, 3), (2, 3), (1, 4), (2, 2), (4, 3)],
    3: [(2, 2, 2), (1, 2, 3), (3, 1, 2), (1, 1, 4), (2, 3, 2)],
}


@pytest.mark.parametrize("rope, prefix", [(False, 0), (True, 0), (True, 2)], ids=["", "rope", "rope-prefix"])
@pytest.mark.parametrize("num_axes", sorted(AXIS_GRIDS))
@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "auto"])
def test_isolation_over_any_number_of_axes(backend, num_axes, rope, prefix):
    """The core invariant for 1-, 2- and 3-axis examples (clips of 2-frame tubelets): logits and
    the gradients with respect to the example's patches are the same packed with others as alone."""
    temporal = 2 if num_axes == 3 else 1
    model = tiny_model(attn_backend=backend, num_axes=num_axes, temporal_patch_size=temporal, rope=rope,
                       prefix_tokens=prefix)  # fmt: skip
    generator = torch.Generator().manual_seed(num_axes)
    examples = []
    for grid in AXIS_GRIDS[num_axes]:
        coords = grid_coords(*grid)
        patches = torch.randn(len(coords), model.config.patch_dim, generator=generator)
        examples.append(Example(patches, coords, grid))
    weights = torch.randn(len(examples), model.config.num_classes, generator=generator)

    def run(chosen, seq_len, rows):
        leaves = [Example(x.patches.clone().requires_grad_(), x.coords, x.grid) for x in chosen]
        batch = pack(leaves, seq_len).batch
        logits = model(batch)
        (logits * weights[rows]).sum().backward()
        return logits.detach(), [leaf.patches.grad for leaf in leaves], batch

    logits, grads, batch = run(examples, 24, list(range(len(examples))))
    seq = int(batch.example_slots()[TARGET]) // batch.max_examples_per_seq
    assert int((batch.slot_to_example[seq] != PAD).sum()) >= 3, "the target shares its sequence"
    alone_logits, alone_grads, alone = run([examples[TARGET]], 16, [TARGET])
    assert not alone.token_mask.all(), "alone, the target sits next to padding"
    assert (logits[0] - logits[TARGET]).abs().max() > 1e-2 * logits.abs().max()
    assert_rel_close(logits[TARGET], alone_logits[0], 1e-5, "logits")
    assert_rel_close(grads[TARGET], alone_grads[0], 1e-5, "patch gradients")


def test_isolation_also_holds_for_pixels_of_the_other_images():
    # Gradients reach other images' pixels only through their own logits: weighting only the
    # target's logits leaves every other image with exactly zero gradient.
    model = tiny_model(attn_backend="bucketed")
    images = random_images(SIZES, seed=1)
    weights = torch.zeros(len(SIZES), model.config.num_classes)
    weights[TARGET] = 1.0
    _, grads, _ = logits_and_pixel_grads(model, images, PACKED_LEN, weights)
    for i, grad in enumerate(grads):
        if i == TARGET:
            assert grad.abs().max() > 0
        else:
            assert torch.count_nonzero(grad) == 0, f"image {i} influenced image {TARGET}"


# --------------------------------------------------------------------------------------------
# Every backend agrees with the dense reference.


def features_logits_grads(model, batch, weights):
    model.zero_grad()
    features = model.forward_features(batch)
    logits = model.forward_head(features, batch)
    (logits * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return features.detach(), logits.detach(), grads


def assert_param_grads_close(actual: dict, expected: dict, rtol: float) -> None:
    """Per-parameter relative check; grads that are zero in theory are judged on the global scale."""
    assert actual.keys() == expected.keys()
    scale = max(g.abs().max() for g in expected.values())
    for name, grad in expected.items():
        floor = max(grad.abs().max(), 1e-3 * scale)
        error = (actual[name] - grad).abs().max() / floor
        assert error <= rtol, f"gradient of {name}: relative error {error:.3g} > {rtol:g}"


@pytest.mark.parametrize("config", [dict(pool="map", rope=True), dict(pool="mean", rope=False)], ids=config_id)
@pytest.mark.parametrize("backend", [name for name in CPU_BACKENDS if name != "dense"])
def test_backend_matches_dense_outputs_and_parameter_gradients(backend, config):
    dense = tiny_model(attn_backend="dense", **config)
    other = with_backend(dense, backend)
    batch = pack_images(random_images(SIZES + [(40, 8), (8, 8)], seed=3), PATCH, 24, max_examples_per_seq=4)
    weights = torch.randn(batch.num_examples, dense.config.num_classes)
    ref_features, ref_logits, ref_grads = features_logits_grads(dense, batch, weights)
    features, logits, grads = features_logits_grads(other, batch, weights)
    real = batch.token_mask
    assert_rel_close(features[real], ref_features[real], 1e-5, "features")
    assert_rel_close(logits, ref_logits, 1e-5, "logits")
    assert_param_grads_close(grads, ref_grads, 1e-5)


def has_cpu_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++", "cl"))


needs_cpu_compiler = pytest.mark.skipif(not has_cpu_compiler(), reason="torch.compile on CPU needs a C++ compiler")
# torch's own deprecation notice, raised inside compile.
inside_compile_warnings = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@needs_cpu_compiler
@inside_compile_warnings
def test_flex_backend_forward_matches_dense_on_cpu():
    # FlexAttention on CPU is inference only and compiles on first use (~15 s cold, once).
    dense = tiny_model(attn_backend="dense")
    flex = with_backend(dense, "flex")
    batch = pack_images(random_images(SIZES, seed=4), PATCH, PACKED_LEN)
    with torch.no_grad():
        out = flex.forward_features(batch)
        expected = dense.forward_features(batch)
    real = batch.token_mask
    assert_rel_close(out[real], expected[real], 1e-5, "flex features")


def test_the_model_keeps_its_tokens_in_bucket_order_across_layers(monkeypatch):
    """With the bucketed backend the blocks run in the plan's slot order (images grouped by exact
    length, no padding slots): tokens move in once and out once per forward, attention never
    takes the per-call gather path, and features, logits and gradients are the dense backend's."""
    model = tiny_model(attn_backend="bucketed", rope=True, drop_path=0.0)
    dense = with_backend(model, "dense")
    batch = pack_images(random_images(SIZES + [(40, 8), (8, 8), (16, 16)], seed=4), PATCH, 24)
    weights = torch.randn(batch.num_examples, model.config.num_classes)
    ref_features, ref_logits, ref_grads = features_logits_grads(dense, batch, weights)
    moves = {"enter": 0, "leave": 0}
    for name in moves:
        original = getattr(bucketed.BucketPlan, name)

        def counted(self, *args, _name=name, _original=original):
            moves[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(bucketed.BucketPlan, name, counted)
    monkeypatch.setattr(BucketedBackend, "attend", lambda *args: pytest.fail("attention took the gather path"))
    contexts = []
    drop_path = navit.model.drop_path
    monkeypatch.setattr(navit.model, "drop_path", lambda x, rate, ctx, training: contexts.append(ctx) or drop_path(x, rate, ctx, training))
    plans = []
    prepare_slots = BucketedBackend.prepare_slots
    monkeypatch.setattr(BucketedBackend, "prepare_slots", lambda self, ids: plans.append(prepare_slots(self, ids)) or plans[-1])
    features, logits, grads = features_logits_grads(model, batch, weights)
    assert moves == {"enter": 4, "leave": 1}  # tokens, example ids, rope cos and sin; tokens back
    (plan,) = plans
    assert all(bucket.key_mask is None for bucket in plan.buckets)  # exact lengths: nothing masked
    assert sum(g * m for g, m in (b.size for b in plan.buckets)) == batch.num_real_tokens
    real = batch.token_mask
    # Stochastic depth reads each token's example id in the same order as the tokens.
    ids, _ = navit.model.example_ids(batch.segment_ids, batch.max_examples_per_seq)
    assert torch.equal(plan.leave(contexts[0].example_index[0], ids.shape)[real], ids[real])
    assert_rel_close(features[real], ref_features[real], 1e-5, "features")
    assert_rel_close(logits, ref_logits, 1e-5, "logits")
    assert_param_grads_close(grads, ref_grads, 1e-5)


def test_slot_order_comes_from_the_declared_capability(monkeypatch):
    # A backend that has prepare_slots but does not declare slot_order keeps the packed order.
    monkeypatch.setattr(BucketedBackend, "capabilities", dataclasses.replace(BucketedBackend.capabilities, slot_order=False))
    monkeypatch.setattr(BucketedBackend, "prepare_slots", lambda self, ids: pytest.fail("slot order without the capability"))
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, PAD], [0, 0, 1, 1, 1, 1]])
    state, order = navit.model.prepare_attention(BucketedBackend(), segment_ids)
    assert order is None and isinstance(state, bucketed.BucketPlan)


# Image layouts of one packed shape (3 sequences of 32 tokens, at most 4 images each).
COMPILE_LAYOUTS = [
    [(24, 24), (16, 24), (8, 32), (16, 16), (32, 32)],
    [(32, 32), (32, 32), (24, 24), (8, 16)],
    [(8, 8), (16, 32), (24, 16), (40, 8), (32, 24)],
    [(16, 8), (8, 24), (24, 32), (16, 40), (8, 8)],
]


@needs_cpu_compiler
@inside_compile_warnings
@pytest.mark.parametrize("backend", ["bucketed", "dense"])
def test_compiled_model_matches_eager_and_compiles_once_per_packed_shape(backend):
    # A data-dependent plan (bucketed) runs eagerly between compiled graphs; traced into them, it
    # made every new layout recompile. The first two layouts may compile (the second has another
    # image count, which makes it dynamic); after that a recompile is an error.
    torch._dynamo.reset()
    eager = tiny_model(attn_backend=backend, pool="map", rope=True).train()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    for i, sizes in enumerate(COMPILE_LAYOUTS):
        tokens = [image_to_example(image, PATCH, 32, index=j) for j, image in enumerate(random_images(sizes, seed=i))]
        result = pack(tokens, 32, max_examples_per_seq=4, num_seqs=3)
        assert not result.leftover
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            logits, grads = logits_and_grads(compiled, twin, result.batch)
        want_logits, want_grads = logits_and_grads(eager, eager, result.batch)
        assert_rel_close(logits, want_logits, 1e-5, f"logits, layout {i}")
        assert_param_grads_close(grads, want_grads, 1e-4)


def logits_and_grads(forward, model, batch) -> tuple[torch.Tensor, dict]:
    logits = forward(batch)
    logits.square().sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


@needs_cpu_compiler
@inside_compile_warnings
def test_flex_backend_inside_a_compiled_model_matches_dense_on_cpu():
    # Traced into the model's graph. Sequences of 24 tokens and head_dim 16 are the shape where
    # inductor's CPU flex kernel reads past the keys on AVX2 machines (see navit.attention.flex):
    # unpadded, logits were off by 4e-4 to 9e-4 here. Padded, compiled flex is as close to eager
    # dense (3.2e-8) as compiled dense is, so 1e-5 is fp32 rounding with a wide margin.
    dense = tiny_model(attn_backend="dense", qk_norm=True)
    compiled_flex = torch.compile(with_backend(dense, "flex"))
    batch = pack_images(random_images(SIZES, seed=4), PATCH, PACKED_LEN)
    with torch.no_grad():
        assert_rel_close(compiled_flex(batch), dense(batch), 1e-5, "compiled flex logits")


@needs_cpu_compiler
@inside_compile_warnings
def test_flex_on_cpu_reads_nothing_past_its_inputs(monkeypatch):
    """24 tokens (a last tile of 8 keys) and head_dim 16: unpadded, inductor's CPU flex kernel
    reads past k on AVX2 machines. Here whatever follows q, k and v in memory is NaN, so any
    such read shows in the output, whatever the machine's memory would have held."""
    kernel = flex._compiled_flex()

    def nan_after(t):
        fenced = torch.full((t.numel() + 4096,), float("nan"), dtype=t.dtype)[: t.numel()].view(t.shape)
        return fenced.copy_(t)

    monkeypatch.setattr(flex, "_compiled_flex", lambda: lambda q, k, v, **kw: kernel(*map(nan_after, (q, k, v)), **kw))
    batch = pack([labelled_image(i, n) for i, n in enumerate([10, 6, 24, 5])], 24).batch
    q, k, v = torch.randn(3, *batch.segment_ids.shape, 2, 16, generator=torch.Generator().manual_seed(0))
    backend = flex.FlexBackend()
    with torch.no_grad():
        out = backend.attend(q, k, v, backend.prepare(batch.segment_ids))
    assert torch.isfinite(out).all()
    real = batch.token_mask
    expected = reference_attention(*(t.double() for t in (q, k, v)), batch.segment_ids)
    torch.testing.assert_close(out[real].double(), expected[real], rtol=1e-5, atol=1e-6)


def test_flex_backend_refuses_to_train_on_cpu():
    model = tiny_model(attn_backend="flex").train()
    batch = pack_images(random_images(SIZES[:2]), PATCH, PACKED_LEN)
    with pytest.raises(RuntimeError, match=r"'flex' cannot run here \(cpu, float32, with gradients\): it has no backward on cpu"):
        model(batch)
    with torch.no_grad():  # inference is fine
        assert torch.isfinite(model(batch)).all()
    q = torch.randn(1, 8, 2, 16, requires_grad=True)  # the backend itself, used directly, refuses too
    with pytest.raises(RuntimeError, match="no CPU backward.*attn_backend='bucketed'"):
        flex.FlexBackend().attend(q, q, q, None)


# --------------------------------------------------------------------------------------------
# The varlen backend's own code (run boundaries, layouts, dtype rules) checked on CPU: torch's
# flash kernel is CUDA-only, so a reference kernel with the same contract stands in for it.


def reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k):
    """``varlen_attn`` on CPU: checks the arguments the CUDA kernel requires, then attends run by
    run in fp32 (with autograd) and returns the input dtype, as the kernel does."""
    assert q.dim() == 3 and k.shape == v.shape == q.shape and q.dtype in HALF_DTYPES
    total = q.shape[0]
    assert cu_seq_q.dtype == torch.int32 and cu_seq_q.device == q.device and torch.equal(cu_seq_q, cu_seq_k)
    bounds = cu_seq_q.tolist()
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == total and min(lengths) > 0
    assert max_q == max_k == max(lengths) and isinstance(max_q, int)
    runs = [
        torch.nn.functional.scaled_dot_product_attention(*(t[start:end].transpose(0, 1).float() for t in (q, k, v)))
        for start, end in zip(bounds, bounds[1:])
    ]
    return torch.cat([run.transpose(0, 1) for run in runs]).to(q.dtype)


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    monkeypatch.setattr(varlen, "varlen_attn", reference_varlen_attn)
    on_cpu = dataclasses.replace(VarlenBackend.capabilities, devices=("cuda", "cpu"), present=lambda device: True)
    monkeypatch.setattr(VarlenBackend, "capabilities", on_cpu)


def test_varlen_backend_cuts_runs_at_images_and_sequences(varlen_on_cpu):
    # One image fills sequence 0 and the next starts sequence 1 with the same slot id: the run
    # must still end at the sequence boundary.
    lengths = [16, 5, 9, 3, 12, 1]
    batch = pack([labelled_image(i, n) for i, n in enumerate(lengths)], 16).batch
    assert batch.token_mask[0].all() and batch.segment_ids[0, -1] == batch.segment_ids[1, 0]
    generator = torch.Generator().manual_seed(0)
    exact = torch.randn(3, *batch.segment_ids.shape, 2, 8, generator=generator, dtype=torch.float64)
    q, k, v = (t.bfloat16() for t in exact)
    attention = VarlenBackend()
    out = attention.attend(q, k, v, attention.prepare(batch.segment_ids))
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    real = batch.token_mask
    expected = reference_attention(*(t.double() for t in (q, k, v)), batch.segment_ids)
    torch.testing.assert_close(out[real].double(), expected[real], rtol=2e-2, atol=2e-2)
    assert torch.isfinite(out).all(), "padding runs attend among themselves"
    with pytest.raises(RuntimeError, match="needs fp16/bf16 inputs.*autocast"):
        attention.attend(*exact.float(), attention.prepare(batch.segment_ids))


@pytest.mark.parametrize("config", [dict(pool="map", rope=True), dict(pool="mean", rope=False)], ids=config_id)
@pytest.mark.parametrize("backend", ["bucketed", "varlen"])
def test_half_precision_backend_matches_dense_under_the_same_bf16_autocast(backend, config, varlen_on_cpu):
    # Same autocast on both sides, so the bf16 rounding of the linear layers is shared and the
    # tolerances can be tight: a varlen layout bug (heads and positions swapped) is off by 4e-2
    # on features and by more than 1 on gradients; correct code is within 1.2e-3 and 1.8e-2.
    dense = tiny_model(attn_backend="dense", **config)
    other = with_backend(dense, backend)
    batch = pack_images(random_images(SIZES + [(40, 8), (8, 8)], seed=3), PATCH, 24, max_examples_per_seq=4)
    weights = torch.randn(batch.num_examples, dense.config.num_classes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_features, ref_logits, ref_grads = features_logits_grads(dense, batch, weights)
        features, logits, grads = features_logits_grads(other, batch, weights)
    real = batch.token_mask
    assert_rel_close(features[real].float(), ref_features[real].float(), 1e-2, f"bf16 {backend} features")
    assert_rel_close(logits.float(), ref_logits.float(), 1e-2, f"bf16 {backend} logits")
    assert_param_grads_close(grads, ref_grads, 5e-2)


@pytest.fixture
def cuda_autocast_layer_norm(monkeypatch):
    """CUDA autocast runs layer_norm in float32 and returns float32, where CPU autocast keeps
    bf16: the same policy on CPU, so that qk-norm hands the backend what it gets on a GPU."""
    layer_norm = torch.nn.functional.layer_norm

    def fp32_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled("cpu"):
            return layer_norm(x, shape, weight, bias, eps)
        with torch.autocast("cpu", enabled=False):
            return layer_norm(x.float(), shape, *(None if t is None else t.float() for t in (weight, bias)), eps)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", fp32_layer_norm)


def test_varlen_backend_runs_qk_norm_under_cuda_autocast(varlen_on_cpu, cuda_autocast_layer_norm):
    # qk-norm's float32 q and k must reach the kernel in v's dtype (the varlen kernel refuses
    # mixed or float32 inputs; the default config has qk-norm on).
    dense = tiny_model(attn_backend="dense", qk_norm=True)
    batch = pack_images(random_images(SIZES, seed=3), PATCH, 24, max_examples_per_seq=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = dense(batch)
        logits = with_backend(dense, "varlen")(batch)
    assert_rel_close(logits.float(), expected.float(), 1e-2, "varlen logits under autocast")


def test_varlen_backend_refuses_cpu_with_a_pointer_to_bucketed():
    with pytest.raises(RuntimeError, match="CUDA only; use 'bucketed'|needs torch>=2.9"):
        VarlenBackend().prepare(torch.zeros(1, 4, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# CUDA: isolation for every backend the device offers, and agreement with dense.


@needs_cuda
class TestCuda:
    DEVICE = "cuda"

    @pytest.fixture(autouse=True)
    def _exact_fp32(self):
        # TF32 matmuls would make fp32 results depend on the kernel chosen for each shape.
        previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous

    @pytest.mark.parametrize("config", ISOLATION_CONFIGS, ids=config_id)
    @pytest.mark.parametrize("backend", [b for b in available_backends("cuda") if b != "varlen"])
    def test_isolation_fp32(self, backend, config):
        check_isolation(tiny_model(attn_backend=backend, **config).to(self.DEVICE), self.DEVICE)

    @pytest.mark.parametrize("config", ISOLATION_CONFIGS, ids=config_id)
    def test_varlen_isolation_in_bf16_against_dense_fp32(self, config):
        if "varlen" not in available_backends(self.DEVICE):
            pytest.skip("torch.nn.attention.varlen is not available in this PyTorch build")
        dense = tiny_model(attn_backend="dense", **config).to(self.DEVICE)
        varlen_model = with_backend(dense, "varlen")
        # Packed with others in bf16 flash attention vs alone through the dense fp32 reference.
        packed, packed_grad, alone, alone_grad, _ = isolation_results(
            varlen_model, self.DEVICE, autocast_dtype=torch.bfloat16, alone_model=dense
        )
        assert_rel_close(packed, alone, 5e-2, "bf16 varlen logits")
        cosine = torch.nn.functional.cosine_similarity(packed_grad.flatten(), alone_grad.flatten(), dim=0)
        assert cosine > 0.98, f"bf16 varlen pixel gradients: cosine {cosine:.4f}"

    @pytest.mark.parametrize("backend", [b for b in available_backends("cuda") if b != "dense"])
    def test_backend_matches_dense(self, backend):
        dense = tiny_model(attn_backend="dense", pool="map", rope=True).to(self.DEVICE)
        other = with_backend(dense, backend)
        batch = pack_images(random_images(SIZES + [(40, 8), (8, 8)], seed=3), PATCH, 24).to(self.DEVICE)
        weights = torch.randn(batch.num_examples, dense.config.num_classes, device=self.DEVICE)
        ref_features, ref_logits, ref_grads = features_logits_grads(dense, batch, weights)
        real = batch.token_mask
        if backend == "varlen":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                features, logits, grads = features_logits_grads(other, batch, weights)
            assert_rel_close(features[real].float(), ref_features[real], 1e-1, "bf16 varlen features")
            assert_rel_close(logits.float(), ref_logits, 5e-2, "bf16 varlen logits")
            for name, grad in ref_grads.items():
                if grad.abs().max() > 1e-3 * max(g.abs().max() for g in ref_grads.values()):
                    cosine = torch.nn.functional.cosine_similarity(grads[name].flatten().float(), grad.flatten(), dim=0)
                    assert cosine > 0.95, f"bf16 varlen gradient of {name}: cosine {cosine:.4f}"
        else:
            features, logits, grads = features_logits_grads(other, batch, weights)
            assert_rel_close(features[real], ref_features[real], 1e-5, "features")
            assert_rel_close(logits, ref_logits, 1e-5, "logits")
            assert_param_grads_close(grads, ref_grads, 1e-5)
