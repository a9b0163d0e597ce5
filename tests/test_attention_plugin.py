"""An attention kernel plugged in from outside the package, as a user would: one class that
declares its capabilities, one ``register`` line, nothing under ``navit/`` changed.

The toy kernel is plain softmax attention over an explicit boolean mask, written with einsum and
its own max-shifted softmax (no ``scaled_dot_product_attention``). It declares float64 on CPU,
where it outranks every built-in for ``auto``: a float64 model then attends with it, and must
agree with the dense reference in outputs and gradients.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PATCH, assert_rel_close, random_images, tiny_config, tiny_model, with_backend

from navit import NaViTConfig, pack_images
from navit.attention import BACKENDS, BucketedBackend, Capabilities, available_backends, get_backend, names, register, unregister

BUILT_IN = ["dense", "bucketed", "varlen", "flex"]
SIZES = [(24, 24), (16, 24), (8, 32), (16, 16), (32, 32), (40, 8), (8, 8)]


class EinsumAttention:
    """Softmax(q·kᵀ/√d) v under a [B, L, L] boolean same-image mask."""

    name = "einsum-softmax"
    capabilities = Capabilities(devices=("cpu",), dtypes=(torch.float64,), preference={"cpu": 100})
    calls = 0

    def prepare(self, segment_ids: torch.Tensor) -> torch.Tensor:
        return segment_ids[:, :, None] == segment_ids[:, None, :]  # padding sees padding: no empty row

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        EinsumAttention.calls += 1
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        weights = (scores - scores.amax(-1, keepdim=True)).exp()
        return torch.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdim=True), v)


@pytest.fixture
def einsum_backend():
    register(EinsumAttention)
    EinsumAttention.calls = 0
    try:
        yield EinsumAttention.name
    finally:
        unregister(EinsumAttention.name)


def outputs_and_grads(model, sizes, seed=3):
    """Features, logits, parameter gradients and pixel gradients of ``sizes`` packed together."""
    images = [image.double().requires_grad_() for image in random_images(sizes, seed=seed)]
    batch = pack_images(images, PATCH, 32, max_examples_per_seq=4)
    model.zero_grad(set_to_none=True)
    features = model.forward_features(batch)
    logits = model.forward_head(features, batch)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=logits.dtype)
    (logits * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return features[batch.token_mask].detach(), logits.detach(), grads, [image.grad for image in images], batch


def test_auto_picks_the_plugin_where_it_is_preferred_and_it_matches_dense(einsum_backend):
    dense = tiny_model(attn_backend="dense", rope=True).double()
    auto = with_backend(dense, "auto")
    cpu = torch.device("cpu")
    assert isinstance(auto.attention_backend(cpu), EinsumAttention), "float64 on CPU: the plug-in outranks the built-ins"
    assert isinstance(with_backend(dense, "auto").float().attention_backend(cpu), BucketedBackend), "float32: not its dtype"
    features, logits, grads, pixel_grads, batch = outputs_and_grads(auto, SIZES)
    assert batch.num_seqs < len(SIZES) and EinsumAttention.calls == auto.config.depth, "several images per sequence, and it ran"
    ref_features, ref_logits, ref_grads, ref_pixel_grads, _ = outputs_and_grads(dense, SIZES)
    assert EinsumAttention.calls == auto.config.depth, "the dense reference did not use it"
    assert_rel_close(features, ref_features, 1e-10, "features")
    assert_rel_close(logits, ref_logits, 1e-10, "logits")
    for name, grad in ref_grads.items():
        assert_rel_close(grads[name], grad, 1e-9, f"gradient of {name}")
    for i, (grad, ref) in enumerate(zip(pixel_grads, ref_pixel_grads)):
        assert_rel_close(grad, ref, 1e-9, f"pixel gradients of image {i}")


def test_a_plugin_name_is_a_valid_attn_backend_while_registered(einsum_backend):
    assert names() == [*BUILT_IN, einsum_backend] and BACKENDS[einsum_backend] is EinsumAttention
    assert available_backends("cpu") == ["dense", "bucketed", einsum_backend]
    model = tiny_model(attn_backend=einsum_backend).double()  # the config asks the registry
    assert isinstance(model.attention_backend(torch.device("cpu")), EinsumAttention)
    with pytest.raises(RuntimeError) as error:  # named where it cannot run: float32
        model.float()(pack_images(random_images(SIZES[:3]), PATCH, 32))
    assert str(error.value).startswith(
        "attention backend 'einsum-softmax' cannot run here (cpu, float32, with gradients): it takes float64 only"
    )
    assert "use attn_backend='auto' or one of ['dense', 'bucketed']" in str(error.value)
    with pytest.raises(ValueError, match="attention backend name 'einsum-softmax' is taken"):
        register(EinsumAttention)


def test_unknown_names_are_refused_with_the_registered_ones(einsum_backend):
    with pytest.raises(ValueError, match=r"NaViTConfig.attn_backend='sparse'; expected one of \('auto', 'dense', "
                       r"'bucketed', 'varlen', 'flex', 'einsum-softmax'\)"):  # fmt: skip
        NaViTConfig(attn_backend="sparse")
    with pytest.raises(ValueError, match=r"unknown attention backend 'sparse'; expected 'auto' or one of \['dense'"):
        get_backend("sparse")


def test_unregistering_takes_the_name_away_again():
    register(EinsumAttention)
    tiny_config(attn_backend=EinsumAttention.name)
    unregister(EinsumAttention.name)
    assert names() == BUILT_IN and EinsumAttention.name not in BACKENDS
    with pytest.raises(ValueError, match="NaViTConfig.attn_backend='einsum-softmax'; expected one of"):
        tiny_config(attn_backend=EinsumAttention.name)
    float64 = tiny_model().double().attention_backend(torch.device("cpu"))
    assert isinstance(float64, BucketedBackend), "auto is back to the built-ins"
