"""Loading any supported weight file into an inference model, and saving our single file.

Formats understood (LORAT_SPEC section 2.4 and Appendix A):

``dinov2``
    A DINOv2 backbone: the official release files ``dinov2_vit{s,b,l,g}14_pretrain.pth``
    (SwiGLU as ``mlp.w12``/``mlp.w3``, optionally chunked ``blocks.C.N.``) or timm's DINOv2
    safetensors. ``pos_embed`` (1, 1 + 37*37, C) is resampled once to the search grid.
``mobilenetv2``
    torchvision's ImageNet MobileNetV2 state dict (``features.*``, ``classifier.*``): the
    pretrained part of the ``mobilenetv2`` stem of small demo models (:mod:`lorat.stem`).
``official-trainable``
    What the official trainer saves: trainable tensors only, LoRA unmerged
    (``token_type_embed``, ``blocks.N.*.lora.{A,B}``, ``head.*``; 157 tensors for B-224).
    Needs the DINOv2 file for everything else.
``official-full``
    The official training model's full state dict (``*.linear.weight`` + ``*.lora.A/B``).
``merged``
    A full merged inference state dict (official layout, ``pos_embed`` already resampled).
``lorat``
    Our single file: a merged state dict in safetensors whose metadata carries the config
    (key ``lorat.config``), so one file is all a user needs. Written by :func:`save_model`.

Files are read with safetensors or ``torch.load(weights_only=True)``; nothing is unpickled
freely. Tensors holding NaN or inf are refused. A config (embedded or given) is checked against
the file's tensors (their number and total size, then names and shapes on a shape-only model)
before the model is allocated, so a small file cannot make the loader build a huge model. Every
problem raises :class:`~lorat.errors.WeightsError` naming the file, the model variant and the
first offending keys. Files we write are byte-stable: identical models give identical bytes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError

from lorat.build import build_loaded, build_lorat, build_training_model, load_backbone, load_official_trainable
from lorat.config import Config, ModelConfig, config_from_dict, config_to_dict
from lorat.convert import DINOV2_FILES, official_to_peft_keys, peft_to_official_keys
from lorat.errors import ConfigError, LoratError, WeightsError, listed
from lorat.fit import check_size
from lorat.hub import named_model, resolve_named
from lorat.lora import has_lora, merge_lora
from lorat.model import LoRAT
from lorat.weight_files import CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION, detect_format, read_weights, save_safetensors

# Re-exported: the builders and key mappings are part of the loading API.
__all__ = ["load_model", "save_model", "read_weights", "detect_format", "save_safetensors", "build_lorat",
           "build_training_model", "load_backbone", "load_official_trainable", "official_to_peft_keys",
           "peft_to_official_keys", "CONFIG_KEY", "FORMAT_KEY"]


def _config_from_meta(meta: Mapping[str, str], path: Path) -> Config:
    try:
        return config_from_dict(json.loads(meta[CONFIG_KEY]), where=f"{path} metadata")
    except (json.JSONDecodeError, ConfigError) as err:
        raise WeightsError(f"{path}: the embedded config is invalid: {err}") from None


def load_model(
    weights: str | Path,
    config: Config | None = None,
    backbone_weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[LoRAT, Config]:
    """Load any supported weight file into a merged inference model (eval mode, frozen).

    Args:
        weights: our single file, a merged state dict, an official checkpoint, or the name of an
            official model (``LoRAT-B-224``; see :mod:`lorat.hub`).
        config: required except for our single file (whose embedded config is used; a given
            config must then describe the same model, and its ``tracking`` section wins).
        backbone_weights: DINOv2 file, required for official trainable-only checkpoints.
        device, dtype: target placement (dtype default: keep float32).

    Returns:
        (model, config).
    """
    named = named_model(weights)
    if named is not None:  # LoRAT-B-224 etc.: the official checkpoint and its DINOv2, from the cache or downloaded
        weights, named_config, backbone_weights = resolve_named(named, backbone_weights)
        config = config or named_config
    path = Path(weights)
    sd, meta = read_weights(path)
    fmt = detect_format(sd, meta)
    if fmt == "lorat":
        file_cfg = _config_from_meta(meta, path)
        if config is not None and config.model != file_cfg.model:
            diffs = [f"{f.name}: config {getattr(config.model, f.name)!r} vs file {getattr(file_cfg.model, f.name)!r}"
                     for f in dataclasses.fields(ModelConfig)
                     if getattr(config.model, f.name) != getattr(file_cfg.model, f.name)]
            raise WeightsError(f"{path}: made for model {file_cfg.model.variant}, but the config "
                               f"describes {config.model.variant}: {listed(diffs, 3)}")
        config = Config(model=file_cfg.model, tracking=(config or file_cfg).tracking, train=file_cfg.train)
    elif config is None:
        raise WeightsError(f"{path}: is a {fmt} file without an embedded config; pass the config too")
    cfg = config.model

    if fmt in ("lorat", "merged"):
        model = build_loaded(cfg, sd, path, f"{fmt} state dict", sd)
    elif fmt == "official-trainable":
        if backbone_weights is None:
            raise WeightsError(
                f"{path}: is an official LoRAT checkpoint holding only the trainable tensors; it "
                f"needs the DINOv2 backbone file too (the backbone weights)"
                + (f" ({DINOV2_FILES[cfg.backbone.embed_dim]})" if cfg.backbone.embed_dim in DINOV2_FILES else ""),
                missing="backbone_weights",
            )
        check_size(cfg, sd, path, full=False)
        model = build_lorat(cfg, backbone_weights)
        load_official_trainable(model, sd, path)
        merge_lora(model)
    elif fmt == "official-full":
        lora_cfg = cfg.lora
        if "lora_alpha" in sd or "use_rslora" in sd:
            lora_cfg = dataclasses.replace(
                lora_cfg, alpha=float(sd.pop("lora_alpha", torch.tensor(lora_cfg.alpha)).item()),
                rslora=bool(sd.pop("use_rslora", torch.tensor(lora_cfg.rslora)).item()))
        model = build_loaded(cfg, official_to_peft_keys(sd), path, "official full state dict", sd, lora_cfg)
        merge_lora(model)
    elif fmt == "mobilenetv2":
        raise WeightsError(f"{path}: is an ImageNet MobileNetV2 file (a stem to train from), not a LoRAT model")
    elif fmt == "dinov2":
        raise WeightsError(
            f"{path}: is a DINOv2 backbone file, not a LoRAT model; give it as the backbone weights "
            f"together with a LoRAT checkpoint"
        )
    else:
        raise WeightsError(f"{path}: not a LoRAT or DINOv2 weight file (first keys: {listed(list(sd))})")

    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    return model.to(device=device, dtype=dtype), config


def save_model(model: LoRAT, config: Config, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write our single file: merged weights + config in safetensors metadata.

    A model still carrying LoRA adapters is merged on a copy first; ``dtype`` (e.g.
    ``torch.float16``) halves the file. Returns the path.
    """
    if has_lora(model):
        model = merge_lora(copy.deepcopy(model))
    sd = {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() and dtype else v.dtype)
          .contiguous() for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: json.dumps(config_to_dict(config)), FORMAT_KEY: FORMAT_VERSION}
    path = Path(path)
    if path.is_dir():
        raise LoratError(f"{path} is a directory; give a file name, e.g. {path / 'lorat.safetensors'}")
    try:
        save_safetensors(sd, path, meta)  # an OSError is already a LoratError naming the path
    except SafetensorError as err:
        raise LoratError(f"cannot write {path}: {str(err).split(' at path')[0]}") from None
    return path


