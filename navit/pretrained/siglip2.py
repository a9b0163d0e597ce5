"""SigLIP2 NaFlex from Hugging Face, read and written.

A local folder with ``config.json`` and ``model.safetensors`` (a ``Siglip2VisionModel`` or the
two-tower ``Siglip2Model``, as ``save_pretrained`` writes them) becomes a :class:`navit.NaViT` or
a :class:`navit.two_tower.ImageTextModel` with the same outputs, whose processor follows SigLIP2's
image processor (its grid rule, bilinear resizing in one step, mean and std 0.5) and which runs
packed. Nothing is downloaded. Keys are mapped one by one; a key that does not map, or maps to a
tensor of another shape, is refused by name. :func:`write_hf` writes a (fine-tuned) model back in
the Hugging Face layout.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from navit.config import NaViTConfig
from navit.model import NaViT
from navit.pretrained.weights import load_checked, match, read_json, read_weights, rename
from navit.processor import Processor
from navit.heads import TextTowerConfig
from navit.two_tower import ImageTextModel

ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu",
               "gelu_python": "gelu"}
MODEL_TYPES = ("siglip2", "siglip2_vision_model")
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's numbering


# ------------------------------------------------------------------------------------------------
# Configs


def activation(hf: dict[str, Any], tower: str) -> str:
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ACTIVATIONS:
        raise ValueError(f"SigLIP2 {tower} hidden_act={act!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def vision_config(hf: dict[str, Any]) -> NaViTConfig:
    """The NaViT config of a SigLIP2 vision config (``config.json`` or its ``vision_config``)."""
    if not hf.get("vision_use_head", True):
        raise ValueError("a SigLIP2 vision model without its pooling head (vision_use_head=false) is not supported")
    grid = math.isqrt(hf.get("num_patches", 256))
    if grid * grid != hf.get("num_patches", 256):
        raise ValueError(f"SigLIP2 num_patches={hf['num_patches']} is not a square grid of positions")
    return NaViTConfig(
        patch_size=hf.get("patch_size", 16), in_chans=hf.get("num_channels", 3), embed_dim=hf["hidden_size"],
        depth=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
        act=activation(hf, "vision"), norm_eps=hf.get("layer_norm_eps", 1e-6), qkv_bias=True, qk_norm=False,
        pos_embed="grid", pos_grid=grid, pos_interp="bilinear", pool="map", num_classes=0,
    )  # fmt: skip


def text_tower_config(hf: dict[str, Any]) -> TextTowerConfig:
    """The ``text-tower`` head of a SigLIP2 two-tower config: its text model, the text head (a
    biased projection), no image projection, the sigmoid loss's scale and bias."""
    text = hf["text_config"]
    return TextTowerConfig(
        embed_dim=text.get("projection_size") or text["hidden_size"], loss="sigmoid",
        text_width=text["hidden_size"], text_depth=text["num_hidden_layers"], text_heads=text["num_attention_heads"],
        text_max_len=text.get("max_position_embeddings", 64), vocab_size=text["vocab_size"],
        text_mlp_dim=text["intermediate_size"], text_act=activation(text, "text"), text_pool="last",
        text_norm_eps=text.get("layer_norm_eps", 1e-6), image_proj=False, text_proj_bias=True,
    )  # fmt: skip


def processor_for(config: NaViTConfig, folder: Path | None = None) -> Processor | None:
    """SigLIP2's preprocessing, from ``preprocessor_config.json`` when the folder has one (a
    folder without one gets SigLIP2's defaults, with a warning; None for a model no processor
    feeds, e.g. 4 channels). Its rescaling and normalisation, applied to 0-255 pixels, become
    one mean and std on navit's [0, 1] pixels; a setting navit cannot follow, or a patch size
    other than ``config.json``'s, is refused by name."""
    if not Processor.can_feed(config):
        return None
    path = folder / "preprocessor_config.json" if folder is not None else None
    values = read_json(path) if path is not None and path.exists() else {}
    if path is not None and not path.exists():
        warnings.warn(f"{folder} has no preprocessor_config.json: using SigLIP2's default preprocessing "
                      "(max_num_patches=256, bilinear, mean and std 0.5); copy the model's preprocessor_config.json "
                      "into the folder if it was trained with other settings", stacklevel=3)  # fmt: skip

    def refuse(key: str, why: str) -> ValueError:
        return ValueError(f"{path}: {key}={values[key]!r} {why}")

    if values.get("patch_size", config.patch_size) != config.patch_size:
        raise refuse("patch_size", f"does not match config.json's patch_size={config.patch_size}; the two files "
                                   "must come from the same model")  # fmt: skip
    if not values.get("do_resize", True):
        raise refuse("do_resize", "is not supported: SigLIP2 NaFlex resizes every image to fit max_num_patches")
    if values.get("resample", 2) not in RESAMPLE:
        raise refuse("resample", f"is not a filter navit has; expected one of {RESAMPLE}")

    def per_channel(key: str, default: float) -> tuple[float, ...]:
        value = values.get(key, default)
        value = [value] * config.in_chans if isinstance(value, (int, float)) else list(value)
        if len(value) != config.in_chans:
            raise refuse(key, f"has {len(value)} values for a {config.in_chans}-channel model")
        return tuple(float(v) for v in value)

    # (x * rescale_factor - mean) / std with x in 0..255 is (x / 255 - mean / s) / (std / s), s = 255 * rescale_factor.
    scale = 255 * values.get("rescale_factor", 1 / 255) if values.get("do_rescale", True) else 255.0
    if values.get("do_normalize", True):
        mean, std = per_channel("image_mean", 0.5), per_channel("image_std", 0.5)
    else:
        mean, std = (0.0,) * config.in_chans, (1.0,) * config.in_chans
    return Processor.for_model(
        config, max_tokens=values.get("max_num_patches", 256), grid_rule="fill",
        resample=RESAMPLE[values.get("resample", 2)], reducing_gap=None,
        mean=tuple(m / scale for m in mean), std=tuple(v / scale for v in std),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Weights: renamed one to one, except the few tensors that change shape (fused q/k/v, the position
# grid, the pooling probe and its fused in-projection, the logit scalars)

#: (Hugging Face prefix, navit prefix); ``{i}`` is a layer index.
VISION_NAMES = [
    ("embeddings.patch_embedding.", "patch_embed."),
    ("post_layernorm.", "norm."),
    ("head.attention.out_proj.", "pool.proj."),
    ("head.layernorm.", "pool.norm."),
    ("head.mlp.fc1.", "pool.mlp.0."),
    ("head.mlp.fc2.", "pool.mlp.2."),
    ("encoder.layers.{i}.layer_norm1.", "blocks.{i}.norm1."),
    ("encoder.layers.{i}.layer_norm2.", "blocks.{i}.norm2."),
    ("encoder.layers.{i}.self_attn.out_proj.", "blocks.{i}.attn.proj."),
    ("encoder.layers.{i}.mlp.fc1.", "blocks.{i}.mlp.0."),
    ("encoder.layers.{i}.mlp.fc2.", "blocks.{i}.mlp.3."),
]
TEXT_NAMES = [
    ("text_model.embeddings.token_embedding.", "text.token_embed."),
    ("text_model.final_layer_norm.", "text.norm."),
    ("text_model.head.", "text_proj."),
    ("text_model.encoder.layers.{i}.layer_norm1.", "text.blocks.{i}.norm1."),
    ("text_model.encoder.layers.{i}.layer_norm2.", "text.blocks.{i}.norm2."),
    ("text_model.encoder.layers.{i}.self_attn.out_proj.", "text.blocks.{i}.proj."),
    ("text_model.encoder.layers.{i}.mlp.fc1.", "text.blocks.{i}.mlp.0."),
    ("text_model.encoder.layers.{i}.mlp.fc2.", "text.blocks.{i}.mlp.2."),
]
#: The fused attention projections: (Hugging Face layer prefix, navit qkv prefix).
QKV_NAMES = [("encoder.layers.{i}.self_attn.", "blocks.{i}.attn.qkv."),
             ("text_model.encoder.layers.{i}.self_attn.", "text.blocks.{i}.qkv.")]  # fmt: skip


def to_navit(hf: dict[str, torch.Tensor], grid: int, origins: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """A SigLIP2 state dict (the vision model, or the two-tower model) in navit's names;
    ``origins``, if given, receives the Hugging Face name of each navit weight."""
    two_tower = any(k.startswith("text_model.") for k in hf)
    hf = {k.removeprefix("vision_model."): v for k, v in hf.items()}
    image = "image." if two_tower else ""
    out: dict[str, torch.Tensor] = {}
    for key, value in hf.items():
        before = set(out)
        if (found := match(key, QKV_NAMES[1][0]) or match(key, QKV_NAMES[0][0])) and found[1].startswith(("q_proj", "k_proj", "v_proj")):
            hf_prefix, ours = QKV_NAMES[1] if key.startswith("text_model.") else QKV_NAMES[0]
            part = found[1].split(".", 1)[1]
            target = (ours if key.startswith("text_model.") else image + ours).replace("{i}", found[0]) + part
            if target not in out:
                layer = hf_prefix.replace("{i}", found[0])
                names = [f"{layer}{p}_proj.{part}" for p in "qkv"]
                if missing := [name for name in names if name not in hf]:
                    raise ValueError(f"SigLIP2 weight {key!r} has no {missing[0]!r} to fuse with")
                out[target] = torch.cat([hf[name] for name in names])
        elif key == "embeddings.position_embedding.weight":
            if value.shape[0] != grid * grid:
                raise ValueError(f"SigLIP2 weight {key!r} has {value.shape[0]} positions; config.json's "
                                 f"num_patches={grid * grid} needs {grid}x{grid}")  # fmt: skip
            out[image + "pos_embed.table"] = value.reshape(grid, grid, -1)
        elif key == "head.probe":
            out[image + "pool.probe"] = value.reshape(-1)
        elif key.startswith("head.attention.in_proj_"):
            part = key.rsplit("_", 1)[1]
            dim = value.shape[0] // 3
            out[f"{image}pool.q.{part}"], out[f"{image}pool.kv.{part}"] = value[:dim], value[dim:]
        elif key == "text_model.embeddings.position_embedding.weight":
            out["text.pos_embed"] = value
        elif key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(())
        else:
            name = rename(key, TEXT_NAMES if key.startswith("text_model.") else VISION_NAMES)
            if name is None:
                raise ValueError(f"SigLIP2 weight {key!r} has no counterpart in navit")
            out[name if key.startswith("text_model.") else image + name] = value
        if origins is not None:
            origins.update({new: key for new in set(out) - before})
    return out


def to_hf(ours: dict[str, torch.Tensor], two_tower: bool) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_navit`: navit weights of a SigLIP2-shaped model in Hugging Face names."""
    vision = "vision_model." if two_tower else ""
    out: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        text = key.startswith(("text.", "text_proj."))
        local = key if text else key.removeprefix("image.")
        qkv = QKV_NAMES[1] if text else QKV_NAMES[0]
        if (found := match(local, qkv[1])) is not None:
            layer = ("" if text else vision) + qkv[0].replace("{i}", found[0])
            for p, part in zip("qkv", value.chunk(3)):
                out[f"{layer}{p}_proj.{found[1]}"] = part
        elif local == "pos_embed.table":
            out[vision + "embeddings.position_embedding.weight"] = value.flatten(0, 1)
        elif local == "pool.probe":
            out[vision + "head.probe"] = value.reshape(1, 1, -1)
        elif local.startswith("pool.q."):
            part = local.rsplit(".", 1)[1]
            kv = ours[key.replace("pool.q.", "pool.kv.")]
            out[f"{vision}head.attention.in_proj_{part}"] = torch.cat([value, kv])
        elif local.startswith("pool.kv."):
            continue  # written with pool.q
        elif local == "text.pos_embed":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif local in ("logit_scale", "logit_bias"):
            out[local] = value.reshape(1)
        else:
            name = rename(local, TEXT_NAMES if text else VISION_NAMES, reverse=True)
            if name is None:
                raise ValueError(f"navit weight {key!r} has no SigLIP2 counterpart")
            out[name if text else vision + name] = value
    return out


# ------------------------------------------------------------------------------------------------
# Folders


def read_config(folder: Path) -> dict[str, Any]:
    config = read_json(folder / "config.json")
    if config.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{folder} holds a {config.get('model_type')!r} model; navit reads {MODEL_TYPES}")
    return config


def read_navit_weights(folder: Path, grid: int, origins: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The folder's weights in navit's names (see :func:`to_navit`); errors name the folder."""
    try:
        return to_navit(read_weights(folder), grid, origins)
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from None


def image_tower(folder: str | os.PathLike[str]) -> tuple[NaViTConfig, Processor, dict[str, torch.Tensor]]:
    """The image model of a SigLIP2 folder (vision or two-tower) as a starting point for
    fine-tuning: its config, its processor and its weights in navit's names."""
    folder = Path(folder)
    config = read_config(folder)
    image = vision_config(config["vision_config"] if config["model_type"] == "siglip2" else config)
    weights = read_navit_weights(folder, image.pos_grid)
    weights = {k.removeprefix("image."): v for k, v in weights.items() if not k.startswith(("text", "logit_"))}
    return image, processor_for(image, folder), weights


def load_hf(folder: str | os.PathLike[str]) -> nn.Module:
    """A SigLIP2 NaFlex model (vision or two-tower) from a local Hugging Face folder, with its
    processor, and for the two-tower model the folder's tokenizer when it has one."""
    folder = Path(folder)
    config = read_config(folder)
    two_tower = config["model_type"] == "siglip2"
    image = vision_config(config["vision_config"] if two_tower else config)
    processor = processor_for(image, folder)
    model = ImageTextModel(image, processor, text_tower_config(config)) if two_tower else NaViT(image, processor)
    origins: dict[str, str] = {}
    load_checked(model, read_navit_weights(folder, image.pos_grid, origins), origins, folder)
    if two_tower and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "spiece.model")):
        from navit.text import PretrainedTokenizer

        model.text_tokenizer = PretrainedTokenizer.from_folder(folder, model.config.text_max_len)
    return model.eval()


def token_ids(model: ImageTextModel, folder: Path) -> dict[str, int | None]:
    """The text config's special token ids, from the model's tokenizer; a tokenizer loaded from
    a folder is written into ``folder`` beside the weights."""
    from navit.text import ByteTokenizer, PretrainedTokenizer

    tokenizer = getattr(model, "text_tokenizer", None)
    if isinstance(tokenizer, PretrainedTokenizer):
        tokenizer.tokenizer.save_pretrained(folder)
        tokenizer = tokenizer.tokenizer
    elif model.config.vocab_size == ByteTokenizer.NUM_BYTES + 3:
        return {"pad_token_id": ByteTokenizer.PAD, "bos_token_id": ByteTokenizer.BOS, "eos_token_id": ByteTokenizer.EOS}
    return {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "bos", "eos")}


def write_hf(model: nn.Module, folder: str | os.PathLike[str]) -> Path:
    """Write a SigLIP2-shaped navit model (from :func:`load_hf`, fine-tuned or not) as a Hugging
    Face folder that ``Siglip2VisionModel`` / ``Siglip2Model.from_pretrained`` read."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    two_tower = isinstance(model, ImageTextModel)
    image = model.image.config if two_tower else model.config
    if image.pos_embed != "grid" or image.pool != "map" or image.qk_norm or (not two_tower and image.num_classes):
        raise ValueError("only SigLIP2-shaped models (grid positions, MAP pooling, no qk-norm, no head) can be written")
    act = "gelu_pytorch_tanh" if image.act == "gelu_tanh" else "gelu"
    vision = {"model_type": "siglip2_vision_model", "hidden_size": image.embed_dim,
              "intermediate_size": image.hidden_dim, "num_hidden_layers": image.depth,
              "num_attention_heads": image.num_heads, "num_channels": image.in_chans, "patch_size": image.patch_size,
              "hidden_act": act, "layer_norm_eps": image.norm_eps, "num_patches": image.pos_grid**2}  # fmt: skip
    config = vision
    if two_tower:
        c = model.config
        text = {"model_type": "siglip2_text_model", "vocab_size": c.vocab_size, "hidden_size": c.text_width,
                "intermediate_size": c.text_mlp_dim or int(c.text_width * c.text_mlp_ratio),
                "num_hidden_layers": c.text_depth, "num_attention_heads": c.text_heads,
                "max_position_embeddings": c.text_max_len, "projection_size": c.embed_dim,
                "hidden_act": "gelu_pytorch_tanh" if c.text_act == "gelu_tanh" else "gelu",
                "layer_norm_eps": c.text_norm_eps, **token_ids(model, folder)}  # fmt: skip
        config = {"model_type": "siglip2", "text_config": text, "vision_config": vision}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    processor = model.processor
    if processor is not None:  # (a model no processor feeds, e.g. 4 channels, has none to write)
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Siglip2ImageProcessor", "patch_size": processor.patch_size,
            "max_num_patches": processor.max_tokens, "image_mean": list(processor.mean), "image_std": list(processor.std),
            "resample": {v: k for k, v in RESAMPLE.items()}[processor.resample], "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True,
        }, indent=2))  # fmt: skip
    save_file({k: v.detach().contiguous().cpu() for k, v in to_hf(model.state_dict(), two_tower).items()},
              folder / "model.safetensors")  # fmt: skip
    return folder
