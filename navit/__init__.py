"""navit: Patch n' Pack Vision Transformers at native resolution and aspect ratio."""

from navit.config import NaViTConfig, list_models
from navit.model import NaViT, create_model
from navit.packing import PackedBatch, pack, pack_images
from navit.patchify import PatchedImage, image_to_tokens
from navit.token_drop import BetaRate, ConstantRate, ResolutionRate, TokenDropper, UniformRate

__version__ = "0.1.0"

__all__ = [
    "NaViT",
    "NaViTConfig",
    "PackedBatch",
    "PatchedImage",
    "TokenDropper",
    "ConstantRate",
    "UniformRate",
    "BetaRate",
    "ResolutionRate",
    "create_model",
    "image_to_tokens",
    "list_models",
    "pack",
    "pack_images",
]
