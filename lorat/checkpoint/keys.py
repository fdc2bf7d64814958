"""Key mapping of the foreign weight layouts: one function per format, to or from ours (peft names).

Ours is the official inference layout with peft's LoRA names; the official trainer writes
``X.lora.A`` / ``X.linear.*`` and SwiGLU as ``w12`` / ``w3``; DINOv2 release files may chunk their
blocks (``blocks.C.N.``) and carry a 37x37 ``pos_embed`` that the search grid resamples. (The
MobileNetV2 stem's mapping lives with the stem: :func:`lorat.model.stem.imagenet_stem_weights`.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from lorat.checkpoint.check import describe
from lorat.errors import WeightsError
from lorat.model.vit import LoRAT, resample_pos_embed

__all__ = ["DINOV2_FILES", "DINOV2_REG4_FILES", "official_to_peft_keys", "peft_to_official_keys", "dinov2_to_lorat",
           "dinov2_to_v2"]


# Which DINOv2 release file belongs to which embedding width.
DINOV2_FILES = {384: "dinov2_vits14_pretrain.pth", 768: "dinov2_vitb14_pretrain.pth",
                1024: "dinov2_vitl14_pretrain.pth", 1536: "dinov2_vitg14_pretrain.pth"}


# LoRATv2's backbones: DINOv2 with four register tokens (Meta's files; timm's ``*_reg4_dinov2``).
DINOV2_REG4_FILES = {768: "dinov2_vitb14_reg4_pretrain.pth", 1024: "dinov2_vitl14_reg4_pretrain.pth"}


_LORA_OFFICIAL = re.compile(r"^(.*)\.lora\.([AB])$")


_LORA_PEFT = re.compile(r"^(.*)\.lora_([AB])\.default\.weight$")


def official_to_peft_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official LoRA names -> ours: ``X.lora.A`` -> ``X.lora_A.default.weight``,
    ``X.linear.*`` -> ``X.base_layer.*``, SwiGLU ``w12``/``w3`` -> ``fc1``/``fc2``."""
    out = {}
    for key, value in sd.items():
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        if m := _LORA_OFFICIAL.match(key):
            key = f"{m.group(1)}.lora_{m.group(2)}.default.weight"
        key = key.replace(".linear.", ".base_layer.")
        out[key] = value
    return out


def peft_to_official_keys(sd: Mapping[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_peft_keys` (``swiglu`` restores ``w12``/``w3``)."""
    out = {}
    for key, value in sd.items():
        if m := _LORA_PEFT.match(key):
            key = f"{m.group(1)}.lora.{m.group(2)}"
        key = key.replace(".base_layer.", ".linear.")
        if swiglu:
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[key] = value
    return out


def dinov2_to_lorat(sd: Mapping[str, torch.Tensor], model: LoRAT, path: Path) -> dict[str, torch.Tensor]:
    """DINOv2 (official or timm) backbone keys -> LoRAT keys, pos_embed resampled."""
    if any(k in sd for k in ("register_tokens", "reg_token")):
        raise WeightsError(
            f"{path}: is a DINOv2 checkpoint with register tokens; LoRAT uses the plain DINOv2 "
            f"backbone ({DINOV2_FILES.get(model.cfg.backbone.embed_dim, 'dinov2_vit*14_pretrain.pth')})"
        )
    out = {}
    for key, value in sd.items():
        if key in ("cls_token", "mask_token"):
            continue
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # chunked DINOv2 blocks
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    if "pos_embed" in out:
        pe = out["pos_embed"]
        if pe.ndim != 3 or pe.shape[-1] != model.pos_embed.shape[-1]:
            raise WeightsError(
                f"{path}: DINOv2 pos_embed {list(pe.shape)} does not fit model {model.cfg.variant} "
                f"(embed_dim {model.pos_embed.shape[-1]}). The file looks like: {describe(sd)}."
            )
        try:
            out["pos_embed"] = resample_pos_embed(pe, model.search_grid)
        except ValueError as err:
            raise WeightsError(f"{path}: {err}") from None
    return out


_BLOCK_LINEAR = re.compile(r"^(blocks\.\d+\.(?:attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2))\.(weight|bias)$")


def dinov2_to_v2(sd: Mapping[str, torch.Tensor], model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """DINOv2-with-registers backbone keys (Meta's or timm's) -> LoRATv2 keys.

    Each block linear fills every stream's copy (``attn.qkv.{s}``, ...: the official replicas all
    start from the backbone); the final norm fills every search stream's norm; the register tokens
    become ``reg_token``; the position grid loses its class-token slot and is kept at its size (the
    model reads it top-left). The class and mask tokens are dropped.
    """
    if not any(k in sd for k in ("register_tokens", "reg_token")):
        raise WeightsError(
            f"{path}: is a DINOv2 checkpoint without register tokens; LoRATv2 uses DINOv2 with registers "
            f"({DINOV2_REG4_FILES.get(model.cfg.backbone.embed_dim, 'dinov2_vit*14_reg4_pretrain.pth')})")
    streams, searches = model.streams, len(model.search_sizes)
    out = {}
    for key, value in sd.items():
        if key in ("cls_token", "mask_token"):
            continue
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # chunked DINOv2 blocks
        if key in ("register_tokens", "reg_token"):
            out["reg_token"] = value
        elif m := _BLOCK_LINEAR.match(key):
            out.update({f"{m.group(1)}.{s}.{m.group(2)}": value for s in range(streams)})
        elif key.startswith("norm."):
            out.update({f"norms.{i}.{key[5:]}": value for i in range(searches)})
        else:
            out[key] = value
    pe = out.get("pos_embed")
    if pe is not None:
        cells = model.pos_embed.shape[1]
        if pe.ndim != 3 or pe.shape[-1] != model.pos_embed.shape[-1] or pe.shape[1] not in (cells, cells + 1):
            raise WeightsError(f"{path}: DINOv2 pos_embed {list(pe.shape)} does not fit model {model.cfg.variant} "
                               f"(a {list(model.pos_grid)} grid of width {model.pos_embed.shape[-1]}). "
                               f"The file looks like: {describe(sd)}.")
        out["pos_embed"] = pe[:, -cells:]
    return out
