"""Data sources: where items (images, labels, captions) come from: folders, manifests, tar shards, synthetic."""

from navit.media.image import load_rgb
from navit.data.sources import (
    IMAGE_EXTENSIONS,
    ImageFolder,
    ImageSource,
    Manifest,
    Subset,
    TarShards,
    open_source,
    shard,
    split_holdout,
    with_class_names,
)
from navit.synthetic.shapes import CLASS_NAMES, ShapeParams, SyntheticShapes, write_image_folder

__all__ = [
    "CLASS_NAMES",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "ImageSource",
    "Manifest",
    "ShapeParams",
    "Subset",
    "SyntheticShapes",
    "TarShards",
    "load_rgb",
    "open_source",
    "shard",
    "split_holdout",
    "with_class_names",
    "write_image_folder",
]
