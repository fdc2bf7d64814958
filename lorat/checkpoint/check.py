"""Does a state dict fit a model config? Checked before any memory is allocated, explained when not.

A config (embedded in a file, or given by the user) decides how much memory building the model
takes, so a file is first checked against it by size (tensor count, total values), then by names
and shapes on a shape-only model (the meta device). Failures name the file, the variant, the
first offending keys, and what the file looks like.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from lorat.config import LoraConfig, ModelConfig
from lorat.errors import WeightsError, listed
from lorat.model import build_network

__all__ = ["describe", "check_fit", "check_size", "expected_shapes"]


_ARCH_NAMES = {384: "ViT-S/14", 768: "ViT-B/14", 1024: "ViT-L/14", 1536: "ViT-g/14"}


_BLOCK_KEY = re.compile(r"blocks\.(?:\d+\.)?(\d+)\.")  # blocks.N. or DINOv2's chunked blocks.C.N.


def _file_depth(sd: Mapping[str, torch.Tensor]) -> int:
    """Number of transformer blocks a state dict holds (0 if none)."""
    return 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))), default=-1)


def describe(sd: Mapping[str, torch.Tensor]) -> str:
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


def check_fit(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size],
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
        problems.append(f"wrong shapes: {listed(shapes, 3)}")
    if missing:
        problems.append(f"missing keys: {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listed(unexpected)}")
    raise WeightsError(
        f"{path}: {what} does not fit model {variant}: {'; '.join(problems)}. "
        f"The file looks like: {describe(original)}."
    )


# Every transformer block holds at least this many tensors (norm1/2, qkv, proj: weight and bias) and
# at least 4 * C^2 weights (q, k, v and the output projection).
_MIN_TENSORS_PER_BLOCK = 8


def check_size(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], path: Path, full: bool) -> None:
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
            f"belong to this file. The file looks like: {describe(sd)}."
        )


def expected_shapes(cfg: ModelConfig, lora: LoraConfig | None = None) -> dict[str, torch.Size]:
    """Tensor names and shapes of a model, from a shape-only build on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_network(cfg, lora)
    return {k: v.shape for k, v in model.state_dict().items()}
