"""The contract between data and model: ``Example`` (one image or clip as tokens) and
``PackedBatch`` (many examples packed into fixed-length sequences), and ``PAD``.

Everything else builds on these two types: the data side produces them, the model consumes them.
Nothing here depends on how many axes an example has beyond the width of its coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

PAD = -1  # segment id of padding tokens and slot id of empty pooling slots


@dataclass
class Example:
    """One image or clip as a list of tokens, before packing.

    ``coords`` holds one integer coordinate per axis for each token: (row, col) for images,
    (time, row, col) for clips. ``grid`` is the full token grid (one size per axis), also after
    token dropping, so fractional positions stay those of the whole example. ``fields`` are
    per-token tensors (a target class per patch, a mask patch, ...) that travel with the tokens
    through token dropping and packing.
    """

    patches: torch.Tensor  # [n, patch_dim]
    coords: torch.Tensor  # [n, A] long
    grid: tuple[int, ...]  # A sizes of the full token grid
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # each [n, ...]

    def __post_init__(self) -> None:
        n = self.patches.shape[0]
        if self.coords.shape != (n, len(self.grid)):
            raise ValueError(
                f"Example.coords has shape {tuple(self.coords.shape)}; expected ({n}, {len(self.grid)}) "
                f"for {n} tokens on a {len(self.grid)}-axis grid {self.grid}"
            )
        for name, value in self.fields.items():
            if value.shape[:1] != (n,):
                raise ValueError(f"Example field {name!r} has shape {tuple(value.shape)}; expected ({n}, ...)")

    @property
    def num_tokens(self) -> int:
        return self.patches.shape[0]

    @property
    def num_axes(self) -> int:
        return len(self.grid)

    def select(self, index: torch.Tensor) -> "Example":
        """The tokens at ``index`` (with their coordinates and fields); the grid stays whole."""
        return Example(
            self.patches[index], self.coords[index], self.grid, {k: v[index] for k, v in self.fields.items()}
        )


@dataclass
class PackedBatch:
    """Fixed-shape tensors for ``B`` sequences of ``L`` tokens with up to ``E`` examples each.

    ``segment_ids[b, t]`` is the pooling slot (0..E-1) of the example that token ``t`` of
    sequence ``b`` belongs to, or ``PAD``. ``slot_to_example[b, e]`` is the index, in the
    caller's input order, of the example in slot ``e`` of sequence ``b``, or ``PAD`` for an
    empty slot. Model outputs are returned in input order by inverting this map. ``fields`` are
    per-token tensors [B, L, ...] packed like the patches (zeros at padding).
    """

    patches: torch.Tensor  # [B, L, patch_dim]
    coords: torch.Tensor  # [B, L, A] long; zeros at padding
    segment_ids: torch.Tensor  # [B, L] long, PAD at padding
    grid_sizes: torch.Tensor  # [B, E, A] long: each slot's full token grid; 0 if empty
    slot_to_example: torch.Tensor  # [B, E] long, PAD if empty
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # each [B, L, ...]

    def __post_init__(self) -> None:
        b, length = self.segment_ids.shape
        e, axes = self.slot_to_example.shape[1], self.coords.shape[-1]
        expected = {
            "patches": (b, length, self.patches.shape[-1]),
            "coords": (b, length, axes),
            "grid_sizes": (b, e, axes),
            "slot_to_example": (b, e),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"PackedBatch.{name} has shape {tuple(getattr(self, name).shape)}; expected {shape}")
        for name, value in self.fields.items():
            if tuple(value.shape[:2]) != (b, length):
                raise ValueError(
                    f"PackedBatch.fields[{name!r}] has shape {tuple(value.shape)}; expected ({b}, {length}, ...)"
                )

    @property
    def num_seqs(self) -> int:
        return self.segment_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.segment_ids.shape[1]

    @property
    def max_examples_per_seq(self) -> int:
        return self.slot_to_example.shape[1]

    @property
    def num_axes(self) -> int:
        return self.coords.shape[-1]

    @property
    def num_examples(self) -> int:
        return int((self.slot_to_example != PAD).sum())

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

    def example_slots(self) -> torch.Tensor:
        """[N] index into the flattened ``B·E`` slots of each example, in input order."""
        flat = self.slot_to_example.reshape(-1)
        filled = torch.nonzero(flat != PAD).squeeze(1)
        slots = torch.empty_like(filled)
        slots[flat[filled]] = filled
        return slots

    def token_example(self) -> torch.Tensor:
        """[B, L] input-order index of each token's example, ``PAD`` at padding."""
        example = torch.gather(self.slot_to_example, 1, self.segment_ids.clamp(min=0))
        return torch.where(self.token_mask, example, torch.full_like(example, PAD))

    def example_lengths(self) -> torch.Tensor:
        """[N] tokens of each example in the batch (after any dropping), in input order."""
        return torch.bincount(self.token_example()[self.token_mask], minlength=self.num_examples)

    def token_grid_sizes(self) -> torch.Tensor:
        """[B, L, A] full grid size of each token's example (ones at padding, never zero)."""
        slot = self.segment_ids.clamp(min=0)
        grid = torch.gather(self.grid_sizes, 1, slot[..., None].expand(-1, -1, self.num_axes))
        return torch.where(self.token_mask[..., None], grid, torch.ones_like(grid))

    def unpack(self, values: torch.Tensor, fill: float | int = 0) -> list[torch.Tensor]:
        """Per-token ``values`` [B, L, ...] back on each example's own grid, in input order.

        Example ``j`` gets a tensor [*grid_j, ...]; positions whose token is not in the batch
        (dropped) hold ``fill``. One scatter for the whole batch, no loop over tokens.
        """
        if tuple(values.shape[:2]) != (self.num_seqs, self.seq_len):
            raise ValueError(
                f"unpack takes per-token values [B={self.num_seqs}, L={self.seq_len}, ...], "
                f"got shape {tuple(values.shape)}"
            )
        mask = self.token_mask
        grids = self.grid_sizes.flatten(0, 1)[self.example_slots()].to(values.device)  # [N, A]
        sizes = grids.prod(-1)
        starts = torch.cumsum(sizes, 0) - sizes
        # Row-major offset of each real token inside its example's grid.
        strides = torch.flip(torch.cumprod(torch.flip(grids, [1]), 1), [1])
        strides = torch.cat([strides[:, 1:], torch.ones_like(strides[:, :1])], 1)
        example = self.token_example()[mask].to(values.device)
        offset = (self.coords[mask].to(values.device) * strides[example]).sum(-1)
        flat = values.new_full((int(sizes.sum()), *values.shape[2:]), fill)
        flat[starts[example] + offset] = values[mask]
        pieces = flat.split(sizes.tolist())
        return [p.view(*g.tolist(), *values.shape[2:]) for p, g in zip(pieces, grids)]

    def _map(self, fn) -> "PackedBatch":
        tensors = {f.name: fn(getattr(self, f.name)) for f in fields(self) if f.name != "fields"}
        return PackedBatch(**tensors, fields={k: fn(v) for k, v in self.fields.items()})

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> "PackedBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        return self._map(torch.Tensor.pin_memory)
