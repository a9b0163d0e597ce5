"""Factorized positional embeddings (absolute / fractional) and 2-D RoPE."""

from __future__ import annotations

import itertools

import pytest
import torch

from navit.config import POS_COMBINES, POS_MODES
from navit.posemb import FactorizedPosEmbed, Rope, TablePosEmbed, apply_rope

DIM, MAX_LEN = 32, 16
KINDS = ("learned", "sincos", "fourier")
VARIANTS = list(itertools.product(KINDS, POS_MODES, POS_COMBINES))


def grid_coords(rows: int, cols: int, batch: int = 1):
    """(coords, grid) [batch, rows·cols, 2] for every patch of a rows x cols grid."""
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    coords = torch.stack([ys.reshape(-1), xs.reshape(-1)], -1)
    grid = torch.tensor([rows, cols]).expand_as(coords)
    return coords.expand(batch, -1, -1), grid.expand(batch, -1, -1)


def at(*positions, grid):
    """coords and grid tensors [1, n, 2] for explicit (row, col) positions in one grid."""
    coords = torch.tensor([list(p) for p in positions])[None]
    return coords, torch.tensor(grid).expand_as(coords)


def embedder(kind, mode, combine):
    torch.manual_seed(0)
    return FactorizedPosEmbed(DIM, kind=kind, mode=mode, combine=combine, max_len=MAX_LEN, fourier_bands=4)


def assert_all_distinct(vectors: torch.Tensor) -> None:
    """Rows of [n, D] differ pairwise by more than float noise."""
    distance = torch.cdist(vectors.double(), vectors.double())
    distance.fill_diagonal_(float("inf"))
    assert distance.min() > 1e-6 * vectors.abs().max(), "two positions share an embedding"


def test_table_learns_each_cell_on_its_own():
    # Pix2Struct's 2-D table: cell (r, c) is row r, column c of the table, not a sum of a row and
    # a column part, so (r, c) and (c, r) differ and a gradient reaches only the cells used.
    table = TablePosEmbed(DIM, mode="absolute", max_len=MAX_LEN)
    coords, grid = grid_coords(3, 5)
    out = table(coords, grid)
    torch.testing.assert_close(out[0], table.table[coords[0, :, 0], coords[0, :, 1]])
    assert_all_distinct(out[0])
    out.sum().backward()
    touched = table.table.grad.abs().sum(-1) > 0
    assert touched[:3, :5].all() and touched.sum() == 15
    fractional = TablePosEmbed(DIM, mode="fractional", max_len=MAX_LEN)
    coords, grid = at((1, 2), grid=(4, 8))
    torch.testing.assert_close(fractional(coords, grid)[0, 0], fractional.table[4, 4])  # 1/4 and 2/8 of 16
    with pytest.raises(ValueError, match="beyond the absolute"):
        table(*grid_coords(MAX_LEN + 1, 2))


@pytest.mark.parametrize("kind, mode, combine", VARIANTS)
def test_every_variant_embeds_each_position_differently(kind, mode, combine):
    coords, grid = grid_coords(5, 7, batch=2)
    out = embedder(kind, mode, combine)(coords, grid)
    assert out.shape == (2, 35, DIM)
    assert torch.isfinite(out).all()
    assert_all_distinct(out[0])
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("kind, combine", list(itertools.product(KINDS, POS_COMBINES)))
def test_fractional_positions_are_resolution_independent(kind, combine):
    embed = embedder(kind, "fractional", combine)
    # Row 2 of 4 and row 4 of 8 are both half way down; col 1 of 3 and col 3 of 9 a third across.
    small = embed(*at((2, 1), grid=(4, 3)))
    large = embed(*at((4, 3), grid=(8, 9)))
    torch.testing.assert_close(small, large, rtol=1e-5, atol=1e-6)
    other = embed(*at((3, 1), grid=(8, 3)))  # a different relative row
    assert not torch.allclose(small, other)


@pytest.mark.parametrize("kind, combine", list(itertools.product(KINDS, POS_COMBINES)))
def test_absolute_positions_depend_on_the_index_not_the_grid(kind, combine):
    embed = embedder(kind, "absolute", combine)
    same_index = embed(*at((2, 1), grid=(4, 3))), embed(*at((2, 1), grid=(8, 9)))
    torch.testing.assert_close(*same_index)
    assert not torch.allclose(same_index[0], embed(*at((4, 3), grid=(8, 9))))


@pytest.mark.parametrize("kind", KINDS)
def test_absolute_mode_rejects_positions_beyond_the_table(kind):
    embed = embedder(kind, "absolute", "sum")
    embed(*at((MAX_LEN - 1, 0), grid=(MAX_LEN, 1)))  # the last row of the table is fine
    message = f"{MAX_LEN + 1} patches along a side, beyond the absolute position table of {MAX_LEN}"
    with pytest.raises(ValueError, match=message):
        embed(*at((0, MAX_LEN), grid=(1, MAX_LEN + 1)))


@pytest.mark.parametrize("mode", POS_MODES)
def test_sincos_sum_tells_transposed_positions_apart(mode):
    embed = embedder("sincos", mode, "sum")
    pairs = [(r, c) for r in range(6) for c in range(6) if r < c]
    coords = torch.tensor(pairs + [(c, r) for r, c in pairs])[None]
    out = embed(coords, torch.full_like(coords, 6))[0]
    direct, transposed = out[: len(pairs)], out[len(pairs) :]
    assert ((direct - transposed).norm(dim=-1) > 1e-3).all()


def test_stack_gives_the_row_and_the_column_one_half_each():
    embed = embedder("learned", "absolute", "stack")
    out = embed(*at((1, 2), (1, 5), (3, 2), grid=(6, 6)))[0]
    half = DIM // 2
    torch.testing.assert_close(out[0, :half], out[1, :half])  # same row
    torch.testing.assert_close(out[0, half:], out[2, half:])  # same column
    assert not torch.allclose(out[0, half:], out[1, half:])


def test_unknown_variants_are_rejected():
    with pytest.raises(ValueError, match="unknown combine 'concat'"):
        FactorizedPosEmbed(DIM, combine="concat")
    with pytest.raises(ValueError, match="unknown positional embedding kind 'rotary'"):
        FactorizedPosEmbed(DIM, kind="rotary")
    with pytest.raises(ValueError, match="sincos embeddings need an even dimension"):
        FactorizedPosEmbed(30, kind="sincos", combine="stack")


HEAD_DIM = 16


@pytest.mark.parametrize("mode", POS_MODES)
def test_rope_angles_have_the_right_shape_and_differ_per_position(mode):
    rope = Rope(HEAD_DIM, mode=mode, max_len=MAX_LEN)
    coords, grid = grid_coords(4, 6, batch=2)
    cos, sin = rope(coords, grid)
    assert cos.shape == sin.shape == (2, 24, 1, HEAD_DIM // 2)
    assert torch.isfinite(cos).all() and torch.isfinite(sin).all()
    torch.testing.assert_close(cos**2 + sin**2, torch.ones_like(cos))
    assert_all_distinct(torch.cat([cos, sin], -1)[0, :, 0])


def test_rope_rotation_keeps_norms_and_scores_depend_on_relative_position_only():
    rope = Rope(HEAD_DIM, mode="absolute", max_len=MAX_LEN)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 3, HEAD_DIM, generator=generator)  # one token, 3 heads

    def rotated(x, position):
        cos, sin = rope(*at(position, grid=(MAX_LEN, MAX_LEN)))
        return apply_rope(x, cos, sin)

    torch.testing.assert_close(rotated(q, (3, 5)).norm(dim=-1), q.norm(dim=-1))

    def score(pq, pk):
        return (rotated(q, pq) * rotated(k, pk)).sum(-1)

    # Same offset (1, -2) at two places: same score; a different offset: a different score.
    torch.testing.assert_close(score((2, 7), (1, 9)), score((6, 3), (5, 5)))
    assert not torch.allclose(score((2, 7), (1, 9)), score((2, 7), (9, 1)))


def test_rope_fractional_angles_are_resolution_independent():
    rope = Rope(HEAD_DIM, mode="fractional", max_len=MAX_LEN)
    small = torch.cat(rope(*at((2, 1), grid=(4, 3))), -1)
    large = torch.cat(rope(*at((4, 3), grid=(8, 9))), -1)
    torch.testing.assert_close(small, large)


def test_rope_needs_an_even_head_dim_with_a_pair_per_axis():
    with pytest.raises(ValueError, match="over 2 axes needs an even head_dim of at least 4, got 17"):
        Rope(17, mode="absolute", max_len=MAX_LEN)
    with pytest.raises(ValueError, match="over 3 axes needs an even head_dim of at least 6, got 4"):
        Rope(4, num_axes=3, mode="absolute", max_len=MAX_LEN)
    with pytest.raises(ValueError, match="beyond the absolute position table"):
        Rope(HEAD_DIM, mode="absolute", max_len=4)(*at((4, 0), grid=(5, 1)))


def clip_coords(t: int, rows: int, cols: int):
    """(coords, grid) [1, t·rows·cols, 3] for every tubelet of a clip."""
    ts, ys, xs = torch.meshgrid(torch.arange(t), torch.arange(rows), torch.arange(cols), indexing="ij")
    coords = torch.stack([ts.reshape(-1), ys.reshape(-1), xs.reshape(-1)], -1)
    return coords[None], torch.tensor([t, rows, cols]).expand_as(coords)[None]


@pytest.mark.parametrize("kind, mode, combine", [v for v in VARIANTS if not (v[2] == "stack" and DIM % 3)]
                         + [(k, m, "stack") for k in ("learned", "sincos") for m in POS_MODES])  # fmt: skip
def test_three_axes_embed_every_tubelet_differently(kind, mode, combine):
    dim = 30 if combine == "stack" else DIM  # stack needs the width divisible by the 3 axes
    torch.manual_seed(0)
    embed = FactorizedPosEmbed(dim, num_axes=3, kind=kind, mode=mode, combine=combine, max_len=MAX_LEN, fourier_bands=4)
    assert len(embed.axes) == 3
    out = embed(*clip_coords(3, 4, 5))[0]
    assert out.shape == (60, dim) and torch.isfinite(out).all()
    assert_all_distinct(out)


def test_three_axis_stack_gives_each_axis_its_own_third():
    torch.manual_seed(0)
    embed = FactorizedPosEmbed(30, num_axes=3, kind="learned", mode="absolute", combine="stack", max_len=MAX_LEN)
    out = embed(torch.tensor([[[0, 1, 2], [0, 3, 2], [4, 1, 2]]]), torch.full((1, 3, 3), 8))[0]
    torch.testing.assert_close(out[0, :10], out[1, :10])  # same time
    torch.testing.assert_close(out[0, 20:], out[1, 20:])  # same column
    torch.testing.assert_close(out[0, 10:], out[2, 10:])  # same row and column
    assert not torch.allclose(out[0, :10], out[2, :10])
    with pytest.raises(ValueError, match="dim divisible by the 3 axes, got 32"):
        FactorizedPosEmbed(32, num_axes=3, combine="stack")


def test_three_axis_rope_scores_depend_on_the_relative_offset_only():
    head_dim = 16  # 8 pairs: 2 per axis rotate, 2 stay put
    rope = Rope(head_dim, num_axes=3, mode="absolute", max_len=MAX_LEN)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 2, head_dim, generator=generator)

    def rotated(x, position):
        coords = torch.tensor([[position]])
        cos, sin = rope(coords, torch.full_like(coords, MAX_LEN))
        return apply_rope(x, cos, sin)

    def score(pq, pk):
        return (rotated(q, pq) * rotated(k, pk)).sum(-1)

    torch.testing.assert_close(score((1, 2, 7), (0, 1, 9)), score((5, 6, 3), (4, 5, 5)))
    for moved in [(2, 2, 7), (1, 3, 7), (1, 2, 8)]:  # every axis changes the score
        assert not torch.allclose(score((1, 2, 7), (0, 1, 9)), score(moved, (0, 1, 9)))
    cos, _ = rope(*clip_coords(2, 2, 2))
    assert torch.equal(cos[..., 6:], torch.ones_like(cos[..., 6:])), "the 2 left-over pairs are not rotated"
