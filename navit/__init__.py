"""navit: Patch n' Pack Vision Transformers at native resolution, aspect ratio and duration."""

from navit.batch import Example, PackedBatch
from navit.config import NaViTConfig, list_models
from navit.inference import load_model, save_model
from navit.model import NaViT, create_model
from navit.packing import pack, pack_images
from navit.patchify import image_to_example
from navit.processor import Processor
from navit.token_drop import BetaRate, ConstantRate, ResolutionRate, TokenDropper, UniformRate

__version__ = "0.1.0"

__all__ = [
    "NaViT",
    "NaViTConfig",
    "PackedBatch",
    "Example",
    "Processor",
    "TokenDropper",
    "ConstantRate",
    "UniformRate",
    "BetaRate",
    "ResolutionRate",
    "create_model",
    "image_to_example",
    "list_models",
    "load_model",
    "pack",
    "pack_images",
    "save_model",
]
