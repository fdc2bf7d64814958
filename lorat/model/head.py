"""The anchor-free MLP head: a score logit and a box per search token.

As the official ``trackit/models/methods/LoRAT/modules/head/mlp.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MlpHead"]


class _Mlp(nn.Module):
    """``num_layers`` Linear layers with exact GELU between them (keys ``layers.{i}``)."""

    def __init__(self, dim: int, out_dim: int, num_layers: int = 3, device=None, dtype=None):
        super().__init__()
        dims = [dim] * num_layers + [out_dim]
        self.layers = nn.ModuleList(
            nn.Linear(dims[i], dims[i + 1], device=device, dtype=dtype) for i in range(num_layers)
        )
        for layer in self.layers:
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


class MlpHead(nn.Module):
    """Classification and box-regression MLPs over the search tokens.

    Args:
        dim: token width C.
        grid: search token grid (H, W); tokens are in row-major order.
    """

    def __init__(self, dim: int, grid: tuple[int, int], device=None, dtype=None):
        super().__init__()
        self.grid = grid
        self.cls_mlp = _Mlp(dim, 1, device=device, dtype=dtype)
        self.reg_mlp = _Mlp(dim, 4, device=device, dtype=dtype)
        h, w = grid
        # Cell centres in [0, 1]: ((j + 0.5) / W, (i + 0.5) / H), official linspace form.
        cx = torch.linspace(0.5, w - 0.5, w, device=device) / w
        cy = torch.linspace(0.5, h - 0.5, h, device=device) / h
        centres = torch.stack(torch.meshgrid(cx, cy, indexing="xy"), dim=-1)  # (H, W, 2)
        self.register_buffer("bbox_offset", centres, persistent=False)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decode search tokens.

        Args:
            tokens: (B, H*W, C) final-norm search tokens, any float dtype.

        Returns:
            ``score_map``: (B, H, W) float32 raw logits.
            ``boxes``: (B, H, W, 4) float32 normalised x1y1x2y2 in search-crop units
            (multiply x by the crop width in px, y by its height); may leave [0, 1].
        """
        b = tokens.shape[0]
        h, w = self.grid
        score = self.cls_mlp(tokens).float().view(b, h, w)
        ltrb = self.reg_mlp(tokens).float().sigmoid().view(b, h, w, 4)
        centre = self.bbox_offset.to(torch.float32)
        boxes = torch.cat([centre - ltrb[..., :2], centre + ltrb[..., 2:]], dim=-1)
        return {"score_map": score, "boxes": boxes}
