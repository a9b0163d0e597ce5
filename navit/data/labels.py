"""Labels matched by class name: a validation set whose classes are a model's, in the model's order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Iterator

import numpy as np

from navit.data.stream import IndexedSource, Part, Record, Source


class Relabeled(IndexedSource):
    """``source`` (indexed or a stream) with its labels renumbered into ``class_names`` by ``mapping``."""

    def __init__(self, source: Source, class_names: Sequence[str], mapping: list[int]) -> None:
        self.source, self.class_names, self.mapping = source, list(class_names), mapping
        self.provides = source.provides

    def __repr__(self) -> str:
        return f"Relabeled({self.source!r})"

    def __getattr__(self, name: str) -> Any:  # the source's own extras (caption, path, ...)
        if name.startswith("_") or name in ("source", "mapping"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def _relabel(self, item: dict[str, Any]) -> dict[str, Any]:
        """The item's class label, and its boxes' labels, renumbered."""
        out = {**item, "label": self.mapping[item["label"]]} if "label" in item else dict(item)
        if "box_labels" in item:
            out["box_labels"] = np.asarray(self.mapping, dtype=np.int64)[np.asarray(item["box_labels"], dtype=np.int64)]
        return out

    def __len__(self) -> int:
        return len(self.source)

    def item(self, index: int) -> dict[str, Any]:
        return self._relabel(self.source.item(index))

    def describe(self, index: int) -> str:
        return self.source.describe(index)

    def key(self, index: int) -> str:
        return self.source.key(index)

    def label(self, index: int) -> int:
        return self.mapping[self.source.label(index)]

    def parts(self, epoch: int, rank: int, world_size: int, *, shuffle: bool, seed: int, size: int) -> list[Part]:
        if isinstance(self.source, IndexedSource):
            return super().parts(epoch, rank, world_size, shuffle=shuffle, seed=seed, size=size)
        return self.source.parts(epoch, rank, world_size, shuffle=shuffle, seed=seed, size=size)

    def read(self, part: Part, start: int = 0) -> Iterator[Record]:
        if isinstance(self.source, IndexedSource):
            yield from super().read(part, start)
            return
        for record in self.source.read(part, start):
            yield record if record.item is None else record._replace(item=self._relabel(record.item))


def with_class_names(source: Source, class_names: Sequence[str], spec: str = "the data") -> Source:
    """``source`` with labels that index ``class_names`` (a model's classes), matched by name.

    A source whose classes are those names in that order is returned as it is; one that lacks
    some classes (a validation folder without one class) is renumbered, so no label shifts; one
    with a class the model does not know is refused, naming it.
    """
    names, wanted = list(source.class_names), list(class_names)
    if names == wanted:
        return source
    index = {name: i for i, name in enumerate(wanted)}
    unknown = [name for name in names if name not in index]
    if unknown:
        raise ValueError(
            f"{spec} has classes {unknown} that the model does not know; its classes are {wanted}"
        )
    return Relabeled(source, wanted, [index[name] for name in names])


