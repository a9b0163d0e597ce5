"""What the built-in sets share: ``count`` items, item ``i`` a pure function of ``(seed, i)``."""

from __future__ import annotations

from typing import ClassVar

from PIL import Image

from navit.data.stream import IndexedSource, check_index


class Generated(IndexedSource):
    """A generated set. Subclasses set ``kind`` (its name in data specs), ``count`` and ``seed``,
    and give ``item(i)``."""

    kind: ClassVar[str]
    count: int
    seed: int

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.count} items, seed={self.seed})"

    def _check(self, index: int) -> int:
        return check_index(index, self.count, self)

    def describe(self, index: int) -> str:
        return f"{self.kind}(seed={self.seed})[{index}]"

    def load(self, index: int) -> Image.Image:
        """The item's picture (a clip's first frame)."""
        return self.item(index)["image"]

    def fields(self, index: int) -> dict[str, bytes]:
        """The item as WebDataset fields: a generated picture or mask has no file, so it is encoded
        as a PNG (lossless), a clip as an H.264 MP4 (needs PyAV); see :mod:`navit.data.shard_writer`."""
        from navit.data.shard_writer import encode_item

        return encode_item(self.item(index))
