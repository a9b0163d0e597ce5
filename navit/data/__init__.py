"""Data: sources that stream item dicts (``image``, ``video``, ``label``, ``caption``, ``mask``, ...),
opened by name from a registry, and the loader that packs them into batches.

The built-in generated sets live in :mod:`navit.synthetic`; decoding in :mod:`navit.media`.
"""

from navit.data.folder import ImageFolder
from navit.data.labels import with_class_names
from navit.data.manifest import Manifest
from navit.data.registry import open_source, register_source
from navit.data.stream import IndexedSource, Part, Record, Source, Subset, split_holdout
from navit.data.webdataset import Shards

__all__ = [
    "ImageFolder",
    "IndexedSource",
    "Manifest",
    "Part",
    "Record",
    "Shards",
    "Source",
    "Subset",
    "open_source",
    "register_source",
    "split_holdout",
    "with_class_names",
]
