"""Weight files: reading, recognising, converting, loading and saving.

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
import os
import pickle
import re
import shutil
import struct
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorat.config import Config, LoraConfig, ModelConfig, config_from_dict, config_to_dict
from lorat.errors import ConfigError, LoratError, WeightsError
from lorat.files import write_atomic
from lorat.lora import add_lora, has_lora, merge_lora
from lorat.model import LoRAT, resample_pos_embed, sincos_pos_embed
from lorat.stem import imagenet_stem_weights

__all__ = [
    "read_weights",
    "detect_format",
    "build_lorat",
    "build_training_model",
    "load_backbone",
    "load_official_trainable",
    "load_model",
    "save_model",
    "save_safetensors",
    "default_weights",
    "default_weights_notice",
    "official_to_peft_keys",
    "peft_to_official_keys",
]

CONFIG_KEY = "lorat.config"
FORMAT_KEY = "lorat.format"
FORMAT_VERSION = "1"

# The bundled demo model (weights/README.md); LORAT_WEIGHTS overrides it.
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "lorat_demo.safetensors"

# Which DINOv2 release file belongs to which embedding width.
DINOV2_FILES = {384: "dinov2_vits14_pretrain.pth", 768: "dinov2_vitb14_pretrain.pth",
                1024: "dinov2_vitl14_pretrain.pth", 1536: "dinov2_vitg14_pretrain.pth"}
_ARCH_NAMES = {384: "ViT-S/14", 768: "ViT-B/14", 1024: "ViT-L/14", 1536: "ViT-g/14"}

# ----------------------------------------------------------------------------- reading


# First bytes of files people pass by mistake, and of the two PyTorch containers.
_MAGIC = [(b"PK\x03\x04", 0, "pytorch"), (b"\x80", 0, "pytorch"),  # zip (torch >= 1.6), legacy pickle
          (b"ftyp", 4, "a video file"), (b"RIFF", 0, "a video file"), (b"\x1aE\xdf\xa3", 0, "a video file"),
          (b"\x89PNG", 0, "an image file"), (b"\xff\xd8\xff", 0, "an image file"), (b"GIF8", 0, "an image file")]


def _sniff(path: Path) -> str | None:
    """What a non-safetensors file's first bytes say it is: ``"pytorch"``, ``"a video file"``, ... or None."""
    with open(path, "rb") as f:
        head = f.read(16)
    return next((kind for magic, at, kind in _MAGIC if head[at:at + len(magic)] == magic), None)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or one wrapped as {"model": ...} / {"state_dict": ...}."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping) and len(obj) <= 4:
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: contains no tensors")
    return tensors


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weight file safely into CPU tensors.

    Returns:
        (state dict, safetensors metadata or {}). ``module.`` / ``_orig_mod.`` prefixes
        (DDP, torch.compile) are stripped.

    Raises:
        WeightsError: missing, empty, truncated or corrupt file, not a weight file at all (a video, an
            image, random bytes), one holding Python objects, or one with NaN / inf values.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: file is empty")
    meta: dict[str, str] = {}
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise WeightsError(f"{path}: unreadable safetensors file (truncated or corrupt?): {err}") from None
    else:
        kind = _sniff(path)
        if kind is None:
            raise WeightsError(f"{path}: not a safetensors or PyTorch weight file (unrecognised content)")
        if kind != "pytorch":
            raise WeightsError(f"{path}: is {kind}, not weights; pass a .safetensors or .pth weight file")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise WeightsError(
                f"{path}: holds Python objects besides tensors; refusing to unpickle it "
                f"(only weights_only files are read): {str(err).splitlines()[0]}"
            ) from None
        except Exception as err:
            raise WeightsError(
                f"{path}: not a readable safetensors or PyTorch file (truncated or corrupt?): "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from None
        sd = _unwrap(obj, path)
    sd = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}
    damaged = sorted(k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if damaged:
        raise WeightsError(f"{path}: non-finite values (NaN or inf) in {len(damaged)} tensors: {_first(damaged)}; "
                           f"the file is damaged (or saved from a diverged training run)")
    return sd, meta


def detect_format(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None) -> str:
    """Name the format of a state dict: see the module docstring (or ``"unknown"``)."""
    if meta and CONFIG_KEY in meta:
        return "lorat"
    keys = list(sd)
    has_lora = any(k.endswith((".lora.A", ".lora.B")) for k in keys)
    has_base = any(k.startswith("patch_embed.") for k in keys)
    has_head = any(k.startswith("head.cls_mlp.") for k in keys)
    if has_lora:
        return "official-full" if has_base else "official-trainable"
    if has_base and has_head:
        return "merged"
    if has_base and any(k.startswith("blocks.") for k in keys):
        return "dinov2"
    if any(k.startswith("features.0.") for k in keys) and not has_base:
        return "mobilenetv2"
    return "unknown"


_BLOCK_KEY = re.compile(r"blocks\.(?:\d+\.)?(\d+)\.")  # blocks.N. or DINOv2's chunked blocks.C.N.


def _file_depth(sd: Mapping[str, torch.Tensor]) -> int:
    """Number of transformer blocks a state dict holds (0 if none)."""
    return 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))), default=-1)


def _describe(sd: Mapping[str, torch.Tensor]) -> str:
    """A short guess at the architecture a state dict was made for."""
    dim = None
    for key in ("token_type_embed", "patch_embed.proj.weight", "norm.weight"):
        if key in sd:
            dim = sd[key].shape[0] if key != "token_type_embed" else sd[key].shape[-1]
            break
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))}
    parts = []
    if dim is not None:
        parts.append(f"embed_dim {dim}" + (f" ({_ARCH_NAMES[dim]})" if dim in _ARCH_NAMES else ""))
    if blocks:
        parts.append(f"depth {max(blocks) + 1}")
    ranks = {v.shape[0] for k, v in sd.items() if k.endswith((".lora.A", ".lora_A.default.weight"))}
    if ranks:
        parts.append(f"LoRA rank {sorted(ranks)[0]}")
    if "pos_embed" in sd:
        parts.append(f"pos_embed {list(sd['pos_embed'].shape)}")
    return ", ".join(parts) or "no recognisable LoRAT/DINOv2 keys"


def _first(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _check_fit(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size],
               path: Path, variant: str, what: str, original: Mapping[str, torch.Tensor]) -> None:
    """Raise a WeightsError listing missing, unexpected and wrongly shaped keys."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} (file {list(given[k].shape)}, model {list(expected[k])})"
              for k in expected if k in given and given[k].shape != expected[k]]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if shapes:
        problems.append(f"wrong shapes: {_first(shapes, 3)}")
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    raise WeightsError(
        f"{path}: {what} does not fit model {variant}: {'; '.join(problems)}. "
        f"The file looks like: {_describe(original)}."
    )


# Every transformer block holds at least this many tensors (norm1/2, qkv, proj: weight and bias) and
# at least 4 * C^2 weights (q, k, v and the output projection).
_MIN_TENSORS_PER_BLOCK = 8


def _check_size(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], path: Path, full: bool) -> None:
    """Refuse a config whose model the file could not fill, before anything is built.

    A config (embedded in a file, or given by the user) decides how much memory building the model
    takes; a file of a few KB must not be able to ask for hundreds of GB. ``full``: the file should
    hold the whole transformer (single file, merged, official full, DINOv2), so the number of its
    values bounds the model size too; otherwise (official trainable-only) only its tensor count does.
    """
    b = cfg.backbone
    tensors = len(sd)
    values = sum(v.numel() for v in sd.values())
    need_tensors = b.depth * _MIN_TENSORS_PER_BLOCK
    need_values = b.depth * 4 * b.embed_dim ** 2 if full else 0
    if need_tensors > tensors or need_values > values:
        raise WeightsError(
            f"{path}: the config describes model {cfg.variant} with embed_dim {b.embed_dim} and depth {b.depth}, "
            f"at least {max(need_values, need_tensors):,} parameters in {need_tensors:,} tensors, but the file "
            f"holds {values:,} values in {tensors:,} tensors ({_file_depth(sd)} blocks): the config does not "
            f"belong to this file. The file looks like: {_describe(sd)}."
        )


def _expected_shapes(cfg: ModelConfig, lora: LoraConfig | None = None) -> dict[str, torch.Size]:
    """Tensor names and shapes of a model, from a shape-only build on the meta device (no memory)."""
    with torch.device("meta"):
        model = LoRAT(cfg)
        if lora is not None:
            add_lora(model, lora)
    return {k: v.shape for k, v in model.state_dict().items()}


def _build_loaded(cfg: ModelConfig, given: Mapping[str, torch.Tensor], path: Path, what: str,
                  original: Mapping[str, torch.Tensor], lora: LoraConfig | None = None) -> LoRAT:
    """Check a whole-model state dict against the config (size, then names and shapes) before
    allocating the model; then build it (with adapters if ``lora``) and load the weights."""
    _check_size(cfg, original, path, full=True)
    _check_fit(given, _expected_shapes(cfg, lora), path, cfg.variant, what, original)
    model = LoRAT(cfg)
    if lora is not None:
        add_lora(model, lora)
    _load_checked(model, given, None, path, what, original)
    return model


# ----------------------------------------------------------------------------- key mapping

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


def _dinov2_to_lorat(sd: Mapping[str, torch.Tensor], model: LoRAT, path: Path) -> dict[str, torch.Tensor]:
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
                f"(embed_dim {model.pos_embed.shape[-1]}). The file looks like: {_describe(sd)}."
            )
        try:
            out["pos_embed"] = resample_pos_embed(pe, model.search_grid)
        except ValueError as err:
            raise WeightsError(f"{path}: {err}") from None
    return out


# ----------------------------------------------------------------------------- loading


def _load_checked(model: nn.Module, given: Mapping[str, torch.Tensor], keys: list[str] | None,
                  path: Path, what: str, original: Mapping[str, torch.Tensor]) -> None:
    """Load ``given`` into ``model``; it must provide exactly ``keys`` (default: all)."""
    state = model.state_dict()
    expected = {k: state[k].shape for k in (keys if keys is not None else state)}
    _check_fit(given, expected, path, model.cfg.variant, what, original)
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
        raise WeightsError(
            f"{path}: expected a DINOv2 backbone file ({DINOV2_FILES.get(cfg.backbone.embed_dim)}"
            f" or timm's DINOv2 safetensors), found a {fmt} file"
        )
    _check_size(cfg, sd, path, full=True)
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
        _load_checked(model, stem, keys, path, "MobileNetV2 stem", sd)
        return
    keys = [k for k in model.state_dict() if k != "token_type_embed" and not k.startswith("head.")]
    _load_checked(model, _dinov2_to_lorat(sd, model, path), keys, path, "DINOv2 backbone", sd)


def load_backbone(model: LoRAT, path: str | Path) -> None:
    """Load pretrained backbone weights into a plain (not yet LoRA) model, in place.

    A ``patch``-stem model takes a DINOv2 file (official or timm); a ``mobilenetv2``-stem model
    takes torchvision's ImageNet MobileNetV2 state dict (its first 14 feature blocks).
    """
    path = Path(path)
    _load_backbone_weights(model, *_read_backbone(model.cfg, path), path)


def load_official_trainable(model: LoRAT, sd: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load an official trainable-only checkpoint into a LoRA model (see :func:`add_lora`)."""
    keys = [n for n, p in model.named_parameters() if p.requires_grad]
    _load_checked(model, official_to_peft_keys(sd), keys, path, "official LoRAT checkpoint", sd)


def build_lorat(cfg: ModelConfig, backbone_weights: str | Path | None = None, lora: bool = True,
                device: torch.device | str | None = None) -> LoRAT:
    """Build the training model: LoRAT, DINOv2 weights loaded (if given), LoRA added.

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
    with torch.device(device) if device is not None else nullcontext():
        model = LoRAT(cfg)
    if backbone is not None:
        _load_backbone_weights(model, *backbone)
    if backbone_weights is None or cfg.backbone.stem != "patch":
        with torch.no_grad():
            model.pos_embed.copy_(sincos_pos_embed(model.search_grid, cfg.backbone.embed_dim))
    if lora:
        with torch.device(device) if device is not None else nullcontext():
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
    return model


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
        weights: our single file, a merged state dict, or an official checkpoint.
        config: required except for our single file (whose embedded config is used; a given
            config must then describe the same model, and its ``tracking`` section wins).
        backbone_weights: DINOv2 file, required for official trainable-only checkpoints.
        device, dtype: target placement (dtype default: keep float32).

    Returns:
        (model, config).
    """
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
                               f"describes {config.model.variant}: {_first(diffs, 3)}")
        config = Config(model=file_cfg.model, tracking=(config or file_cfg).tracking, train=file_cfg.train)
    elif config is None:
        raise WeightsError(f"{path}: is a {fmt} file without an embedded config; pass the config too")
    cfg = config.model

    if fmt in ("lorat", "merged"):
        model = _build_loaded(cfg, sd, path, f"{fmt} state dict", sd)
    elif fmt == "official-trainable":
        if backbone_weights is None:
            raise WeightsError(
                f"{path}: is an official LoRAT checkpoint holding only the trainable tensors; it "
                f"needs the DINOv2 backbone file too: pass it with --backbone-weights"
                + (f" ({DINOV2_FILES[cfg.backbone.embed_dim]})" if cfg.backbone.embed_dim in DINOV2_FILES else "")
            )
        _check_size(cfg, sd, path, full=False)
        model = build_lorat(cfg, backbone_weights)
        load_official_trainable(model, sd, path)
        merge_lora(model)
    elif fmt == "official-full":
        lora_cfg = cfg.lora
        if "lora_alpha" in sd or "use_rslora" in sd:
            lora_cfg = dataclasses.replace(
                lora_cfg, alpha=float(sd.pop("lora_alpha", torch.tensor(lora_cfg.alpha)).item()),
                rslora=bool(sd.pop("use_rslora", torch.tensor(lora_cfg.rslora)).item()))
        model = _build_loaded(cfg, official_to_peft_keys(sd), path, "official full state dict", sd, lora_cfg)
        merge_lora(model)
    elif fmt == "mobilenetv2":
        raise WeightsError(f"{path}: is an ImageNet MobileNetV2 file (a stem to train from), not a LoRAT model")
    elif fmt == "dinov2":
        raise WeightsError(
            f"{path}: is a DINOv2 backbone file, not a LoRAT model; pass it as --backbone-weights "
            f"together with a LoRAT checkpoint"
        )
    else:
        raise WeightsError(f"{path}: not a LoRAT or DINOv2 weight file (first keys: {_first(list(sd))})")

    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    return model.to(device=device, dtype=dtype), config


def default_weights() -> Path:
    """The weights used when none are given: ``$LORAT_WEIGHTS`` or the bundled demo model.

    Raises:
        WeightsError: neither exists.
    """
    env = os.environ.get("LORAT_WEIGHTS")
    path = Path(env) if env else DEFAULT_WEIGHTS
    if not path.is_file():
        where = "LORAT_WEIGHTS" if env else "the bundled demo model"
        raise WeightsError(f"no --weights given and {where} {path} is missing; pass --weights FILE "
                           f"(see weights/README.md)")
    return path


def default_weights_notice(path: Path) -> str:
    """The line printed when :func:`default_weights` chose ``path``: which default it is."""
    if os.environ.get("LORAT_WEIGHTS"):
        return f"using LORAT_WEIGHTS={path}"
    return f"using the bundled demo model {path} (a small model, not the paper's; see README)"


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


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """``safetensors.save_file``, byte-stable and atomic (:func:`lorat.files.write_atomic`).

    safetensors keeps the metadata in a hash map, so its order in the header (and the file's
    bytes) varies from process to process; the header is rewritten with the metadata sorted, so
    identical inputs give identical files.
    """
    write_atomic(path, lambda tmp: _save_sorted_metadata(tensors, tmp, metadata))


def _save_sorted_metadata(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    save_file(dict(tensors), str(path), metadata=dict(metadata))
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        if len(text) == n:  # the usual case: same length, rewrite the header in place
            f.seek(8)
            f.write(text)
            return
        copy = path.with_name(path.name + "2")
        with open(copy, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            shutil.copyfileobj(f, out, 1 << 24)
    os.replace(copy, path)


def load_state_for_info(path: str | Path) -> tuple[str, int]:
    """(format, number of tensors) of a weight file, for reports."""
    sd, meta = read_weights(path)
    return detect_format(sd, meta), len(sd)

