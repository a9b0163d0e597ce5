"""Shared helpers: tiny models, synthetic images and tolerance checks.

Every model built here is small (depth 2, embed_dim 32) so the suite runs in seconds on a CPU.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import pytest
import torch
import torch.multiprocessing as mp

from navit import NaViTConfig, create_model
from navit.batch import PAD, PackedBatch
from navit.batch import Example

PATCH = 8  # patch size of the tiny test models


def tiny_config(**overrides) -> NaViTConfig:
    base = dict(
        patch_size=PATCH,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=7,
        pos_max_len=16,
        fourier_bands=4,
    )
    base.update(overrides)
    return NaViTConfig(**base)


def tiny_model(seed: int = 0, **overrides):
    """A tiny NaViT in eval mode with deterministic weights.

    The head is re-drawn at unit scale (the default init is std 0.02 with zero bias), so logits
    are O(1) and clearly differ between images: comparisons of logits are never vacuous.
    """
    torch.manual_seed(seed)
    model = create_model(tiny_config(**overrides)).eval()
    if isinstance(model.head, torch.nn.Linear):
        torch.nn.init.normal_(model.head.weight, std=model.num_features**-0.5)
        torch.nn.init.normal_(model.head.bias, std=0.1)
    return model


def with_backend(model, backend: str):
    """A copy of ``model`` (same weights) that uses attention backend ``backend``."""
    twin = copy.deepcopy(model)
    twin.config = twin.config.replace(attn_backend=backend)
    return twin


def random_images(sizes: Sequence[tuple[int, int]], channels: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, h, w, generator=generator) for h, w in sizes]


def labelled_image(index: int, num_tokens: int, grid: tuple[int, int] | None = None) -> Example:
    """A patchified image whose patch ``t`` is ``[index, t, 1]``: every token says where it came from.

    The trailing 1 tells a real token from padding (which the packer fills with zeros).
    """
    grid = grid or (1, num_tokens)
    t = torch.arange(num_tokens)
    patches = torch.stack([torch.full((num_tokens,), float(index)), t.float(), torch.ones(num_tokens)], dim=1)
    coords = torch.stack([t // grid[1], t % grid[1]], dim=1)
    return Example(patches=patches, coords=coords, grid=grid)


def image_of_slot(batch: PackedBatch) -> torch.Tensor:
    """[B, L] batch image number (row of model outputs) of every token, PAD at padding."""
    slot = batch.segment_ids.clamp(min=0)
    image = torch.gather(batch.slot_to_example, 1, slot)
    return torch.where(batch.token_mask, image, torch.full_like(image, PAD))


def image_tokens(batch: PackedBatch, image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(patches, coords) of batch image ``image`` in the order they sit in their sequence."""
    seq, slot = divmod(int(batch.example_slots()[image]), batch.max_examples_per_seq)
    mask = batch.segment_ids[seq] == slot
    return batch.patches[seq][mask], batch.coords[seq][mask]


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``expected``."""
    scale = expected.detach().abs().max().clamp(min=torch.finfo(expected.dtype).tiny)
    return float((actual.detach() - expected.detach()).abs().max() / scale)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert expected.detach().abs().max() > 0, f"{what}: reference is all zeros, the check would be vacuous"
    error = max_rel_error(actual, expected)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)


# Command-line options of a tiny, fast training run (for the CLI tests).
TINY_TRAIN = [
    "--model-args", "embed_dim=32", "depth=1", "num_heads=2", "pos_max_len=32",
    "--max-tokens", "16", "--seq-len", "64", "--num-seqs", "2", "--buffer-size", "8",
    "--budgets", "4", "16", "--log-every", "1", "--warmup-steps", "2", "--workers", "0",
]  # fmt: skip


def run_ranks(worker: Callable, world: int, args: tuple, deadline_s: float = 120.0) -> None:
    """Runs ``worker(rank, *args)`` in ``world`` spawned processes; a hang fails the test, naming
    the ranks still running, instead of stalling the suite. A worker's exception is re-raised."""
    ranks = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            alive = [rank for rank, process in enumerate(ranks.processes) if process.is_alive()]
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"ranks {alive} of {world} still running after {deadline_s:.0f} s")


# --------------------------------------------------------------------------------------------
# Parity with reference implementations of pretrained models (SigLIP2, timm NaFlexViT)

PARITY_TOLERANCE = 1e-5  # relative to the largest magnitude of the reference output


def scaled_up(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights redrawn at twice the unit-variance scale, biases, norms and layer scales shifted,
    learned tokens and position tables redrawn at unit scale: every piece moves the outputs,
    none hides in the tolerance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "reg_token", "pos_embed", "position_embedding.weight")):
                p.copy_(torch.randn(p.shape, generator=generator))
            elif name.endswith("gamma"):  # layer scales start at 1e-5: bring the branches in
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            elif p.dim() > 1:  # activations of order one and more, where GELU's two forms differ
                p.copy_(torch.randn(p.shape, generator=generator) * 2 / p.shape[-1] ** 0.5)
            else:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def packed_outputs(model, pictures, seq_len: int = 80, per_seq: int = 4):
    """navit's per-token features, pooled vector and head output of each picture, all packed
    together (several to a sequence)."""
    batch = model.processor(pictures, seq_len=seq_len, max_examples_per_seq=per_seq)
    assert batch.num_seqs < len(pictures), "several images share a sequence"
    with torch.no_grad():
        features = model.forward_features(batch)
        pooled = model.forward_head(features, batch, pre_logits=True)
        logits = model.head(pooled)
    tokens = []
    for slot in batch.example_slots().tolist():
        seq, e = divmod(slot, batch.max_examples_per_seq)
        tokens.append(features[seq][batch.segment_ids[seq] == e])
    return list(zip(tokens, pooled, logits))

