"""The weight formats, as one table: each is detected, checked, then loaded, in that order.

Detection (:func:`lorat.checkpoint.files.detect_format`) names a state dict's format from its keys
and metadata. The check compares the file with the model config -- tensor count and total size
first, then names and shapes on a shape-only model (the meta device) -- and raises
:class:`~lorat.errors.WeightsError` before the model takes any memory, so a small file cannot make
the loader build a huge model. Only then is the model built and filled.

========================  ====================================================================
``lorat``                 our single file: merged weights, config in the safetensors metadata
``merged``                a full merged inference state dict (official layout)
``official-full``         the official training model's state dict (``*.linear.*`` + ``*.lora.A/B``)
``official-trainable``    what the official trainer saves (LoRA, token-type embedding, head; the
                          DINOv2 file holds the rest); ``LoRAT-B-224``-style names resolve to it
``dinov2``                a DINOv2 backbone (Meta's release or timm's): the backbone weights
``mobilenetv2``           torchvision's ImageNet MobileNetV2: the stem of small demo models
========================  ====================================================================

Two more kinds of file follow the same three steps in their own modules: ONNX graphs
(:mod:`lorat.checkpoint.onnx`: the embedded config is bounded and checked against the graph's
inputs before a session opens) and Segment Anything checkpoints (:mod:`lorat.checkpoint.sam`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lorat.checkpoint.build import (
    build_lorat,
    load_checked,
    load_official_trainable,
    phase_one_config,
    start_from_phase_one,
)
from lorat.checkpoint.check import check_fit, check_size, expected_shapes
from lorat.checkpoint.files import detect_format, read_weights
from lorat.checkpoint.keys import DINOV2_FILES, DINOV2_REG4_FILES, official_to_peft_keys
from lorat.config import LoraConfig, ModelConfig
from lorat.errors import WeightsError, listed
from lorat.model import build_network
from lorat.model.lora import merge_lora
from lorat.model.vit import LoRAT

__all__ = ["WeightFormat", "FORMATS", "load_state_dict", "check_official_checkpoint"]

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class WeightFormat:
    """One row of the table.

    Attributes:
        name: what :func:`~lorat.checkpoint.files.detect_format` calls it.
        check: ``check(cfg, sd, path)`` raises when the file cannot fill the model ``cfg`` describes;
            allocates nothing. None for files that are not a LoRAT model.
        load: ``load(cfg, sd, path, backbone_weights)`` builds the merged inference model (after the check).
        refusal: for files that are not a LoRAT model, what to say instead.
    """

    name: str
    check: Callable[[ModelConfig, dict, Path], None] | None = None
    load: Callable[[ModelConfig, dict, Path, Path | None], LoRAT] | None = None
    refusal: str = ""


def _check_family(cfg: ModelConfig, sd: StateDict, path: Path) -> None:
    """A LoRATv2 file (per-stream heads) needs a LoRATv2 config, and a LoRAT file a LoRAT one."""
    v2 = any(k.startswith(("heads.", "search_region_token_type_embed.")) for k in sd)
    if v2 != (cfg.family == "loratv2"):
        names = ("LoRATv2", "LoRAT") if v2 else ("LoRAT", "LoRATv2")
        hint = "v2-p1-b224, v2-p2-b378, ..." if v2 else "b224, l378, ..."
        raise WeightsError(f"{path}: is a {names[0]} checkpoint, but the config describes {cfg.variant}, a "
                           f"{names[1]} model; give a {names[0]} config ({hint})")


def _check_whole(cfg: ModelConfig, sd: StateDict, path: Path, what: str, lora: LoraConfig | None = None,
                 given: StateDict | None = None) -> None:
    """A file that holds the whole model (``given``: its tensors under our names, when they differ)."""
    _check_family(cfg, sd, path)
    check_size(cfg, sd, path, full=True)
    check_fit(sd if given is None else given, expected_shapes(cfg, lora), path, cfg.variant, what, sd)


def _load_whole(cfg: ModelConfig, sd: StateDict, path: Path, what: str, lora: LoraConfig | None = None,
                given: StateDict | None = None) -> LoRAT:
    model = build_network(cfg, lora)
    load_checked(model, sd if given is None else given, None, path, what, sd)
    return merge_lora(model) if lora is not None else model


_LORA_SETTINGS = ("lora_alpha", "use_rslora")  # scalars an official full state dict may record


def _official_lora(cfg: ModelConfig, sd: StateDict) -> LoraConfig:
    """The LoRA settings of an official full state dict: those it records, else the config's."""
    lora = cfg.lora
    if any(k in sd for k in _LORA_SETTINGS):
        lora = dataclasses.replace(lora, alpha=float(sd["lora_alpha"].item()) if "lora_alpha" in sd else lora.alpha,
                                   rslora=bool(sd["use_rslora"].item()) if "use_rslora" in sd else lora.rslora)
    return lora


def _official_tensors(sd: StateDict) -> dict[str, torch.Tensor]:
    return official_to_peft_keys({k: v for k, v in sd.items() if k not in _LORA_SETTINGS})


def _check_official_full(cfg: ModelConfig, sd: StateDict, path: Path) -> None:
    _check_whole(cfg, sd, path, "official full state dict", _official_lora(cfg, sd), _official_tensors(sd))


def _load_official_full(cfg: ModelConfig, sd: StateDict, path: Path, backbone: Path | None) -> LoRAT:
    return _load_whole(cfg, sd, path, "official full state dict", _official_lora(cfg, sd), _official_tensors(sd))


def _fit_official_trainable(cfg: ModelConfig, sd: StateDict, path: Path) -> None:
    """Names and shapes of an official trainable-only checkpoint, on a shape-only model."""
    with torch.device("meta"):
        model = build_lorat(cfg)
    expected = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    check_fit(official_to_peft_keys(sd), expected, path, cfg.variant, "official LoRAT checkpoint", sd)


def _check_official_trainable(cfg: ModelConfig, sd: StateDict, path: Path) -> None:
    # the names and shapes are checked once the backbone file is (it bounds the model's size): see the load
    _check_family(cfg, sd, path)
    check_size(cfg, sd, path, full=False)


def _load_official_trainable(cfg: ModelConfig, sd: StateDict, path: Path, backbone: Path | None) -> LoRAT:
    _require_backbone(cfg, path, backbone)
    if cfg.phase_two:
        raise WeightsError(
            f"{path}: is an official LoRATv2 phase-2 checkpoint holding only the trainable tensors (the new search "
            f"stream); its template and reference streams are in the phase-1 checkpoint: give that too",
            missing="phase1_weights")
    model = build_lorat(cfg, backbone)  # the backbone file is read and checked before the model is allocated
    load_official_trainable(model, sd, path)
    return merge_lora(model)


def _require_backbone(cfg: ModelConfig, path: Path, backbone: Path | None) -> None:
    """An official trainable-only checkpoint comes with its DINOv2 file (with registers for LoRATv2)."""
    if backbone is not None:
        return
    v2 = cfg.family == "loratv2"
    name = (DINOV2_REG4_FILES if v2 else DINOV2_FILES).get(cfg.backbone.embed_dim)
    raise WeightsError(
        f"{path}: is an official {'LoRATv2' if v2 else 'LoRAT'} checkpoint holding only the trainable tensors; it "
        f"needs the DINOv2 {'with registers ' if v2 else ''}backbone file too (the backbone weights)"
        + (f" ({name})" if name else ""), missing="backbone_weights")


def _load_official_phase_two(cfg: ModelConfig, sd: StateDict, path: Path, backbone: Path | None,
                             phase1: Path) -> LoRAT:
    """An official LoRATv2 phase-2 checkpoint (trainable tensors) on its phase-1 checkpoint and backbone,
    as the official runner loads them (``--weight_path`` phase 1, then phase 2): phase 1's model, merged,
    gives the template and reference streams (and its token-type rows, first head and norm); phase 2's
    tensors the search stream."""
    _require_backbone(cfg, path, backbone)
    first_sd, meta = read_weights(phase1)
    fmt = detect_format(first_sd, meta)
    if fmt != "official-trainable":
        raise WeightsError(f"{phase1}: expected the official phase-1 checkpoint (trainable tensors), "
                           f"found a {fmt} file")
    first_cfg = phase_one_config(cfg)
    _check_official_trainable(first_cfg, first_sd, phase1)
    first = build_lorat(first_cfg, backbone)
    load_official_trainable(first, first_sd, phase1)
    model = build_lorat(cfg, backbone)
    start_from_phase_one(model, merge_lora(first), phase1)
    load_official_trainable(model, sd, path)
    return merge_lora(model)


FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("lorat", lambda cfg, sd, path: _check_whole(cfg, sd, path, "lorat state dict"),
                 lambda cfg, sd, path, backbone: _load_whole(cfg, sd, path, "lorat state dict")),
    WeightFormat("merged", lambda cfg, sd, path: _check_whole(cfg, sd, path, "merged state dict"),
                 lambda cfg, sd, path, backbone: _load_whole(cfg, sd, path, "merged state dict")),
    WeightFormat("official-full", _check_official_full, _load_official_full),
    WeightFormat("official-trainable", _check_official_trainable, _load_official_trainable),
    WeightFormat("dinov2", refusal="is a DINOv2 backbone file, not a LoRAT model; give it as the backbone weights "
                                   "together with a LoRAT checkpoint"),
    WeightFormat("mobilenetv2", refusal="is an ImageNet MobileNetV2 file (a stem to train from), not a LoRAT model"),
)}


def load_state_dict(fmt: str, cfg: ModelConfig, sd: dict[str, torch.Tensor], path: Path,
                    backbone_weights: Path | None = None, phase1: Path | None = None) -> LoRAT:
    """Check, then load, a state dict of format ``fmt`` into a merged LoRAT (float32, CPU, train mode).

    Raises:
        WeightsError: an unknown format, a file that is not a LoRAT model, or one that does not fit ``cfg``
            (raised before the model is allocated).
    """
    row = FORMATS.get(fmt)
    if row is None:
        raise WeightsError(f"{path}: not a LoRAT or DINOv2 weight file (first keys: {listed(list(sd))})")
    if row.load is None:
        raise WeightsError(f"{path}: {row.refusal}")
    if phase1 is not None and not (fmt == "official-trainable" and cfg.phase_two):
        raise WeightsError(f"{phase1}: a phase-1 checkpoint goes with an official LoRATv2 phase-2 checkpoint of "
                           f"trainable tensors; {path} is a {fmt} file of model {cfg.variant}")
    if row.check is not None:
        row.check(cfg, sd, path)
    if phase1 is not None:
        return _load_official_phase_two(cfg, sd, path, backbone_weights, phase1)
    return row.load(cfg, sd, path, backbone_weights)


def check_official_checkpoint(cfg: ModelConfig, path: str | Path) -> None:
    """Raise :class:`WeightsError` unless ``path`` is an official trainable-only checkpoint of ``cfg``."""
    path = Path(path)
    sd, meta = read_weights(path)
    fmt = detect_format(sd, meta)
    if fmt != "official-trainable":
        raise WeightsError(f"{path}: expected an official LoRAT checkpoint (the trainable tensors), found a {fmt} file")
    _check_official_trainable(cfg, sd, path)
    _fit_official_trainable(cfg, sd, path)
