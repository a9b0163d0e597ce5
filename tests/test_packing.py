"""Patch n' Pack: the greedy packer and the PackedBatch layout every backend relies on."""

from __future__ import annotations

import pytest
import torch
from conftest import PATCH, image_of_slot, image_tokens, labelled_image, random_images
from hypothesis import given, settings
from hypothesis import strategies as st

from navit import TokenDropper, pack, pack_images
from navit.batch import PAD, PackedBatch
from navit.packing import STRATEGIES, assign_first_fit
from navit.batch import Example
from navit.patchify import grid_coords, image_to_example


@st.composite
def packing_problems(draw, fixed_num_seqs: bool | None = None):
    """Random token counts, a sequence length they each fit in, and packer options."""
    seq_len = draw(st.integers(1, 40))
    lengths = draw(st.lists(st.integers(1, seq_len), min_size=1, max_size=25))
    max_images = draw(st.none() | st.integers(1, 5))
    if fixed_num_seqs is None:
        num_seqs = draw(st.none() | st.integers(1, 4))
    else:
        num_seqs = draw(st.integers(1, 4)) if fixed_num_seqs else None
    strategy = draw(st.sampled_from(STRATEGIES))
    return dict(
        lengths=lengths,
        seq_len=seq_len,
        max_examples_per_seq=max_images,
        num_seqs=num_seqs,
        strategy=strategy,
    )


def pack_labelled(problem):
    images = [labelled_image(i, n) for i, n in enumerate(problem["lengths"])]
    options = {k: v for k, v in problem.items() if k != "lengths"}
    seq_len = options.pop("seq_len")
    return images, pack(images, seq_len, **options)


def occupancy(lengths, assignment, num_seqs):
    """(tokens used, images held) per sequence for an assignment."""
    used, count = [0] * num_seqs, [0] * num_seqs
    for n, seq in zip(lengths, assignment):
        if seq != PAD:
            used[seq] += n
            count[seq] += 1
    return used, count


def check_layout(batch: PackedBatch, images, packed: list[int]) -> None:
    """Everything the model and backends assume about a packed batch."""
    e = batch.max_examples_per_seq
    assert batch.num_examples == len(packed)
    # Image numbering: slot_to_example and image_slots are inverse maps over 0..N-1.
    flat = batch.slot_to_example.reshape(-1)
    assert sorted(flat[flat != PAD].tolist()) == list(range(len(packed)))
    assert torch.equal(flat[batch.example_slots()], torch.arange(len(packed)))

    owner = image_of_slot(batch)
    seen = set()
    for seq in range(batch.num_seqs):
        real = batch.token_mask[seq]
        num_real = int(real.sum())
        # Real tokens fill a prefix, padding sits at the end and is all zeros.
        assert real[:num_real].all() and not real[num_real:].any()
        assert (batch.patches[seq, num_real:] == 0).all()
        assert (batch.coords[seq, num_real:] == 0).all()
        slots = batch.segment_ids[seq, :num_real]
        assert ((slots >= 0) & (slots < e)).all()
        # Slots are used in order, images in a sequence keep input order.
        filled = batch.slot_to_example[seq]
        k = int((filled != PAD).sum())
        assert (filled[:k] != PAD).all() and (filled[k:] == PAD).all()
        assert filled[:k].tolist() == sorted(filled[:k].tolist())
        assert (batch.grid_sizes[seq, k:] == 0).all()
        start = 0
        for slot in range(k):
            positions = torch.nonzero(slots == slot).squeeze(1)
            # Each image's tokens are one contiguous run, slots following each other.
            assert positions.numel() > 0
            assert torch.equal(positions, torch.arange(positions[0], positions[0] + positions.numel()))
            assert int(positions[0]) == start, "images follow each other without gaps"
            start = int(positions[-1]) + 1
            source = images[packed[int(filled[slot])]]
            assert torch.equal(batch.patches[seq, positions], source.patches)
            assert torch.equal(batch.coords[seq, positions], source.coords)
            assert tuple(batch.grid_sizes[seq, slot].tolist()) == source.grid
            assert (owner[seq, positions] == filled[slot]).all()
            seen.add(packed[int(filled[slot])])
    assert seen == set(packed)


@settings(max_examples=150, deadline=None)
@given(packing_problems())
def test_assignment_respects_capacity_and_is_first_fit(problem):
    lengths, seq_len = problem["lengths"], problem["seq_len"]
    e_max = problem["max_examples_per_seq"] or len(lengths)
    assignment = assign_first_fit(
        lengths,
        seq_len,
        max_examples_per_seq=problem["max_examples_per_seq"],
        num_seqs=problem["num_seqs"],
        strategy=problem["strategy"],
    )
    assert len(assignment) == len(lengths)
    num_seqs = problem["num_seqs"] or max(assignment) + 1
    assert all(seq == PAD or 0 <= seq < num_seqs for seq in assignment)
    if problem["num_seqs"] is None:
        assert PAD not in assignment
        assert set(assignment) == set(range(num_seqs)), "sequences are opened without gaps"
    used, count = occupancy(lengths, assignment, num_seqs)
    assert all(u <= seq_len for u in used)
    assert all(c <= e_max for c in count)
    # First fit: nothing could have gone into an earlier sequence (room and slots only shrink,
    # so what does not fit at the end did not fit when the image was placed).
    for i, seq in enumerate(assignment):
        earlier = range(num_seqs) if seq == PAD else range(seq)
        for s in earlier:
            assert lengths[i] > seq_len - used[s] or count[s] == e_max, (
                f"image {i} ({lengths[i]} tokens) was put in {seq} but fits in sequence {s}"
            )


@settings(max_examples=150, deadline=None)
@given(packing_problems())
def test_pack_keeps_every_token_exactly_once_in_a_valid_layout(problem):
    images, result = pack_labelled(problem)
    batch = result.batch
    # Fixed shapes when asked for.
    assert batch.seq_len == problem["seq_len"]
    if problem["num_seqs"] is not None:
        assert batch.num_seqs == problem["num_seqs"]
    if problem["max_examples_per_seq"] is not None:
        assert batch.max_examples_per_seq == problem["max_examples_per_seq"]
    assert batch.patches.shape == (batch.num_seqs, batch.seq_len, 3)

    assert result.packed == sorted(result.packed)
    assert sorted(result.packed + result.leftover) == list(range(len(images)))
    check_layout(batch, images, result.packed)
    # Content round trip: every (image, token) label appears exactly once among real tokens.
    real = batch.patches[batch.token_mask]
    labels = [(int(i), int(t)) for i, t, _ in real.tolist()]
    expected = [(i, t) for i in result.packed for t in range(problem["lengths"][i])]
    assert sorted(labels) == expected
    assert batch.num_real_tokens == len(expected)


@settings(max_examples=100, deadline=None)
@given(packing_problems(fixed_num_seqs=False))
def test_pack_without_num_seqs_drops_nothing(problem):
    images, result = pack_labelled(problem)
    assert result.leftover == []
    assert result.packed == list(range(len(images)))
    # Output row j is input image j.
    for j, image in enumerate(images):
        assert torch.equal(image_tokens(result.batch, j)[0], image.patches)


@settings(max_examples=100, deadline=None)
@given(packing_problems(fixed_num_seqs=True))
def test_pack_with_num_seqs_leaves_exactly_the_unpacked_images(problem):
    images, result = pack_labelled(problem)
    in_batch = {int(result.batch.patches[s, t, 0]) for s, t in torch.nonzero(result.batch.token_mask).tolist()}
    assert set(result.packed) == in_batch
    assert set(result.leftover) == set(range(len(images))) - in_batch
    # A leftover image really had no room anywhere.
    for i in result.leftover:
        for seq in range(result.batch.num_seqs):
            room = result.batch.seq_len - int(result.batch.token_mask[seq].sum())
            free_slots = int((result.batch.slot_to_example[seq] == PAD).sum())
            limit = problem["max_examples_per_seq"]
            assert images[i].num_tokens > room or (limit is not None and free_slots == 0), (
                f"image {i} was left over although sequence {seq} has room"
            )


def test_leftover_before_a_packed_image_keeps_outputs_aligned():
    # 3 + 3 fit, the 6-token image between them does not: the batch holds inputs 0 and 2.
    images = [labelled_image(0, 3), labelled_image(1, 6), labelled_image(2, 3)]
    result = pack(images, 8, num_seqs=1)
    assert result.packed == [0, 2] and result.leftover == [1]
    for row, source in enumerate(result.packed):
        assert torch.equal(image_tokens(result.batch, row)[0], images[source].patches)


def test_first_fit_decreasing_visits_long_images_first():
    # Into sequences of 8: plain first fit puts 3+3 together and then needs one sequence per 5;
    # visiting the 5s first pairs each with a 3.
    lengths = [3, 3, 5, 5]
    assert assign_first_fit(lengths, 8, strategy="first_fit") == [0, 0, 1, 2]
    assert assign_first_fit(lengths, 8, strategy="first_fit_decreasing") == [0, 1, 0, 1]


def test_pack_images_round_trips_real_images_in_input_order():
    sizes = [(16, 24), (40, 8), (8, 8), (32, 32), (24, 16)]
    images = random_images(sizes)
    for strategy in STRATEGIES:
        batch = pack_images(images, patch_size=PATCH, seq_len=20, max_examples_per_seq=3, strategy=strategy)
        assert batch.num_examples == len(images)
        assert batch.max_examples_per_seq == 3
        assert (batch.token_mask.sum(1) <= 20).all()
        for j, image in enumerate(images):
            expected = image_to_example(image, PATCH, 20)
            patches, coords = image_tokens(batch, j)
            assert torch.equal(patches, expected.patches)
            assert torch.equal(coords, expected.coords)


def test_pack_images_is_deterministic_for_a_dropper_seed():
    images = random_images([(32, 48), (40, 40), (16, 64), (24, 24)])

    def packed(seed):
        return pack_images(images, PATCH, 40, token_dropper=TokenDropper(0.5, seed=seed))

    first, again, other = packed(3), packed(3), packed(4)
    for name in ("patches", "coords", "segment_ids", "grid_sizes", "slot_to_example"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.segment_ids, other.segment_ids) or not torch.equal(
        first.patches, other.patches
    ), "a different seed should drop different tokens"
    # Dropping shrinks images but keeps their full grids (for fractional positions).
    full = pack_images(images, PATCH, 40)
    assert first.num_real_tokens < full.num_real_tokens
    assert torch.equal(
        first.grid_sizes.flatten(0, 1)[first.example_slots()],
        full.grid_sizes.flatten(0, 1)[full.example_slots()],
    )


def test_packed_batch_rejects_inconsistent_shapes():
    batch = pack_images(random_images([(16, 16)]), PATCH, 8)
    with pytest.raises(ValueError, match="PackedBatch.coords has shape"):
        PackedBatch(
            patches=batch.patches,
            coords=batch.coords[:, :-1],
            segment_ids=batch.segment_ids,
            grid_sizes=batch.grid_sizes,
            slot_to_example=batch.slot_to_example,
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_len=0), "seq_len must be >= 1"),
        (dict(max_examples_per_seq=0), "max_examples_per_seq must be >= 1"),
        (dict(num_seqs=0), "num_seqs must be >= 1"),
        (dict(strategy="best_fit"), "unknown packing strategy 'best_fit'"),
        (dict(seq_len=4), r"example 1 has 5 tokens; it must have 1\.\.seq_len=4"),
    ],
)
def test_assign_first_fit_rejects_bad_arguments(kwargs, message):
    args = dict(seq_len=8) | kwargs
    with pytest.raises(ValueError, match=message):
        assign_first_fit([2, 5], **args)


def test_pack_rejects_empty_input():
    with pytest.raises(ValueError, match="empty list"):
        pack([], 8)


@pytest.mark.parametrize(
    "images, kwargs, error, message",
    [
        ([torch.zeros(3, 16, 16)], dict(seq_len=0), ValueError, "seq_len must be >= 1, got 0"),
        ([torch.zeros(3, 16, 16)], dict(max_examples_per_seq=0), ValueError, "max_examples_per_seq must be >= 1"),
        ([torch.zeros(3, 16, 16)], dict(patch_size=0), ValueError, "patch_size must be >= 1, got 0"),
        ([torch.zeros(3, 16, 16), torch.zeros(3, 16, 4)], {}, ValueError, "image 1 is 16x4, smaller than patch"),
        ([torch.zeros(3, 16, 16), torch.zeros(16, 16)], {}, ValueError, r"image 1 has shape \(16, 16\).*a 3-D"),
        ([torch.zeros(3, 16, 16, dtype=torch.uint8)], {}, TypeError, "image 0 has dtype torch.uint8; expected a float"),
        (torch.zeros(3, 16, 16), {}, TypeError, "takes a list of \\[C, H, W\\] images; wrap a single image"),
        ([torch.zeros(3, 16, 16), torch.zeros(1, 16, 16)], {}, ValueError, r"different channel counts \[1, 3\]"),
        ([], {}, ValueError, "cannot pack an empty list"),
    ],
    ids=["seq_len", "max_images", "patch_size", "too_small", "rank", "dtype", "single", "channels", "empty"],
)
def test_pack_images_rejects_bad_arguments(images, kwargs, error, message):
    with pytest.raises(error, match=message):
        pack_images(images, **(dict(patch_size=PATCH, seq_len=16) | kwargs))


def example_on_grid(grid, patch_dim=4, seed=0, **fields):
    """An example covering every cell of ``grid`` (any number of axes); patch 0 holds the cell's
    row-major index, so a token says where it came from."""
    coords = grid_coords(*grid)
    n = coords.shape[0]
    patches = torch.randn(n, patch_dim, generator=torch.Generator().manual_seed(seed))
    patches[:, 0] = torch.arange(n).float()
    return Example(patches, coords, tuple(grid), {k: v(n) for k, v in fields.items()})


@pytest.mark.parametrize("grids", [[(5,), (3,), (7,)], [(2, 3), (4, 1), (1, 1)], [(2, 2, 3), (1, 3, 2), (3, 1, 1)]],
                         ids=["1-axis", "2-axis", "3-axis"])  # fmt: skip
def test_per_token_fields_travel_with_their_tokens_through_dropping_packing_and_unpacking(grids):
    examples = [
        example_on_grid(g, seed=i, target=lambda n, i=i: 100 * i + torch.arange(n), pixels=lambda n: torch.rand(n, 2, 2))
        for i, g in enumerate(grids)
    ]
    dropped = TokenDropper(0.5, seed=1)(examples)
    assert sum(x.num_tokens for x in dropped) < sum(x.num_tokens for x in examples), "the dropper dropped"
    for source, kept in zip(examples, dropped):
        index = kept.patches[:, 0].long()  # original token of each kept token
        assert torch.equal(kept.fields["target"], source.fields["target"][index])
        assert torch.equal(kept.fields["pixels"], source.fields["pixels"][index])
        assert torch.equal(kept.coords, source.coords[index])
    batch = pack(dropped, 8, max_examples_per_seq=2).batch
    assert batch.num_axes == len(grids[0]) and batch.grid_sizes.shape[-1] == len(grids[0])
    assert batch.fields["target"].shape == batch.segment_ids.shape and batch.fields["pixels"].shape[2:] == (2, 2)
    # Unpacked onto each example's own grid: kept tokens where they belong, -1 where dropped.
    unpacked = batch.unpack(batch.fields["target"], fill=-1)
    for source, kept, grid_values in zip(examples, dropped, unpacked):
        assert tuple(grid_values.shape) == source.grid
        flat = grid_values.reshape(-1)
        index = kept.patches[:, 0].long()
        assert torch.equal(flat[index], source.fields["target"][index])
        missing = torch.ones(flat.numel(), dtype=torch.bool)
        missing[index] = False
        assert (flat[missing] == -1).all() and missing.sum() == source.num_tokens - kept.num_tokens
    assert batch.example_lengths().tolist() == [x.num_tokens for x in dropped]


def test_unpack_keeps_trailing_dims_and_checks_its_input():
    batch = pack([example_on_grid((2, 3)), example_on_grid((1, 2), seed=1)], 8).batch
    values = torch.arange(batch.num_seqs * batch.seq_len * 2).view(batch.num_seqs, batch.seq_len, 2).float()
    first, second = batch.unpack(values)
    assert first.shape == (2, 3, 2) and second.shape == (1, 2, 2)
    assert torch.equal(first.reshape(6, 2), values[0, :6]) and torch.equal(second.reshape(2, 2), values[0, 6:8])
    with pytest.raises(ValueError, match=r"unpack takes per-token values \[B=1, L=8, ...\]"):
        batch.unpack(values[:, :4])


def test_examples_packed_together_must_match():
    with pytest.raises(ValueError, match="example 1 .* differs from example 0"):
        pack([example_on_grid((2, 2)), example_on_grid((2, 2, 1))], 8)
    with pytest.raises(ValueError, match="example 1 .* differs from example 0"):
        pack([example_on_grid((2, 2), t=lambda n: torch.zeros(n)), example_on_grid((2, 2))], 8)
    with pytest.raises(ValueError, match=r"Example.coords has shape \(4, 2\); expected \(4, 3\)"):
        Example(torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.long), (1, 2, 2))
