"""Typed configuration: dataclasses filled from YAML, strictly.

A config file has the sections ``model`` and ``tracking`` (see ``configs/*.yaml``). Unknown
keys, wrong types and impossible values raise :class:`~lorat.errors.ConfigError` naming the key.
Sizes are given in pixels as an int (square) or ``[W, H]``, the official ``(W, H)`` order.

Overrides use dotted keys with YAML values, e.g. ``tracking.window_penalty=0.5``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lorat.errors import ConfigError

__all__ = [
    "BackboneConfig",
    "LoraConfig",
    "ModelConfig",
    "TrackingConfig",
    "TrainConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "swiglu_hidden_size",
]

Size = tuple[int, int]


@dataclass(frozen=True)
class BackboneConfig:
    """DINOv2 ViT shape. Defaults are ViT-B/14."""

    embed_dim: int = 768  # token width C
    depth: int = 12  # number of transformer blocks
    num_heads: int = 12  # attention heads; embed_dim must be divisible by it
    mlp_ratio: float = 4.0  # FFN hidden = embed_dim * mlp_ratio (before the SwiGLU rule)
    ffn: Literal["mlp", "swiglu"] = "mlp"  # "swiglu" for ViT-g (DINOv2 hidden-size rule)
    patch_size: int = 14  # DINOv2 patch size; also the stride of every token grid
    drop_path: float = 0.0  # uniform stochastic-depth rate (training only); L 0.1, g 0.4
    layer_scale_init: float = 1e-5  # LayerScale init (irrelevant once weights are loaded)
    # Token stem. "patch": DINOv2's 14x14 patch projection (the paper's model). "mobilenetv2":
    # torchvision's MobileNetV2 features up to stride 16 (96 channels, frozen BatchNorm) and a
    # 1x1 projection; patch_size must be 16. For small CPU models whose stem starts from
    # ImageNet weights (the bundled demo model), not for the official checkpoints.
    stem: Literal["patch", "mobilenetv2"] = "patch"


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on q, k, v, proj and the two FFN linears of every block."""

    r: int = 64  # rank
    alpha: float = 64.0  # scaling s = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter input (official: 0)
    rslora: bool = False  # rank-stabilised scaling


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides the network's tensors."""

    variant: str = "custom"  # display name, e.g. "B-224"; used in messages
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    template_size: Size = (112, 112)  # template crop (W, H) in px, multiple of patch_size
    search_size: Size = (224, 224)  # search crop (W, H) in px, multiple of patch_size
    lora: LoraConfig = field(default_factory=LoraConfig)
    # "loratv2" (Lin et al., NeurIPS 2025): chunk-causal streams (template, [reference], search) with
    # a key-value cache; the fields below are LoRATv2's and must keep their defaults for "lorat".
    family: Literal["lorat", "loratv2"] = "lorat"
    register_tokens: int = 0  # DINOv2 register tokens before the template (4 for *_reg4_dinov2)
    reference_size: Size | None = None  # phase 2: the dynamic reference frame's crop (W, H) in px
    pos_grid: Size | None = None  # the pretrained position grid (W, H) in tokens, read top-left (37x37)

    @property
    def template_grid(self) -> Size:
        """Template token grid (Hz, Wz), rows first."""
        p = self.backbone.patch_size
        return self.template_size[1] // p, self.template_size[0] // p

    @property
    def search_grid(self) -> Size:
        """Search token grid (Hx, Wx), rows first; also the response-map size."""
        p = self.backbone.patch_size
        return self.search_size[1] // p, self.search_size[0] // p

    @property
    def search_sizes(self) -> list[Size]:
        """LoRATv2's search regions (W, H) in stream order: the reference frame (phase 2), then the search."""
        return ([self.reference_size] if self.reference_size is not None else []) + [self.search_size]

    @property
    def phase_two(self) -> bool:
        """LoRATv2 phase 2: a reference stream between the template and the search region."""
        return self.family == "loratv2" and self.reference_size is not None

    def same_network(self, other: ModelConfig) -> bool:
        """Whether ``other`` describes the same network (the variant name may differ)."""
        return dataclasses.replace(other, variant=self.variant) == self


@dataclass(frozen=True)
class TrackingConfig:
    """Inference constants of the tracking loop of the paper (Lin et al., ECCV 2024) and the official code."""

    template_area_factor: float = 2.0  # template crop context factor
    search_area_factor: float = 4.0  # search crop context factor (5.0 for the 378 variants)
    min_object_size: float = 10.0  # the box is enlarged to at least this (px) before cropping
    window_penalty: float = 0.45  # weight of the symmetric Hann window on the score map
    reference_area_factor: float = 4.0  # LoRATv2 phase 2: context factor of the reference-frame crop
    reference_threshold: float = 0.9  # LoRATv2 phase 2: a frame scoring above this becomes the reference


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe of the paper (Lin et al., ECCV 2024); defaults are the official code's values."""

    finetune: Literal["lora", "full"] = "lora"  # "full" trains every weight (no LoRA), e.g. from scratch
    batch_size: int = 128  # global batch, split over processes
    samples_per_epoch: int = 131072  # training pairs per epoch
    epochs: int = 170
    lr: float = 1e-4  # AdamW peak learning rate (no scaling with batch size)
    min_lr: float = 1e-6  # cosine floor
    warmup_lr: float = 1e-7  # linear warm-up start
    warmup_epochs: float = 2.0  # warm-up length, prefixed to the cosine
    weight_decay: float = 0.1  # for LoRA and head weights; 0 for 1-D parameters and embeddings
    grad_clip: float = 1.0  # global L2 norm
    amp: Literal["auto", "float16", "bfloat16", "none"] = "auto"  # auto: float16 on CUDA, bfloat16 on bf16 CPUs
    compile: bool = False  # torch.compile the model (official: on)
    grad_checkpointing: bool = False  # recompute block activations in backward: ~30 % less memory, ~1.5x step time
    num_workers: int = 8  # data-loading processes per training process
    seed: int = 0  # one seed decides every sample, so runs and resumes are reproducible
    checkpoint_every: int = 10  # epochs between checkpoints (plus the last epoch)
    save_state_every_minutes: float = 10.0  # resumable state.pt within an epoch too (0: at epoch ends only)
    max_gap: int = 100  # largest frame distance between template and search frames
    scale_jitter: float = 0.25  # search crop: log-normal scale jitter per axis
    translation_jitter: float = 3.0  # search crop: centre jitter factor
    min_object_size: float = 10.0  # search crop: the jittered target keeps at least this many px per side
    freeze_stem: bool = False  # keep the pretrained part of a mobilenetv2 stem fixed (faster on CPU)
    flip_prob: float = 0.5  # horizontal flip, per image
    color_jitter: float = 0.4  # brightness / contrast / saturation strength, per image
    deit3: bool = True  # DeiT-III grayscale / solarize / blur, joint
    val_samples: int = 4096  # validation pairs per epoch (0: no validation)
    dataset_weights: dict[str, float] = field(default_factory=lambda: {
        "lasot": 1.0, "got10k": 1.0, "trackingnet": 1.0, "coco": 1.0, "custom": 1.0})  # mixture of given sets


@dataclass(frozen=True)
class Config:
    """A whole config file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def swiglu_hidden_size(embed_dim: int, mlp_ratio: float) -> int:
    """DINOv2's SwiGLU hidden width: 2/3 of ``embed_dim * mlp_ratio``, rounded up to 8.

    ViT-g: 1536 * 4 -> int(6144 * 2 / 3) = 4096 -> 4096.
    """
    hidden = int(int(embed_dim * mlp_ratio) * 2 / 3)
    return (hidden + 7) // 8 * 8


# ----------------------------------------------------------------------------- parsing


_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _is_int(value: Any) -> bool:
    """An int that is not a bool (YAML's ``true`` is no number here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _to_dataclass(value: Any, tp: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return _build(tp, value, where)


def _to_size(value: Any, tp: Any, where: str) -> Size:
    if _is_int(value):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(map(_is_int, value)):
        raise ConfigError(f"{where}: expected an int or [W, H] of ints, got {value!r}")
    return (int(value[0]), int(value[1]))


def _to_literal(value: Any, tp: Any, where: str) -> Any:
    choices = typing.get_args(tp)
    if value not in choices:
        raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
    return value


def _to_bool(value: Any, tp: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    return value


def _to_int(value: Any, tp: Any, where: str) -> int:
    if not _is_int(value):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value


def _to_float(value: Any, tp: Any, where: str) -> float:
    if isinstance(value, str) and _YAML11_FLOAT.match(value):  # PyYAML reads 1e-4 (no dot) as a string
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _to_str(value: Any, tp: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _to_dict(value: Any, tp: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    item_type = typing.get_args(tp)[1]
    return {str(k): _convert(v, item_type, f"{where}.{k}") for k, v in value.items()}


def _to_optional(value: Any, tp: Any, where: str) -> Any:
    """``X | None``: None, or a value of the first non-None member."""
    if value is None:
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return _convert(value, args[0], where)


_Converter = Callable[[Any, Any, str], Any]
# Converters by field type (plain classes) and by generic origin (Literal[...], dict[...], X | None).
_BY_TYPE: dict[Any, _Converter] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
_BY_ORIGIN: dict[Any, _Converter] = {Literal: _to_literal, dict: _to_dict, typing.Union: _to_optional,
                                     types.UnionType: _to_optional}


def _converter(tp: Any) -> _Converter | None:
    """The converter of a dataclass field type; None for a type no config field has."""
    if dataclasses.is_dataclass(tp):
        return _to_dataclass
    if tp is Size or (typing.get_origin(tp) is tuple and typing.get_args(tp) == (int, int)):
        return _to_size
    return _BY_TYPE.get(tp) or _BY_ORIGIN.get(typing.get_origin(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    convert = _converter(tp)
    if convert is None:
        raise TypeError(f"unsupported config field type {tp!r} at {where}")  # a bug, not user input
    return convert(value, tp, where)


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (allowed here: {', '.join(names)})"
        )
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _backbone_problems(cfg: Config) -> Iterator[str]:
    b = cfg.model.backbone
    for name in ("embed_dim", "depth", "num_heads", "patch_size"):
        if getattr(b, name) <= 0:
            yield f"model.backbone.{name} must be positive, got {getattr(b, name)}"
    if b.embed_dim % b.num_heads:
        yield f"model.backbone.embed_dim ({b.embed_dim}) must be divisible by num_heads ({b.num_heads})"
    if b.mlp_ratio <= 0 or not 0 <= b.drop_path < 1:
        yield "model.backbone.mlp_ratio must be > 0 and drop_path in [0, 1)"
    if b.stem == "mobilenetv2" and b.patch_size != 16:
        yield f"model.backbone.stem mobilenetv2 has stride 16: set patch_size 16, not {b.patch_size}"


def _crop_size_problems(cfg: Config) -> Iterator[str]:
    m, patch = cfg.model, cfg.model.backbone.patch_size
    for name, size in (("template_size", m.template_size), ("search_size", m.search_size)):
        if min(size) <= 0 or size[0] % patch or size[1] % patch:
            yield f"model.{name} {list(size)} must be positive multiples of patch_size {patch}"
    if m.family == "loratv2":
        yield from _v2_problems(m)
    elif m.register_tokens or m.reference_size is not None or m.pos_grid is not None:
        yield "model.register_tokens, reference_size and pos_grid are LoRATv2's (model.family: loratv2)"
    elif m.template_grid[0] > m.search_grid[0] or m.template_grid[1] > m.search_grid[1]:
        yield ("model.template_size must not exceed search_size: the template takes the top-left "
               "sub-grid of the search position embedding")


def _v2_problems(m: ModelConfig) -> Iterator[str]:
    b, patch = m.backbone, m.backbone.patch_size
    if b.stem != "patch" or b.ffn != "mlp":
        yield "model.family loratv2 needs a DINOv2 patch stem and the plain MLP (stem: patch, ffn: mlp)"
    if m.register_tokens < 0 or m.pos_grid is None or min(m.pos_grid) <= 0:
        yield "model.family loratv2 needs register_tokens >= 0 and pos_grid [W, H] (37 for DINOv2)"
        return
    if m.reference_size is not None and (min(m.reference_size) <= 0 or m.reference_size[0] % patch
                                         or m.reference_size[1] % patch):
        yield f"model.reference_size {list(m.reference_size)} must be positive multiples of patch_size {patch}"
    for name, size in (("template_size", m.template_size), *(("search_size", s) for s in m.search_sizes)):
        if size[0] // patch > m.pos_grid[0] or size[1] // patch > m.pos_grid[1]:
            yield f"model.{name} {list(size)} exceeds the {list(m.pos_grid)} position grid of {patch} px tokens"


def _lora_problems(cfg: Config) -> Iterator[str]:
    lora = cfg.model.lora
    if lora.r <= 0 or not 0 <= lora.dropout < 1:
        yield "model.lora.r must be positive and dropout in [0, 1)"


def _train_problems(cfg: Config) -> Iterator[str]:
    tr = cfg.train
    if tr.batch_size <= 0 or tr.samples_per_epoch < tr.batch_size or tr.epochs <= 0:
        yield "train.batch_size must be positive and at most train.samples_per_epoch; epochs > 0"
    if tr.lr <= 0 or tr.warmup_epochs < 0 or tr.grad_clip <= 0 or tr.num_workers < 0 or tr.checkpoint_every < 1:
        yield "train: lr and grad_clip must be > 0, warmup_epochs and num_workers >= 0, checkpoint_every >= 1"
    if tr.save_state_every_minutes < 0:
        yield "train.save_state_every_minutes must be >= 0 (0: state.pt at epoch ends only)"
    if tr.freeze_stem and cfg.model.backbone.stem == "patch":
        yield "train.freeze_stem needs a pretrained stem (model.backbone.stem: mobilenetv2)"
    if any(w < 0 for w in tr.dataset_weights.values()):
        yield "train.dataset_weights must be >= 0"


def _tracking_problems(cfg: Config) -> Iterator[str]:
    t = cfg.tracking
    if t.template_area_factor <= 0 or t.search_area_factor <= 0:
        yield "tracking area factors must be positive"
    if t.min_object_size < 0 or not 0 <= t.window_penalty <= 1:
        yield "tracking.min_object_size must be >= 0 and window_penalty in [0, 1]"
    if t.reference_area_factor <= 0 or not 0 <= t.reference_threshold <= 1:
        yield "tracking.reference_area_factor must be positive and reference_threshold in [0, 1]"


# Value checks by section, in the order they are reported. Each yields the problems it finds; a
# check only runs once the earlier ones passed (the grid checks need a positive patch size).
_VALUE_CHECKS: tuple[Callable[[Config], Iterator[str]], ...] = (
    _backbone_problems, _crop_size_problems, _lora_problems, _train_problems, _tracking_problems)


def _check_values(cfg: Config) -> None:
    """Raise :class:`ConfigError` with the first impossible value found."""
    for check in _VALUE_CHECKS:
        problem = next(check(cfg), None)
        if problem is not None:
            raise ConfigError(problem)


def config_from_dict(data: Mapping[str, Any] | None, where: str = "") -> Config:
    """Build a validated :class:`Config` from a plain mapping (e.g. parsed YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: top level must be a mapping")
    try:
        cfg = _build(Config, data, "")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None
    _check_values(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain, JSON-serialisable form of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config strictly, apply ``key=value`` overrides, validate.

    ``path`` is a file, or the name of a bundled config (``b224``, ``configs/b224.yaml`` from any
    folder; see :mod:`lorat.files`).

    Raises:
        ConfigError: missing file, YAML syntax error, unknown key, wrong type or bad value.
    """
    path = Path(path)
    if not path.is_file():
        from lorat.files import bundled_config, config_names

        bundled = bundled_config(str(path))
        if bundled is None:
            raise ConfigError(f"config file not found: {path} (bundled configs: {', '.join(config_names())})")
        path = bundled
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a YAML config (not text; a weight file? pass it with --weights)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides:
        _apply_override(data, item)
    return config_from_dict(data, where=str(path))
