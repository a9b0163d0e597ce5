"""How long the rows of one packed forward are, and which waiting inputs fill them.

A forward costs what its rows hold, padding included wherever a layer runs on every position
(the patch embedding, pooling, and the blocks whenever attention runs dense over the rows). So
rows are sized to what is waiting: of the candidate lengths (multiples of ``step`` from the
oldest input's length up to the model's ``max_tokens``, and that length itself), the one
whose first-fit packing takes the most tokens within ``max_batch_tokens``, and among those the
fewest padded positions (rows x length). One small image is then one row of its own length, not
a row of ``max_tokens``; many images fill as many rows as the token budget allows.
"""

from __future__ import annotations

from navit.batch import PAD
from navit.packing import assign_first_fit

STEP = 16  # candidate row lengths are multiples of this (and the oldest input's length)


def candidate_lengths(lengths: list[int], max_len: int, step: int = STEP) -> list[int]:
    """Row lengths worth trying: each at least the first (oldest) input's length, at most
    ``max_len`` (or the longest input, when longer)."""
    head, top = lengths[0], max(max_len, lengths[0])
    multiples = range(-(-head // step) * step, top + 1, step)
    return sorted({head, top, *multiples})


def packed_rows(lengths: list[int], max_batch_tokens: int, max_len: int, step: int = STEP) -> tuple[list[int], int]:
    """Indices of ``lengths`` (oldest first) that go into one packed forward, and its row length.

    The first input is always taken. Rows x length stays within ``max_batch_tokens`` (one row at
    least), inputs are placed first fit in their order, and those that fit nowhere wait.
    """
    best: tuple[tuple[int, int, int], list[int], int] | None = None
    for seq_len in candidate_lengths(lengths, max_len, step):
        fitting = [i for i, n in enumerate(lengths) if n <= seq_len]
        rows = assign_first_fit([lengths[i] for i in fitting], seq_len, num_seqs=max(1, max_batch_tokens // seq_len))
        taken = [i for i, row in zip(fitting, rows) if row != PAD]
        used = len({row for row in rows if row != PAD})
        key = (-sum(lengths[i] for i in taken), used * seq_len, seq_len)
        if best is None or key < best[0]:
            best = (key, taken, seq_len)
    assert best is not None and best[1][:1] == [0], "the oldest input always fits its own row"
    return best[1], best[2]
