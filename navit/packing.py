"""Patch n' Pack: the greedy first-fit packer that builds a :class:`~navit.batch.PackedBatch`.

Tokens of several examples (images or clips) share one fixed-length sequence. Each example's
tokens are contiguous in its sequence, sequences are filled from the front and padding sits at
the end; the attention backends and pooling rely on exactly this layout. Nothing here depends on
how many axes an example has beyond the width of its coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from navit.batch import PAD, Example, PackedBatch
from navit.config import option
from navit.patchify import image_to_example
from navit.token_drop import TokenDropper

STRATEGIES = ("first_fit", "first_fit_decreasing")


@dataclass
class PackingConfig:
    """How a loader packs: its batches are ``num_seqs`` sequences of ``seq_len`` tokens with up to
    ``max_examples_per_seq`` examples each, packed first fit whenever ``buffer_size`` examples wait."""

    seq_len: int = option(256, "tokens per packed sequence")
    num_seqs: int = option(4, "sequences per batch")
    max_examples_per_seq: int = option(32, "most examples in one sequence (pooling slots)")
    buffer_size: int = option(128, "examples the loader holds before it packs a batch")

    def __post_init__(self) -> None:
        for name in ("seq_len", "num_seqs", "max_examples_per_seq", "buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def assign_first_fit(
    lengths: Sequence[int],
    seq_len: int,
    *,
    max_examples_per_seq: int | None = None,
    num_seqs: int | None = None,
    strategy: str = "first_fit",
) -> list[int]:
    """Sequence index for each example (``PAD`` for examples left for the next batch).

    First fit (the paper's packer): each example goes into the first sequence with room for it
    and a free pooling slot. ``first_fit_decreasing`` visits long examples first, which packs
    tighter. With ``num_seqs`` the number of sequences is fixed and examples that fit nowhere
    are left over; without it, new sequences open as needed and nothing is left over.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_examples_per_seq is not None and max_examples_per_seq < 1:
        raise ValueError(f"max_examples_per_seq must be >= 1, got {max_examples_per_seq}")
    if num_seqs is not None and num_seqs < 1:
        raise ValueError(f"num_seqs must be >= 1, got {num_seqs}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; expected one of {STRATEGIES}")
    sizes = np.asarray(lengths, dtype=np.int64)
    for i, n in enumerate(sizes.tolist()):
        if not 1 <= n <= seq_len:
            raise ValueError(f"example {i} has {n} tokens; it must have 1..seq_len={seq_len}")
    order = np.argsort(-sizes, kind="stable") if strategy == "first_fit_decreasing" else range(len(sizes))
    e_max = max_examples_per_seq or len(sizes) or 1

    capacity = num_seqs if num_seqs is not None else max(1, len(sizes))
    room = np.full(capacity, seq_len, dtype=np.int64)
    count = np.zeros(capacity, dtype=np.int64)
    opened = capacity if num_seqs is not None else 0
    assignment = [PAD] * len(sizes)
    for i in order:
        n = sizes[i]
        fits = np.flatnonzero((room[:opened] >= n) & (count[:opened] < e_max))
        if fits.size:
            seq = int(fits[0])
        elif num_seqs is None:
            seq, opened = opened, opened + 1
        else:
            continue
        room[seq] -= n
        count[seq] += 1
        assignment[i] = seq
    return assignment


class PackResult(NamedTuple):
    batch: PackedBatch
    packed: list[int]  # indices into the input of the examples in ``batch``, in input order
    leftover: list[int]  # indices of the examples that did not fit, for the next batch


def _check_alike(examples: Sequence[Example]) -> None:
    """Examples packed together need the same patch size, axes and fields (one clear error)."""
    first = examples[0]
    signature = (first.patches.shape[1:], first.num_axes, {k: v.shape[1:] for k, v in first.fields.items()})
    for i, example in enumerate(examples):
        other = (example.patches.shape[1:], example.num_axes, {k: v.shape[1:] for k, v in example.fields.items()})
        if other != signature:
            raise ValueError(
                f"example {i} (patch values, axes, fields: {other}) differs from example 0 ({signature}); "
                "examples packed together need the same patch size, number of axes and per-token fields"
            )


def pack(
    examples: Sequence[Example],
    seq_len: int,
    *,
    max_examples_per_seq: int | None = None,
    num_seqs: int | None = None,
    strategy: str = "first_fit",
) -> PackResult:
    """Pack examples into sequences of ``seq_len`` tokens.

    The batch numbers its examples 0..N-1 in the order of ``packed`` (input order, leftovers
    skipped), which is the row order of model outputs. With ``num_seqs`` and
    ``max_examples_per_seq`` both set, every batch has the same shapes (for ``torch.compile``).
    """
    if not examples:
        raise ValueError("cannot pack an empty list of examples")
    _check_alike(examples)
    lengths = [example.num_tokens for example in examples]
    seq_of = assign_first_fit(
        lengths, seq_len, max_examples_per_seq=max_examples_per_seq, num_seqs=num_seqs, strategy=strategy
    )
    packed = [i for i, s in enumerate(seq_of) if s != PAD]
    leftover = [i for i, s in enumerate(seq_of) if s == PAD]
    if not packed:
        raise ValueError("no example fits the requested sequences")
    # Within a sequence, examples keep input order; this fixes each example's slot and offset.
    packed.sort(key=lambda i: (seq_of[i], i))
    used_seqs = max(seq_of[i] for i in packed) + 1
    b = num_seqs if num_seqs is not None else used_seqs

    slot_in_seq, offset_in_seq = [], []
    fill = [0] * b
    slots_used = [0] * b
    for i in packed:
        s = seq_of[i]
        slot_in_seq.append(slots_used[s])
        offset_in_seq.append(fill[s])
        slots_used[s] += 1
        fill[s] += lengths[i]
    e = max_examples_per_seq or max(slots_used)

    seq_t = torch.tensor([seq_of[i] for i in packed])
    rank_t = torch.empty(len(packed), dtype=torch.long)
    rank_t[torch.tensor(packed).argsort()] = torch.arange(len(packed))
    slot_t = torch.tensor(slot_in_seq)
    n_t = torch.tensor([lengths[i] for i in packed])
    start_t = seq_t * seq_len + torch.tensor(offset_in_seq)
    # Flat position of every token: its example's start plus its rank within the example.
    token_example = torch.repeat_interleave(torch.arange(len(packed)), n_t)
    first_token = torch.cumsum(n_t, 0) - n_t
    flat_pos = start_t[token_example] + torch.arange(int(n_t.sum())) - first_token[token_example]

    def scatter(parts: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        values = torch.cat(parts)
        out = values.new_zeros((b * seq_len, *values.shape[1:]), dtype=dtype)
        out[flat_pos] = values if dtype is None else values.to(dtype)
        return out.view(b, seq_len, *values.shape[1:])

    chosen = [examples[i] for i in packed]
    segment_ids = torch.full((b * seq_len,), PAD, dtype=torch.long)
    segment_ids[flat_pos] = slot_t[token_example]
    slot_to_example = torch.full((b, e), PAD, dtype=torch.long)
    slot_to_example[seq_t, slot_t] = rank_t
    grid_sizes = torch.zeros(b, e, chosen[0].num_axes, dtype=torch.long)
    grid_sizes[seq_t, slot_t] = torch.tensor([x.grid for x in chosen])

    batch = PackedBatch(
        patches=scatter([x.patches for x in chosen]),
        coords=scatter([x.coords for x in chosen], torch.long),
        segment_ids=segment_ids.view(b, seq_len),
        grid_sizes=grid_sizes,
        slot_to_example=slot_to_example,
        fields={name: scatter([x.fields[name] for x in chosen]) for name in chosen[0].fields},
    )
    return PackResult(batch, sorted(packed), leftover)


def pack_images(
    images: Sequence[torch.Tensor],
    patch_size: int = 16,
    seq_len: int = 1024,
    *,
    max_examples_per_seq: int | None = None,
    token_dropper: TokenDropper | None = None,
    strategy: str = "first_fit",
) -> PackedBatch:
    """The raw, differentiable call: patchify float [C, H, W] images of any sizes and pack them.

    Pixel values are used as they are (no normalisation) and sides are resized with torch's
    antialiased bilinear filter to the nearest multiple of ``patch_size``; an image with more
    than ``seq_len`` patches is downscaled (aspect kept) to fit. No image is dropped: sequences
    are added until every image has a place. ``token_dropper`` (in training mode) drops tokens
    per image before packing. To run a model on files or images as it was trained, use its
    processor instead: ``model.processor(images)`` (:class:`navit.Processor`).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        raise TypeError("pack_images takes a list of [C, H, W] images; wrap a single image in a list")
    examples = [image_to_example(image, patch_size, seq_len, index=i) for i, image in enumerate(images)]
    channels = {image.shape[0] for image in images}
    if len(channels) > 1:
        raise ValueError(f"images have different channel counts {sorted(channels)}")
    if token_dropper is not None:
        examples = token_dropper(examples)
    result = pack(examples, seq_len, max_examples_per_seq=max_examples_per_seq, strategy=strategy)
    assert not result.leftover, "packing without num_seqs never leaves examples over"
    return result.batch
