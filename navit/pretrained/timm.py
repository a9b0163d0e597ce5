"""timm NaFlexViT, read and written without importing timm.

A timm checkpoint becomes a :class:`navit.NaViT` with the same outputs, run packed: a folder as
timm saves it for the Hugging Face Hub (``config.json`` naming the ``architecture``, with any
``model_args`` and the ``pretrained_cfg``, and ``model.safetensors`` or ``pytorch_model.bin``),
or a bare weights file with the model name given. The model's processor is timm's NaFlex
evaluation transform: every image resized (Pillow, the checkpoint's interpolation) to the
largest size whose patch grid fits ``max_tokens`` (576, timm's default sequence length for
evaluation), normalised with the checkpoint's mean and std.

navit builds what timm's registered ``naflexvit_*`` models use: the learned position grid
(bicubic or bilinear, optionally aspect-preserving), layer scale, register and class tokens,
MAP or average pooling, the norm before or after pooling, GELU (erf or tanh), optional q/k norms.
A model option that changes the outputs in a way navit does not build (RoPE, factorized
positions, token pooling, ...) is refused by name, as is a weight without a place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from navit.config import NaViTConfig
from navit.model import NaViT
from navit.pretrained.weights import load_checked, read_json, read_weights, rename
from navit.processor import RESAMPLE, Processor

#: timm's ``NaFlexVitCfg`` defaults of the fields navit reads.
DEFAULTS: dict[str, Any] = dict(
    patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_norm=False,
    proj_bias=True, init_values=None, class_token=False, reg_tokens=0, pos_embed="learned",
    pos_embed_grid_size=(16, 16), pos_embed_interp_mode="bicubic", pos_embed_ar_preserving=False,
    global_pool="map", fc_norm=None, act_layer=None,
)  # fmt: skip
#: Fields that change the outputs in ways navit does not build: they must keep these values.
FIXED: dict[str, Any] = dict(
    pos_embed_antialias=True, pos_embed_align_corners=False, pos_embed_use_grid_sample=False, rope_type="",
    pre_norm=False, final_norm=True, pool_include_prefix=False, attn_pool_num_heads=None,
    attn_pool_mlp_ratio=None, embed_proj_type="linear", input_norm_layer=None, embed_norm_layer=None,
    norm_layer=None, block_fn=None, mlp_layer=None, attn_layer=None, attn_type="standard", attn_gated=False,
    swiglu_mlp=False, qkv_fused=True, attn_only_layer_scale=False, scale_mlp_norm=False,
    scale_attn_inner_norm=False, num_kv_heads=None, enable_patch_interpolator=False, patchify_channels_last=True,
)  # fmt: skip
#: Fields without effect on outputs in evaluation (dropout, initialisation) or on packed patches.
IGNORED = {
    "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate",
    "weight_init", "fix_init", "dynamic_img_pad", "img_size", "in_chans", "num_classes", "use_key_only_attn_mask",
    "rope_temperature", "rope_ref_feat_shape", "rope_grid_offset", "rope_grid_indexing", "rope_rotate_half",
    "rope_shift_coords", "rope_jitter_coords", "rope_rescale_coords", "rope_mrope_section", "swiglu_align_to",
}  # fmt: skip
_GAP = dict(init_values=1e-5, global_pool="avg", fc_norm=True)
_SO150M2 = dict(embed_dim=832, depth=21, num_heads=13, mlp_ratio=34 / 13, init_values=1e-5, qkv_bias=False, reg_tokens=1)
#: timm's registered NaFlexViT models: their fields that differ from :data:`DEFAULTS`.
VARIANTS: dict[str, dict[str, Any]] = {
    "naflexvit_base_patch16_gap": dict(_GAP, reg_tokens=4),
    "naflexvit_base_patch16_par_gap": dict(_GAP, reg_tokens=4, pos_embed_ar_preserving=True),
    "naflexvit_base_patch16_parfac_gap": dict(_GAP, reg_tokens=4, pos_embed_ar_preserving=True, pos_embed="factorized"),
    "naflexvit_base_patch16_map": dict(init_values=1e-5, global_pool="map", reg_tokens=1),
    "naflexvit_so150m2_patch16_reg1_gap": dict(_SO150M2, global_pool="avg", fc_norm=True),
    "naflexvit_so150m2_patch16_reg1_map": dict(_SO150M2, global_pool="map"),
    "naflexvit_base_patch16_siglip": dict(act_layer="gelu_tanh", pos_embed_interp_mode="bilinear"),
    "naflexvit_so400m_patch16_siglip": dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362,
                                            act_layer="gelu_tanh", pos_embed_interp_mode="bilinear"),
}  # fmt: skip
POOLS = {"map": "map", "avg": "mean"}
ACTIVATIONS = {None: "gelu", "gelu": "gelu", "gelu_tanh": "gelu_tanh"}
INTERPOLATIONS = ("bilinear", "bicubic")
MAX_TOKENS = 576  # timm's NaFlex sequence length for evaluation

#: (timm prefix, navit prefix); ``{i}`` is a layer index. The position grid, the class and
#: register tokens and the MAP probe change shape and are handled on their own.
NAMES = [
    ("embeds.proj.", "patch_embed."),
    ("blocks.{i}.mlp.fc1.", "blocks.{i}.mlp.0."),
    ("blocks.{i}.mlp.fc2.", "blocks.{i}.mlp.3."),
    ("blocks.{i}.", "blocks.{i}."),
    ("attn_pool.mlp.fc1.", "pool.mlp.0."),
    ("attn_pool.mlp.fc2.", "pool.mlp.2."),
    ("attn_pool.", "pool."),
    ("fc_norm.", "norm."),
    ("norm.", "norm."),
    ("head.", "head."),
]


def variant(name: str) -> str:
    """The registered model of a timm name (``timm/`` and a pretrained tag such as
    ``.e300_s576_in1k`` dropped)."""
    base = name.removeprefix("timm/").split(".")[0]
    if base not in VARIANTS:
        raise ValueError(f"{name!r} is not a timm NaFlexViT model navit reads; known: {sorted(VARIANTS)}")
    return base


def timm_fields(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Every field navit reads of timm model ``name`` built with ``args``; refuses options that
    navit does not know or does not build, by name."""
    unknown = sorted(set(args) - set(DEFAULTS) - set(FIXED) - IGNORED)
    if unknown:
        raise ValueError(f"{name}: timm model option(s) {unknown} are not ones navit reads")
    fields = {**DEFAULTS, **FIXED, **VARIANTS[variant(name)], **args}
    for key, value in FIXED.items():
        if fields[key] != value and not (key == "norm_layer" and fields[key] == "layernorm"):
            raise ValueError(f"{name}: timm option {key}={fields[key]!r} is not built by navit (only {value!r})")
    checks = [
        ("pos_embed", fields["pos_embed"] in ("learned", "none", ""), "'learned' or 'none'"),
        ("global_pool", fields["global_pool"] in POOLS, f"one of {sorted(POOLS)}"),
        ("act_layer", fields["act_layer"] in ACTIVATIONS, "'gelu' or 'gelu_tanh'"),
        ("pos_embed_interp_mode", fields["pos_embed_interp_mode"] in INTERPOLATIONS, f"one of {INTERPOLATIONS}"),
        ("pos_embed_grid_size", len(set(_pair(fields["pos_embed_grid_size"]))) == 1, "a square grid"),
        ("patch_size", len(set(_pair(fields["patch_size"]))) == 1, "square patches"),
    ]  # fmt: skip
    for key, ok, needs in checks:
        if not ok:
            raise ValueError(f"{name}: timm option {key}={fields[key]!r} is not built by navit (needs {needs})")
    return fields


def _pair(value: Any) -> tuple[Any, Any]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def navit_config(fields: dict[str, Any], weights: dict[str, torch.Tensor]) -> NaViTConfig:
    """The NaViT config of a timm model's fields; channels, MLP width and classes from its weights."""
    patch = _pair(fields["patch_size"])[0]
    width = weights["embeds.proj.weight"].shape[1]
    if width % patch**2:
        raise ValueError(f"timm weight 'embeds.proj.weight' takes {width} values per patch, not a multiple of "
                         f"patch_size={patch}²: the model name or options do not fit the weights")  # fmt: skip
    fc_norm = fields["fc_norm"] if fields["fc_norm"] is not None else fields["global_pool"] == "avg"
    return NaViTConfig(
        patch_size=patch, in_chans=width // patch**2,
        embed_dim=fields["embed_dim"], depth=fields["depth"], num_heads=fields["num_heads"],
        mlp_dim=weights["blocks.0.mlp.fc1.weight"].shape[0], act=ACTIVATIONS[fields["act_layer"]],
        num_classes=weights["head.weight"].shape[0] if "head.weight" in weights else 0,
        qkv_bias=fields["qkv_bias"], qk_norm=fields["qk_norm"], proj_bias=fields["proj_bias"],
        mlp_bias=fields["proj_bias"], norm_eps=1e-6,
        pos_embed="grid" if fields["pos_embed"] == "learned" else "none",
        pos_grid=_pair(fields["pos_embed_grid_size"])[0], pos_interp=fields["pos_embed_interp_mode"],
        pos_keep_aspect=fields["pos_embed_ar_preserving"], pool=POOLS[fields["global_pool"]],
        final_norm="pooled" if fc_norm else "tokens", layer_scale=fields["init_values"],
        prefix_tokens=int(fields["class_token"]) + fields["reg_tokens"],
    )  # fmt: skip


def to_navit(timm: dict[str, torch.Tensor], origins: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """A timm NaFlexViT state dict in navit's names; ``origins``, if given, receives the timm
    name of each navit weight."""
    out: dict[str, torch.Tensor] = {}
    prefix = [key for key in ("embeds.cls_token", "embeds.reg_token") if key in timm]
    if prefix:
        out["prefix"] = torch.cat([timm[key].flatten(0, 1) for key in prefix])
    for key, value in timm.items():
        if key in prefix:
            continue
        if key == "embeds.pos_embed":
            out[name := "pos_embed.table"] = value.squeeze(0)
        elif key == "attn_pool.latent":
            if value.shape[1] != 1:
                raise ValueError(f"timm weight {key!r}: navit's MAP pooling has one query, not {value.shape[1]}")
            out[name := "pool.probe"] = value.reshape(-1)
        elif (name := rename(key, NAMES)) is not None:
            out[name] = value
        else:
            raise ValueError(f"timm weight {key!r} has no counterpart in navit")
        if origins is not None:
            origins[name] = key
    if origins is not None and prefix:
        origins["prefix"] = " + ".join(prefix)
    return out


def to_timm(ours: dict[str, torch.Tensor], config: NaViTConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_navit` (prefix tokens written as register tokens)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        if key == "prefix":
            out["embeds.reg_token"] = value[None]
        elif key == "pos_embed.table":
            out["embeds.pos_embed"] = value[None]
        elif key == "pool.probe":
            out["attn_pool.latent"] = value.reshape(1, 1, -1)
        elif key.startswith("norm."):
            out[("fc_norm." if config.final_norm == "pooled" else "norm.") + key.removeprefix("norm.")] = value
        else:
            out[rename(key, NAMES, reverse=True)] = value
    return out


def read_timm(path: str | os.PathLike[str], arch: str | None = None) -> tuple[NaViTConfig, Processor, dict[str, torch.Tensor], dict[str, str]]:
    """(config, processor, weights in navit's names, the timm name of each weight) of a timm
    NaFlexViT folder or weights file (``arch``: the timm model name, needed for a bare file)."""
    path = Path(path)
    hub: dict[str, Any] = read_json(path / "config.json") if path.is_dir() else {}
    name = arch or hub.get("architecture")
    if name is None:
        raise ValueError(f"{path}: a timm weights file needs its model name, e.g. arch='naflexvit_base_patch16_gap' "
                         f"(--init-arch on the command line); known: {sorted(VARIANTS)}")  # fmt: skip
    fields = timm_fields(name, hub.get("model_args", {}))
    timm = read_weights(path)
    for key in ("embeds.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in timm:
            raise ValueError(f"{path}: no {key!r}; not a timm NaFlexViT state dict")
    config = navit_config(fields, timm)
    data = hub.get("pretrained_cfg", {})
    interpolation = data.get("interpolation", "bicubic")
    if interpolation not in RESAMPLE:
        raise ValueError(f"{path}: pretrained_cfg interpolation={interpolation!r} is not one of navit's {tuple(RESAMPLE)}")
    processor = Processor.for_model(
        config, max_tokens=MAX_TOKENS, grid_rule="fill", reducing_gap=None, resample=interpolation,
        mean=tuple(data.get("mean", (0.5,) * config.in_chans)), std=tuple(data.get("std", (0.5,) * config.in_chans)),
    )  # fmt: skip
    origins: dict[str, str] = {}
    return config, processor, to_navit(timm, origins), origins


def load_timm(path: str | os.PathLike[str], arch: str | None = None) -> NaViT:
    """A timm NaFlexViT as a NaViT in eval mode, with its processor; see :func:`read_timm`."""
    config, processor, weights, origins = read_timm(path, arch)
    model = NaViT(config, processor)
    load_checked(model, weights, origins, path)
    return model.eval()


def write_timm(model: NaViT, folder: str | os.PathLike[str], arch: str = "naflexvit_base_patch16_map") -> Path:
    """Write a NaViT of timm's shape (a grid or no position embedding, no RoPE) as a folder that
    ``timm.create_model("local-dir:FOLDER")`` reads: ``config.json`` (``arch`` with every field
    spelled out in ``model_args``) and ``model.safetensors``."""
    from safetensors.torch import save_file

    c = model.config
    if c.pos_embed not in ("grid", "none") or c.rope or c.num_axes != 2 or c.proj_bias != c.mlp_bias:
        raise ValueError("only timm-shaped models (2 axes, a grid or no position embedding, no rope, the same "
                         "bias setting for the attention output and the MLP) can be written")  # fmt: skip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = dict(
        patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
        mlp_ratio=(c.hidden_dim + 0.5) / c.embed_dim,  # timm's MLP width is int(embed_dim * mlp_ratio)
        qkv_bias=c.qkv_bias, qk_norm=c.qk_norm, proj_bias=c.proj_bias,
        init_values=c.layer_scale, class_token=False, reg_tokens=c.prefix_tokens,
        pos_embed="learned" if c.pos_embed == "grid" else "none", pos_embed_grid_size=[c.pos_grid, c.pos_grid],
        pos_embed_interp_mode=c.pos_interp, pos_embed_ar_preserving=c.pos_keep_aspect,
        global_pool={v: k for k, v in POOLS.items()}[c.pool], fc_norm=c.final_norm == "pooled",
        act_layer="gelu_tanh" if c.act == "gelu_tanh" else "gelu",
    )  # fmt: skip
    processor = model.processor or Processor.for_model(c)
    hub = {
        "architecture": variant(arch), "num_classes": c.num_classes, "num_features": c.embed_dim,
        "global_pool": args["global_pool"], "model_args": args,
        "pretrained_cfg": {"mean": list(processor.mean), "std": list(processor.std), "interpolation": processor.resample,
                           "input_size": [c.in_chans, 384, 384], "crop_pct": 1.0, "num_classes": c.num_classes,
                           "first_conv": "embeds.proj", "classifier": "head"},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(hub, indent=2))
    weights = to_timm(model.state_dict(), c)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, folder / "model.safetensors")
    return folder
