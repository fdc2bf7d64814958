"""Building LoRAT models: random, with a pretrained backbone, with LoRA, or from a whole state dict.

Every file is read and checked (:mod:`lorat.checkpoint.check`) before the model takes memory.
Whole models from files: :mod:`lorat.checkpoint.formats`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from lorat.checkpoint.check import check_fit, check_size
from lorat.checkpoint.files import detect_format, read_weights
from lorat.checkpoint.keys import DINOV2_FILES, dinov2_to_lorat, dinov2_to_v2, official_to_peft_keys
from lorat.config import Config, ModelConfig
from lorat.errors import WeightsError
from lorat.model import training_streams
from lorat.model.lora import add_lora, add_stream_lora
from lorat.model.stem import imagenet_stem_weights
from lorat.model.v2 import LoRATv2
from lorat.model.vit import LoRAT, sincos_pos_embed

__all__ = ["build_lorat", "build_training_model", "load_checked", "load_backbone", "load_official_trainable",
           "check_backbone_file", "phase_one_config", "start_from_phase_one"]


def load_checked(model: nn.Module, given: Mapping[str, torch.Tensor], keys: list[str] | None,
                  path: Path, what: str, original: Mapping[str, torch.Tensor]) -> None:
    """Load ``given`` into ``model``; it must provide exactly ``keys`` (default: all)."""
    state = model.state_dict()
    expected = {k: state[k].shape for k in (keys if keys is not None else state)}
    check_fit(given, expected, path, model.cfg.variant, what, original)
    with torch.no_grad():
        for k, value in given.items():
            state[k].copy_(value.to(state[k].dtype))


def _read_backbone(cfg: ModelConfig, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a backbone file and check it is the kind ``cfg``'s stem needs (and, for DINOv2, that
    the file could fill the configured model) before any model is built. Returns (state dict, format)."""
    sd, meta = read_weights(path)
    fmt = detect_format(sd, meta)
    if cfg.backbone.stem == "mobilenetv2":
        if fmt != "mobilenetv2":
            raise WeightsError(f"{path}: model {cfg.variant} has a mobilenetv2 stem and needs "
                               f"torchvision's ImageNet MobileNetV2 state dict, found a {fmt} file")
        return sd, fmt
    if fmt != "dinov2":
        name = DINOV2_FILES.get(cfg.backbone.embed_dim, "dinov2_vit*14_pretrain.pth")
        raise WeightsError(f"{path}: expected a DINOv2 backbone file ({name} or timm's DINOv2 safetensors), "
                           f"found a {fmt} file")
    check_size(cfg, sd, path, full=True)
    return sd, fmt


def _load_backbone_weights(model: LoRAT, sd: Mapping[str, torch.Tensor], fmt: str, path: Path) -> None:
    """Copy a backbone state dict checked by :func:`_read_backbone` into ``model``."""
    if fmt == "mobilenetv2":
        keys = [k for k in model.state_dict() if k.startswith("patch_embed.features.")]
        try:
            stem = imagenet_stem_weights(sd)
        except KeyError as err:
            raise WeightsError(f"{path}: not a complete torchvision MobileNetV2 state dict (no {err.args[0]!r} "
                               f"among its features.* tensors)") from None
        load_checked(model, stem, keys, path, "MobileNetV2 stem", sd)
        return
    if model.cfg.family == "loratv2":
        keys = [k for k in model.state_dict() if not k.startswith(_V2_NOT_IN_BACKBONE)]
        load_checked(model, dinov2_to_v2(sd, model, path), keys, path, "DINOv2 backbone with registers", sd)
        return
    keys = [k for k in model.state_dict() if k != "token_type_embed" and not k.startswith("head.")]
    load_checked(model, dinov2_to_lorat(sd, model, path), keys, path, "DINOv2 backbone", sd)


# LoRATv2 tensors that start random rather than from the backbone
_V2_NOT_IN_BACKBONE = ("template_token_type_embed", "search_region_token_type_embed.", "heads.")


def load_backbone(model: LoRAT, path: str | Path) -> None:
    """Load pretrained backbone weights into a plain (not yet LoRA) model, in place.

    A ``patch``-stem model takes a DINOv2 file (official or timm); a ``mobilenetv2``-stem model
    takes torchvision's ImageNet MobileNetV2 state dict (its first 14 feature blocks).
    """
    path = Path(path)
    _load_backbone_weights(model, *_read_backbone(model.cfg, path), path)


def check_backbone_file(cfg: ModelConfig, path: str | Path) -> None:
    """Raise :class:`WeightsError` unless ``path`` is a backbone file that fits ``cfg`` (keys, sizes)."""
    path = Path(path)
    sd, fmt = _read_backbone(cfg, path)
    if fmt == "dinov2":
        with torch.device("meta"):
            model = build_lorat(cfg, lora=False)
        keys = [k for k in model.state_dict() if k != "token_type_embed" and not k.startswith("head.")]
        expected = {k: v.shape for k, v in model.state_dict().items() if k in keys}
        converted = dinov2_to_lorat({k: v for k, v in sd.items() if k != "pos_embed"}, model, path)
        check_fit(converted, {k: v for k, v in expected.items() if k != "pos_embed"}, path, cfg.variant,
                  "DINOv2 backbone", sd)


def load_official_trainable(model: LoRAT, sd: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load an official trainable-only checkpoint into a LoRA model (see :func:`add_lora`)."""
    keys = [n for n, p in model.named_parameters() if p.requires_grad]
    load_checked(model, official_to_peft_keys(sd), keys, path, "official LoRAT checkpoint", sd)


def phase_one_config(cfg: ModelConfig) -> ModelConfig:
    """The LoRATv2 phase-1 model a phase-2 config ``cfg`` builds on: its search stream at the reference size."""
    return dataclasses.replace(cfg, variant=f"{cfg.variant} phase 1", search_size=cfg.reference_size,
                               reference_size=None)


def start_from_phase_one(model: LoRATv2, first: LoRATv2, path: Path) -> None:
    """Copy a merged LoRATv2 phase-1 model ``first`` into the phase-2 ``model`` (training build or
    merged), as the official phase 2 starts: phase 1's template and search streams become the template
    and reference streams (frozen in training), with their token-type rows, the first norm and head;
    the new search stream keeps the backbone's weights (and its fresh LoRA, norm and head).

    Raises:
        WeightsError: ``first`` is not the phase-1 model of ``model``'s config (a weight of it that
            ``model`` lacks, or of another shape).
    """
    state = model.state_dict()
    given = first.state_dict()
    wrong = [k for k, v in given.items() if k not in state or state[k].shape != v.shape]
    if wrong:
        raise WeightsError(f"{path}: is not the LoRATv2 phase-1 model of {model.cfg.variant} ({len(wrong)} of its "
                           f"weights do not fit, e.g. {wrong[0]}); phase 1 must have the same backbone and template "
                           f"size, and its search size must be phase 2's reference size")
    with torch.no_grad():
        for key, value in given.items():
            state[key].copy_(value)


def build_lorat(cfg: ModelConfig, backbone_weights: str | Path | None = None, lora: bool = True,
                device: torch.device | str | None = None) -> LoRAT:
    """Build the training model: LoRAT (or LoRATv2), DINOv2 weights loaded (if given), LoRA added.

    Args:
        cfg: model config.
        backbone_weights: DINOv2 file (MobileNetV2 for a ``mobilenetv2`` stem); without it the
            backbone is randomly initialised. Whenever no DINOv2 grid fills ``pos_embed``, it
            starts as a fixed 2-D sine-cosine grid (trainable with ``finetune: full``).
        lora: add peft LoRA adapters and freeze the backbone (the official training build).
        device: where to allocate; ``"meta"`` builds without memory (parameter counting).
    """
    backbone = None
    if backbone_weights is not None:  # read and checked before the model takes any memory
        backbone = (*_read_backbone(cfg, Path(backbone_weights)), Path(backbone_weights))
    v2 = cfg.family == "loratv2"
    with torch.device(device) if device is not None else nullcontext():
        if v2:  # training: the streams that train share the backbone's tensors; merged: each owns its own
            owned = [not on for on in training_streams(cfg)] if lora else [True] * (1 + len(cfg.search_sizes))
            model = LoRATv2(cfg, owned=owned)
        else:
            model = LoRAT(cfg)
    if backbone is not None:
        _load_backbone_weights(model, *backbone)
    if backbone_weights is None or cfg.backbone.stem != "patch":
        grid = model.pos_grid if v2 else model.search_grid
        with torch.no_grad():
            model.pos_embed.copy_(sincos_pos_embed(grid, cfg.backbone.embed_dim))
    if lora:
        with torch.device(device) if device is not None else nullcontext():
            if v2:
                add_stream_lora(model, cfg.lora, training_streams(cfg))
            else:
                add_lora(model, cfg.lora)
    return model


def build_training_model(config: Config, backbone_weights: str | Path | None = None,
                         device: torch.device | str | None = None) -> LoRAT:
    """The model as ``train.finetune`` trains it, with ``requires_grad`` set accordingly.

    ``lora``: :func:`build_lorat` with adapters (only they, the token-type embedding and the head
    train). ``full``: every weight trains, except the pretrained part of a ``mobilenetv2`` stem
    when ``train.freeze_stem`` is set.
    """
    tr = config.train
    model = build_lorat(config.model, backbone_weights, lora=tr.finetune == "lora", device=device)
    if tr.finetune == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(not (tr.freeze_stem and name.startswith("patch_embed.features.")))
    model.grad_checkpointing = tr.grad_checkpointing
    return model
