"""Test helpers: tiny random models written in the real file formats."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from lorat.checkpoint.keys import peft_to_official_keys
from lorat.config import Config, config_from_dict
from lorat.model.vit import LoRAT


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


def textured_clip(n: int = 8, size: tuple[int, int] = (320, 240), seed: int = 0) -> tuple[list, list]:
    """RGB uint8 frames of a textured square moving over a textured background, and its xywh boxes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w, h = size
    background = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)[:h, :w]
    patch = rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)
    frames, boxes = [], []
    for i in range(n):
        x, y = 60 + 9 * i, 70 + 5 * i
        frame = background.copy()
        frame[y:y + 40, x:x + 52] = patch
        frames.append(frame)
        boxes.append((x, y, 52, 40))
    return frames, boxes


def bright_spot_model(cfg: Config) -> LoRAT:
    """A real LoRAT whose weights are set by hand so that it scores *brightness*.

    Blocks are identities (LayerScale 0), the patch embedding measures the mean intensity of each
    patch, the classification MLP turns it into a logit of about +6 on white and -4 on black
    patches, and the regression MLP predicts a square of 1/(2f) crop widths per side, i.e. the
    size of a square target. Any white square is therefore "the target": two white squares are
    perfect look-alikes, which is what the identity tests need.
    """
    import torch.nn.functional as F

    c = cfg.model.backbone.embed_dim
    model = LoRAT(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        p = cfg.model.backbone.patch_size
        model.patch_embed.proj.weight[0] = 1.0 / (3 * p * p)
        model.patch_embed.proj.weight[1] = -1.0 / (3 * p * p)
        model.patch_embed.proj.bias[2], model.patch_embed.proj.bias[3] = 1.0, -1.0
        model.norm.weight.fill_(1.0)
        for block in model.blocks:
            block.norm1.weight.fill_(1.0)
            block.norm2.weight.fill_(1.0)
        cls = model.head.cls_mlp.layers
        cls[0].weight[0, 0], cls[0].bias[0] = 1.0, 2.0
        cls[1].weight[0, 0] = 1.0

        def feature(intensity: float) -> float:  # what the head sees for a uniform patch
            a = sum((intensity - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)) / 3
            n0 = a / ((2 * a * a + 2) / c) ** 0.5
            return float(F.gelu(F.gelu(torch.tensor(n0 + 2.0))))

        hi, lo = feature(1.0), feature(0.0)
        alpha = 10.0 / (hi - lo)
        cls[2].weight[0, 0], cls[2].bias[0] = alpha, 6.0 - alpha * hi
        half = 1.0 / (2 * cfg.tracking.search_area_factor)
        model.head.reg_mlp.layers[2].bias.fill_(float(torch.logit(torch.tensor(half))))
    return model


ADDRESS_SPACE_CAP_GB = 8.0  # torch + lorat + onnxruntime map about 3.7 GB of address space before any work


def run_capped(args: list[str], limit_gb: float = ADDRESS_SPACE_CAP_GB, timeout: float = 120,
               **kwargs) -> subprocess.CompletedProcess:
    """``python *args`` with its address space capped (RLIMIT_AS): a regression that allocates what a
    hostile file asks for fails at once (MemoryError, exit 1 with a traceback) instead of swapping."""

    def cap() -> None:
        import resource

        limit = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, *args], preexec_fn=cap, capture_output=True, text=True, timeout=timeout,
                          **kwargs)
