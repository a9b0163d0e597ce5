"""Chunked / ring contrastive losses against the plain full-matrix definition.

Values and gradients (embeddings, logit scale, logit bias) must match the reference to fp32
rounding, in one process with any chunk size and across real gloo processes with ragged batches.
Empty pooling slots are filled with NaN, so any leak of them into the loss shows up at once.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from conftest import run_ranks

from navit.contrastive import (
    reference_sigmoid_contrastive_loss,
    reference_softmax_contrastive_loss,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
)

KINDS = ("softmax", "sigmoid")
SCALE, BIAS = 7.0, -3.0  # logits spread enough that both softmax terms and sigmoids matter


def make_batch(sizes: list[int], valid_counts: list[int], dim: int, seed: int):
    """Concatenated per-rank batches; each rank's valid slots are a random subset, empty ones NaN."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    img = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    # Paired texts correlate with their images, so positives are not just noise.
    txt = F.normalize(img + 0.8 * torch.randn(n, dim, generator=gen), dim=-1)
    valid = torch.zeros(n, dtype=torch.bool)
    start = 0
    for size, count in zip(sizes, valid_counts):
        valid[start + torch.randperm(size, generator=gen)[:count]] = True
        start += size
    img[~valid] = float("nan")
    txt[~valid] = float("nan")
    return img, txt, valid


def loss_fn(kind: str, *, reference: bool = False) -> Callable[..., torch.Tensor]:
    if kind == "softmax":
        return reference_softmax_contrastive_loss if reference else softmax_contrastive_loss
    fn = reference_sigmoid_contrastive_loss if reference else sigmoid_contrastive_loss
    return lambda *a, logit_bias, **k: fn(*a, logit_bias=logit_bias, **k)


def run_loss(kind: str, img, txt, valid, *, reference: bool = False, **kwargs) -> dict[str, torch.Tensor]:
    """Loss and gradients w.r.t. img, txt, logit_scale (and logit_bias for sigmoid)."""
    img = img.clone().requires_grad_()
    txt = txt.clone().requires_grad_()
    scale = torch.tensor(SCALE, requires_grad=True)
    bias = torch.tensor(BIAS, requires_grad=True)
    extra = {"logit_bias": bias} if kind == "sigmoid" else {}
    loss = loss_fn(kind, reference=reference)(img, txt, logit_scale=scale, valid=valid, **extra, **kwargs)
    loss.backward()
    out = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad}
    if kind == "sigmoid":
        out["bias"] = bias.grad
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative to the tensor's scale: entries that cancel to ~0 carry the rounding of big terms."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    for key, value in want.items():
        try:
            assert_close(got[key], value, rtol)
        except AssertionError as err:
            raise AssertionError(f"{key}: {err}") from None


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.max_numel = max(self.max_numel, leaf.numel())
        return out


# ------------------------------------------------------------------------------------ one process


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 5, 13, 100])
def test_chunked_matches_reference(kind: str, chunk_size: int | None) -> None:
    img, txt, valid = make_batch([13], [13], dim=6, seed=0)
    got = run_loss(kind, img, txt, None, chunk_size=chunk_size)
    want = run_loss(kind, img, txt, None, reference=True)
    assert want["img"].abs().max() > 1e-3 and want["scale"].abs() > 1e-3  # gradients are not vacuous
    assert_matches(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_up_to_rounding_in_float64(kind: str) -> None:
    """In float64 the chunked loss agrees to ~1e-15: the fp32 differences above are only rounding."""
    img, txt, valid = make_batch([11], [9], dim=5, seed=4)
    img, txt = img.double(), txt.double()
    got = run_loss(kind, img, txt, valid, chunk_size=4)
    want = run_loss(kind, img, txt, valid, reference=True)
    assert_matches(got, want, rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_valid_mask_excludes_empty_slots(kind: str, chunk_size: int | None) -> None:
    img, txt, valid = make_batch([12], [7], dim=5, seed=1)
    got = run_loss(kind, img, txt, valid, chunk_size=chunk_size)
    # The reference sees only the filled slots; the masked loss must be exactly that loss.
    want = run_loss(kind, img[valid], txt[valid], None, reference=True)
    assert torch.isfinite(got["loss"])
    assert_matches(
        {k: (v[valid] if k in ("img", "txt") else v) for k, v in got.items()},
        want,
    )
    assert torch.equal(got["img"][~valid], torch.zeros_like(got["img"][~valid]))
    assert torch.equal(got["txt"][~valid], torch.zeros_like(got["txt"][~valid]))


@pytest.mark.parametrize("kind", KINDS)
def test_no_valid_slots_gives_zero_loss(kind: str) -> None:
    img, txt, valid = make_batch([4], [0], dim=3, seed=2)
    got = run_loss(kind, img, txt, valid, chunk_size=3)
    assert got["loss"] == 0 and torch.equal(got["img"], torch.zeros_like(got["img"]))


@pytest.mark.parametrize("kind", KINDS)
def test_memory_is_bounded_by_chunk(kind: str) -> None:
    n, dim, chunk = 40, 4, 6
    img, txt, valid = make_batch([n], [n - 3], dim=dim, seed=3)
    bound = n * max(chunk, dim)  # an [N, chunk] logit block or an [N, D] embedding/gradient
    with MaxNumel() as chunked:
        run_loss(kind, img, txt, valid, chunk_size=chunk)
    assert chunked.max_numel <= bound < n * n
    with MaxNumel() as full:  # the probe does see a full matrix when one is built
        run_loss(kind, img, txt, valid, reference=True)
    assert full.max_numel >= (n - 3) ** 2 > bound


# ------------------------------------------------------------------------------- several processes

# name -> per-rank batch sizes (one per process; they may differ), valid counts, chunk size, seed.
# The 3-process ring catches direction/ownership mistakes that a 2-process ring (prev == next) hides.
SCENARIOS: dict[str, dict[str, Any]] = {
    "even_sizes_uneven_valid": {"sizes": [8, 8], "valid": [3, 5], "chunk_size": 3, "seed": 10},
    "uneven_sizes": {"sizes": [5, 9], "valid": [5, 6], "chunk_size": None, "seed": 11},
    "one_rank_empty": {"sizes": [6, 6], "valid": [0, 4], "chunk_size": 4, "seed": 12},
    "three_ranks": {"sizes": [4, 7, 5], "valid": [3, 7, 2], "chunk_size": 3, "seed": 13},
}
DIM = 4


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        results = {}
        for name, sc in SCENARIOS.items():
            if len(sc["sizes"]) != world:
                continue
            img, txt, valid = make_batch(sc["sizes"], sc["valid"], DIM, seed=sc["seed"])
            start = sum(sc["sizes"][:rank])
            local = slice(start, start + sc["sizes"][rank])
            for kind in KINDS:
                with MaxNumel() as probe:
                    out = run_loss(
                        kind, img[local], txt[local], valid[local], chunk_size=sc["chunk_size"], group=dist.group.WORLD
                    )
                out["max_numel"] = torch.tensor(probe.max_numel)
                results[(name, kind)] = out
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp: Path) -> list[dict]:
    """Runs every scenario for ``world`` real gloo processes; returns each rank's results."""
    run_ranks(_worker, world, (world, str(tmp / "rendezvous"), str(tmp)))
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], list[dict]]:
    """Spawns the processes for a world size once, on first use."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = _spawn(world, tmp_path_factory.mktemp(f"ring{world}"))
        return cache[world]

    return get


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ring_matches_reference_on_gathered_batch(
    ring_results: Callable[[int], list[dict]], name: str, kind: str
) -> None:
    sc = SCENARIOS[name]
    results = ring_results(len(sc["sizes"]))
    img, txt, valid = make_batch(sc["sizes"], sc["valid"], DIM, seed=sc["seed"])
    want = run_loss(kind, img, txt, valid, reference=True)
    start = 0
    for rank, size in enumerate(sc["sizes"]):
        got = results[rank][(name, kind)]
        local = slice(start, start + size)
        start += size
        # Every rank reports the global loss and the full gradient of its own embeddings ...
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=0)
        assert_close(got["img"], want["img"][local])
        assert_close(got["txt"], want["txt"][local])
        # ... and never holds a block as large as [N_local, N_global].
        block = min(sc["chunk_size"] or max(sc["sizes"]), max(sc["sizes"]))
        bound = max(size * block, max(sc["sizes"]) * DIM)
        assert got["max_numel"] <= bound < size * sum(sc["sizes"])
    # Replicated scalars: the per-rank shares sum to the exact gradient.
    for key in ("scale", "bias") if kind == "sigmoid" else ("scale",):
        assert_close(sum(results[r][(name, kind)][key] for r in range(len(sc["sizes"]))), want[key])
