"""Test helpers: tiny random models written in the real file formats."""

from __future__ import annotations

from pathlib import Path

import torch

from lorat.checkpoint import peft_to_official_keys
from lorat.config import Config, config_from_dict
from lorat.model import LoRAT


def tiny_config(**backbone) -> Config:
    bb = {"embed_dim": 48, "depth": 2, "num_heads": 2, "mlp_ratio": 4, "ffn": "mlp"} | backbone
    return config_from_dict({"model": {"variant": "test-tiny", "backbone": bb,
                                       "lora": {"r": 4, "alpha": 8}}})


def random_inputs(cfg: Config, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    (tw, th), (sw, sh) = cfg.model.template_size, cfg.model.search_size
    z = torch.randn(batch, 3, th, tw, generator=g)
    x = torch.randn(batch, 3, sh, sw, generator=g)
    mask = torch.zeros(batch, *cfg.model.template_grid, dtype=torch.long)
    mask[:, 2:5, 3:6] = 1
    return z, x, mask


def write_dinov2(cfg: Config, path: Path, seed: int = 0, official_names: bool = True) -> Path:
    """A random DINOv2 backbone in the release-file layout (37x37 grid + CLS slot)."""
    torch.manual_seed(seed)
    model = LoRAT(cfg.model)
    c = cfg.model.backbone.embed_dim
    sd = {"cls_token": torch.randn(1, 1, c), "pos_embed": torch.randn(1, 1 + 37 * 37, c),
          "mask_token": torch.zeros(1, c)}
    for k, v in model.state_dict().items():
        if k in ("pos_embed", "token_type_embed") or k.startswith("head."):
            continue
        if official_names and cfg.model.backbone.ffn == "swiglu":
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        sd[k] = v + 0.01 * torch.randn_like(v)  # LayerScale etc. away from their init
    torch.save(sd, path)
    return path


def official_trainable(model: LoRAT, swiglu: bool = False) -> dict[str, torch.Tensor]:
    """The trainable tensors of a LoRA model under the official names."""
    sd = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return peft_to_official_keys(sd, swiglu)
