"""Walking a data folder: every folder below it, through symbolic links, without looping."""

from __future__ import annotations

import os
from collections.abc import Iterator


def walk(top: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, its file names) for ``top`` and every folder below it, both in sorted order,
    following symbolic links; hidden entries (names starting with ``.``) are skipped. A folder
    reached again through a link (a link to a parent would loop forever) is walked only once."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield folder, sorted(f for f in files if not f.startswith("."))
