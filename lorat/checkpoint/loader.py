"""The one loader: a weight file or a model name (and the model options) in, a checked, ready model out.

:func:`load_model` reads any format of the table in :mod:`lorat.checkpoint.formats` into a merged
inference model; :func:`load` turns the model options every command shares
(:class:`lorat.options.ModelOptions`) into a model or an ONNX Runtime backend on its device, with
its compute dtype resolved and its weights cast for it; :func:`save_model` writes our single file.

Files are read with safetensors or ``torch.load(weights_only=True)``; nothing is unpickled
freely. Tensors holding NaN or inf are refused. A config (embedded or given) is checked against
the file's tensors before the model is allocated. Every problem raises
:class:`~lorat.errors.WeightsError` naming the file, the model variant and the first offending keys.
Files we write are byte-stable: identical models give identical bytes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from lorat.checkpoint.files import CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION, detect_format, read_weights, save_safetensors
from lorat.checkpoint.hub import named_model, resolve_named
from lorat.config import Config, ModelConfig, config_from_dict, config_to_dict, load_config
from lorat.errors import ConfigError, LoratError, WeightsError, listed
from lorat.files import DEMO_ONNX_SHA256, bundled_onnx, bundled_weights
from lorat.options import BACKENDS, ModelOptions
from lorat.runtime import (
    cast_for_autocast,
    default_weights,
    default_weights_notice,
    resolve_device,
    resolve_dtype,
    set_threads,
)

if TYPE_CHECKING:
    from lorat.checkpoint.onnx import OnnxModel
    from lorat.model.vit import LoRAT

__all__ = ["LoadedModel", "load", "load_model", "save_model", "CONFIG_KEY", "FORMAT_KEY"]


def _config_from_meta(meta: Mapping[str, str], path: Path) -> Config:
    try:
        return config_from_dict(json.loads(meta[CONFIG_KEY]), where=f"{path} metadata")
    except (json.JSONDecodeError, ConfigError) as err:
        raise WeightsError(f"{path}: the embedded config is invalid: {err}") from None


def _file_config(path: Path, meta: Mapping[str, str], given: Config | None) -> Config:
    """Our single file's embedded config; a given config must describe the same model (its
    ``tracking`` section wins)."""
    file_cfg = _config_from_meta(meta, path)
    if given is not None and given.model != file_cfg.model:
        diffs = [f"{f.name}: config {getattr(given.model, f.name)!r} vs file {getattr(file_cfg.model, f.name)!r}"
                 for f in dataclasses.fields(ModelConfig)
                 if getattr(given.model, f.name) != getattr(file_cfg.model, f.name)]
        raise WeightsError(f"{path}: made for model {file_cfg.model.variant}, but the config "
                           f"describes {given.model.variant}: {listed(diffs, 3)}")
    return Config(model=file_cfg.model, tracking=(given or file_cfg).tracking, train=file_cfg.train)


def _resolve(weights: str | Path, config: Config | None, backbone_weights: str | Path | None
             ) -> tuple[Path, Config | None, Path | None]:
    """A named model (``LoRAT-B-224``) -> its checkpoint, config and DINOv2 file (cached or downloaded)."""
    named = named_model(weights)
    if named is not None:
        weights, named_config, backbone_weights = resolve_named(named, backbone_weights)
        config = config or named_config
    return Path(weights), config, Path(backbone_weights) if backbone_weights is not None else None


def load_model(
    weights: str | Path,
    config: Config | None = None,
    backbone_weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    phase1_weights: str | Path | None = None,
) -> tuple[LoRAT, Config]:
    """Load any supported weight file into a merged inference model (eval mode, frozen).

    Args:
        weights: our single file, a merged state dict, an official checkpoint, or the name of an
            official model (``LoRAT-B-224``; see :mod:`lorat.checkpoint.hub`).
        config: required except for our single file (whose embedded config is used; a given
            config must then describe the same model, and its ``tracking`` section wins).
        backbone_weights: DINOv2 file, required for official trainable-only checkpoints.
        phase1_weights: LoRATv2 phase 2: the official phase-1 checkpoint an official phase-2
            checkpoint (trainable tensors only) builds on.
        device, dtype: where the weights go and the dtype they are stored in (default: float32).
            To run the model in another dtype, use :func:`load` (autocast, weights cast to match).

    Returns:
        (model, config).
    """
    path, config, backbone = _resolve(weights, config, backbone_weights)
    return _load_file(path, config, backbone, device, dtype, Path(phase1_weights) if phase1_weights else None)


def _load_file(path: Path, config: Config | None, backbone: Path | None, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, phase1: Path | None = None) -> tuple[LoRAT, Config]:
    """:func:`load_model` once a named model is resolved to its files."""
    from lorat.checkpoint.formats import load_state_dict  # the model code (and timm) only when a model is built

    sd, meta = read_weights(path)
    fmt = detect_format(sd, meta)
    if fmt == "lorat":
        config = _file_config(path, meta, config)
    elif config is None and fmt not in ("dinov2", "mobilenetv2", "unknown"):
        raise WeightsError(f"{path}: is a {fmt} file without an embedded config; pass the config too")
    model = load_state_dict(fmt, config.model if config else ModelConfig(), sd, path, backbone, phase1)
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    return model.to(device=device, dtype=dtype), config


@dataclass
class LoadedModel:
    """A model ready to track with, as :func:`load` made it.

    Attributes:
        model: the merged :class:`~lorat.model.vit.LoRAT` in eval mode on ``device`` (its matrix
            weights stored in ``dtype``), or an :class:`~lorat.checkpoint.onnx.OnnxModel`.
        config: the model's config (the given one's ``tracking`` section wins).
        device: where it runs.
        dtype: the compute (autocast) dtype; None means float32.
        weights: the weight file loaded (a named model's cached checkpoint).
        backbone_weights: the backbone file loaded with it, if any.
        backend: ``"torch"`` or ``"onnxruntime"``.
    """

    model: LoRAT | OnnxModel
    config: Config
    device: torch.device
    dtype: torch.dtype | None
    weights: Path
    backbone_weights: Path | None
    backend: str


def _onnx_backend(options: ModelOptions, weights: Path, config: Config | None) -> LoadedModel:
    from lorat.checkpoint.onnx import load_onnx

    if Path(weights).suffix.lower() != ".onnx":
        raise LoratError(f"the onnxruntime backend runs an .onnx file, got {weights}; make one with "
                         f"python -m lorat.export --weights {weights} --onnx model.onnx")
    cpu = options.device in (None, "auto", "cpu", torch.device("cpu"))
    if not cpu or not _float32(options.dtype):
        raise LoratError(f"the onnxruntime backend runs on the CPU in float32, not {options.device} / {options.dtype}")
    model, file_cfg = load_onnx(weights)
    config = dataclasses.replace(file_cfg, tracking=config.tracking) if config is not None else file_cfg
    return LoadedModel(model, config, torch.device("cpu"), None, Path(weights), None, "onnxruntime")


def _float32(dtype: object) -> bool:
    """Whether a ``--dtype`` value lets ONNX Runtime run the model (it runs float32)."""
    return dtype in ("auto", None, "float32", "fp32", torch.float32)


def _is_bundled(weights: str | Path) -> bool:
    """Whether ``weights`` is the bundled demo model's file."""
    try:
        return Path(weights).is_file() and Path(weights).samefile(bundled_weights())
    except OSError:
        return False


def _bundled_onnx_backend(options: ModelOptions, config: Config | None) -> LoadedModel | None:
    """The bundled demo model on ONNX Runtime, where that is what ``--backend auto`` means: on the CPU,
    in float32 (1.5x the frames per second of torch on 2 cores, boxes within 0.001 px), when
    onnxruntime is installed and the bundled export is intact. None otherwise (torch runs it)."""
    if not _float32(options.dtype):
        return None
    if resolve_device(options.device).type != "cpu":
        return None
    from lorat.checkpoint.onnx import open_bundled_onnx

    opened = open_bundled_onnx(bundled_onnx(), DEMO_ONNX_SHA256)
    if opened is None:
        return None
    model, file_cfg = opened
    if config is not None and config.model != file_cfg.model:
        return None  # a config for another model: the torch path reports the mismatch
    config = dataclasses.replace(file_cfg, tracking=config.tracking) if config is not None else file_cfg
    return LoadedModel(model, config, torch.device("cpu"), None, model.path, None, "onnxruntime")


def load(options: ModelOptions, say: Callable[[str], object] | None = print, cast: bool = True) -> LoadedModel:
    """Turn the model options into a ready model: threads set, weights chosen (the default ones when
    none are given, reported through ``say``), format detected, checked and loaded onto the device,
    compute dtype resolved and, with ``cast``, the matrix weights stored in it
    (:func:`lorat.runtime.cast_for_autocast`: bit-identical outputs, less memory traffic).

    Raises:
        LoratError: an unknown backend, device or dtype, an .onnx file for the torch backend (or the
            reverse), or any problem with the files (:class:`~lorat.errors.WeightsError`).
    """
    if options.backend not in BACKENDS:
        raise LoratError(f"unknown backend {options.backend!r}; use {', '.join(BACKENDS)}")
    set_threads(options.threads)
    weights = options.weights
    config = load_config(options.config) if isinstance(options.config, (str, Path)) else options.config
    chosen = weights is None
    if chosen:
        weights = default_weights()
    # the bundled model, named or by default, runs on ONNX Runtime where it can: every door, the same boxes
    loaded = _bundled_onnx_backend(options, config) if options.backend == "auto" and _is_bundled(weights) else None
    if chosen and say is not None:
        say(default_weights_notice(weights) + (" on ONNX Runtime" if loaded is not None else ""))
    if loaded is not None:
        return loaded
    onnx_file = Path(weights).suffix.lower() == ".onnx"
    if options.backend == "onnxruntime" or (options.backend == "auto" and onnx_file):
        return _onnx_backend(options, Path(weights), config)
    if onnx_file:
        raise LoratError(f"{weights} is an ONNX model: use the onnxruntime backend")
    device = resolve_device(options.device)
    path, config, backbone = _resolve(weights, config, options.backbone_weights)
    phase1 = Path(options.phase1_weights) if options.phase1_weights else None
    model, config = _load_file(path, config, backbone, device=device, phase1=phase1)
    dtype = resolve_dtype(options.dtype, device, config.model.backbone.embed_dim)
    if cast:
        cast_for_autocast(model, dtype)
    return LoadedModel(model, config, device, dtype, path, backbone, "torch")


def save_model(model: LoRAT, config: Config, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write our single file: merged weights + config in safetensors metadata.

    A model still carrying LoRA adapters is merged on a copy first; ``dtype`` (e.g.
    ``torch.float16``) halves the file. Returns the path.
    """
    from lorat.model.lora import has_lora, merge_lora

    if has_lora(model):
        model = merge_lora(copy.deepcopy(model))
    sd, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu", dtype=dtype if v.is_floating_point() and dtype else v.dtype).contiguous()
        if v.data_ptr() in seen:  # a tensor shared by LoRATv2 streams: safetensors stores each key's own
            v = v.clone()
        seen.add(v.data_ptr())
        sd[k] = v
    meta = {CONFIG_KEY: json.dumps(config_to_dict(config)), FORMAT_KEY: FORMAT_VERSION}
    path = Path(path)
    if path.is_dir():
        raise LoratError(f"{path} is a directory; give a file name, e.g. {path / 'lorat.safetensors'}")
    try:
        save_safetensors(sd, path, meta)  # an OSError is already a LoratError naming the path
    except SafetensorError as err:
        raise LoratError(f"cannot write {path}: {str(err).split(' at path')[0]}") from None
    return path


