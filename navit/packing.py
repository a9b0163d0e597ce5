"""Patch n' Pack: the ``PackedBatch`` contract and the greedy packer that builds it.

Tokens of several images share one fixed-length sequence. Each image's tokens are contiguous in
its sequence, sequences are filled from the front and padding sits at the end; the attention
backends and pooling rely on exactly this layout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple, Sequence

import numpy as np
import torch

from navit.patchify import PatchedImage, image_to_tokens
from navit.token_drop import TokenDropper

PAD = -1  # segment id of padding tokens and slot id of empty pooling slots

STRATEGIES = ("first_fit", "first_fit_decreasing")


@dataclass
class PackedBatch:
    """Fixed-shape tensors for ``B`` sequences of ``L`` tokens with up to ``E`` images each.

    ``segment_ids[b, t]`` is the pooling slot (0..E-1) of the image that token ``t`` of sequence
    ``b`` belongs to, or ``PAD``. ``slot_to_image[b, e]`` is the index, in the caller's input
    order, of the image in slot ``e`` of sequence ``b``, or ``PAD`` for an empty slot. Model
    outputs are returned in input order by inverting this map.
    """

    patches: torch.Tensor  # [B, L, patch_dim]
    coords: torch.Tensor  # [B, L, 2] long (row, col); zeros at padding
    segment_ids: torch.Tensor  # [B, L] long, PAD at padding
    grid_sizes: torch.Tensor  # [B, E, 2] long (rows, cols) of each slot's full grid; 0 if empty
    slot_to_image: torch.Tensor  # [B, E] long, PAD if empty

    def __post_init__(self) -> None:
        b, length = self.segment_ids.shape
        e = self.slot_to_image.shape[1]
        expected = {
            "patches": (b, length),
            "coords": (b, length),
            "grid_sizes": (b, e, 2),
            "slot_to_image": (b, e),
        }
        for name, prefix in expected.items():
            shape = tuple(getattr(self, name).shape)
            if shape[: len(prefix)] != prefix:
                raise ValueError(f"PackedBatch.{name} has shape {shape}; expected {prefix}+...")

    @property
    def num_seqs(self) -> int:
        return self.segment_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.segment_ids.shape[1]

    @property
    def max_images_per_seq(self) -> int:
        return self.slot_to_image.shape[1]

    @property
    def num_images(self) -> int:
        return int((self.slot_to_image != PAD).sum())

    @property
    def token_mask(self) -> torch.Tensor:
        """[B, L] bool, True at real (non-padding) tokens."""
        return self.segment_ids != PAD

    @property
    def num_real_tokens(self) -> int:
        return int(self.token_mask.sum())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.num_real_tokens / self.segment_ids.numel()

    def image_slots(self) -> torch.Tensor:
        """[N] index into the flattened ``B·E`` slots of each image, in input order."""
        flat = self.slot_to_image.reshape(-1)
        filled = torch.nonzero(flat != PAD).squeeze(1)
        slots = torch.empty_like(filled)
        slots[flat[filled]] = filled
        return slots

    def token_grid_sizes(self) -> torch.Tensor:
        """[B, L, 2] full grid size of each token's image (ones at padding, never zero)."""
        slot = self.segment_ids.clamp(min=0)
        grid = torch.gather(self.grid_sizes, 1, slot[..., None].expand(-1, -1, 2))
        return torch.where(self.token_mask[..., None], grid, torch.ones_like(grid))

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> "PackedBatch":
        return PackedBatch(
            **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        )

    def pin_memory(self) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


def assign_first_fit(
    lengths: Sequence[int],
    max_seq_len: int,
    *,
    max_images_per_seq: int | None = None,
    num_seqs: int | None = None,
    strategy: str = "first_fit",
) -> list[int]:
    """Sequence index for each item (``PAD`` for items left for the next batch).

    First fit (the paper's packer): each item goes into the first sequence with room for it and
    a free pooling slot. ``first_fit_decreasing`` visits long items first, which packs tighter.
    With ``num_seqs`` the number of sequences is fixed and items that fit nowhere are left over;
    without it, new sequences open as needed and nothing is left over.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if max_images_per_seq is not None and max_images_per_seq < 1:
        raise ValueError(f"max_images_per_seq must be >= 1, got {max_images_per_seq}")
    if num_seqs is not None and num_seqs < 1:
        raise ValueError(f"num_seqs must be >= 1, got {num_seqs}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; expected one of {STRATEGIES}")
    sizes = np.asarray(lengths, dtype=np.int64)
    for i, n in enumerate(sizes.tolist()):
        if not 1 <= n <= max_seq_len:
            raise ValueError(f"image {i} has {n} tokens; it must have 1..max_seq_len={max_seq_len}")
    order = np.argsort(-sizes, kind="stable") if strategy == "first_fit_decreasing" else range(len(sizes))
    e_max = max_images_per_seq or len(sizes) or 1

    capacity = num_seqs if num_seqs is not None else max(1, len(sizes))
    room = np.full(capacity, max_seq_len, dtype=np.int64)
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
    packed: list[int]  # indices into the input of the images in ``batch``, in input order
    leftover: list[int]  # indices of the images that did not fit, for the next batch


def pack(
    images: Sequence[PatchedImage],
    max_seq_len: int,
    *,
    max_images_per_seq: int | None = None,
    num_seqs: int | None = None,
    strategy: str = "first_fit",
) -> PackResult:
    """Pack patchified images into sequences of ``max_seq_len`` tokens.

    The batch numbers its images 0..N-1 in the order of ``packed`` (input order, leftovers
    skipped), which is the row order of model outputs. With ``num_seqs`` and
    ``max_images_per_seq`` both set, every batch has the same shapes (for ``torch.compile``).
    """
    if not images:
        raise ValueError("cannot pack an empty list of images")
    lengths = [image.num_tokens for image in images]
    seq_of = assign_first_fit(
        lengths,
        max_seq_len,
        max_images_per_seq=max_images_per_seq,
        num_seqs=num_seqs,
        strategy=strategy,
    )
    packed = [i for i, s in enumerate(seq_of) if s != PAD]
    leftover = [i for i, s in enumerate(seq_of) if s == PAD]
    if not packed:
        raise ValueError("no image fits the requested sequences")
    # Within a sequence, images keep input order; this fixes each image's slot and offset.
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
    e = max_images_per_seq or max(slots_used)

    seq_t = torch.tensor([seq_of[i] for i in packed])
    rank_t = torch.empty(len(packed), dtype=torch.long)
    rank_t[torch.tensor(packed).argsort()] = torch.arange(len(packed))
    slot_t = torch.tensor(slot_in_seq)
    n_t = torch.tensor([lengths[i] for i in packed])
    start_t = seq_t * max_seq_len + torch.tensor(offset_in_seq)
    # Flat position of every token: its image's start plus its rank within the image.
    token_image = torch.repeat_interleave(torch.arange(len(packed)), n_t)
    first_token = torch.cumsum(n_t, 0) - n_t
    flat_pos = start_t[token_image] + torch.arange(int(n_t.sum())) - first_token[token_image]

    first = images[packed[0]]
    patch_dim = first.patches.shape[1]
    patches = first.patches.new_zeros(b * max_seq_len, patch_dim)
    patches[flat_pos] = torch.cat([images[i].patches for i in packed])
    coords = torch.zeros(b * max_seq_len, first.coords.shape[1], dtype=torch.long)
    coords[flat_pos] = torch.cat([images[i].coords for i in packed]).long()
    segment_ids = torch.full((b * max_seq_len,), PAD, dtype=torch.long)
    segment_ids[flat_pos] = slot_t[token_image]

    slot_to_image = torch.full((b, e), PAD, dtype=torch.long)
    slot_to_image[seq_t, slot_t] = rank_t
    grid_sizes = torch.zeros(b, e, 2, dtype=torch.long)
    grid_sizes[seq_t, slot_t] = torch.tensor([images[i].grid for i in packed])

    batch = PackedBatch(
        patches=patches.view(b, max_seq_len, patch_dim),
        coords=coords.view(b, max_seq_len, -1),
        segment_ids=segment_ids.view(b, max_seq_len),
        grid_sizes=grid_sizes,
        slot_to_image=slot_to_image,
    )
    return PackResult(batch, sorted(packed), leftover)


def pack_images(
    images: Sequence[torch.Tensor],
    patch_size: int = 16,
    max_seq_len: int = 1024,
    *,
    max_images_per_seq: int | None = None,
    token_dropper: TokenDropper | None = None,
    strategy: str = "first_fit",
) -> PackedBatch:
    """Patchify float [C, H, W] images of any sizes at native resolution and pack them all.

    Sides are resized to the nearest multiple of ``patch_size``; an image with more than
    ``max_seq_len`` patches is downscaled (aspect kept) to fit. No image is dropped: sequences are
    added until every image has a place. ``token_dropper`` (in training mode) drops tokens per
    image before packing.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        raise TypeError("pack_images takes a list of [C, H, W] images; wrap a single image in a list")
    tokens = [image_to_tokens(image, patch_size, max_seq_len, index=i) for i, image in enumerate(images)]
    channels = {image.shape[0] for image in images}
    if len(channels) > 1:
        raise ValueError(f"images have different channel counts {sorted(channels)}")
    if token_dropper is not None:
        tokens = token_dropper(tokens)
    result = pack(tokens, max_seq_len, max_images_per_seq=max_images_per_seq, strategy=strategy)
    assert not result.leftover, "packing without num_seqs never leaves images over"
    return result.batch
