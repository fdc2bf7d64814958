"""The LoRAT network: a timm DINOv2 ViT with decoupled position embeddings and an MLP head.

Template tokens (the small crop around the target in frame 0) and search tokens (the larger
crop in the current frame) share one spatial position grid: the search crop uses the whole
``pos_embed`` grid and the template its top-left sub-grid, so both are in the same pixel scale.
A 3-row token-type embedding marks template background (0), template foreground (1) and search
(2) tokens. Template tokens come first; all blocks run with full self-attention; the final norm
is applied and the search tokens go to the head (the paper, Sec. 3; the official
``trackit/models/methods/LoRAT/lorat.py``).

State-dict keys follow the official merged inference model (``pos_embed``, ``token_type_embed``,
``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
ls2.gamma}.*``, ``norm.*``, ``head.*``); the SwiGLU ``w12``/``w3`` of ViT-g are timm's
``mlp.fc1``/``mlp.fc2``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorat.config import BackboneConfig, ModelConfig, swiglu_hidden_size
from lorat.model.head import MlpHead
from lorat.model.stem import MobileNetV2Stem

__all__ = ["LoRAT", "PlacedByGrid", "drop_add_residual_subset", "resample_pos_embed", "sincos_pos_embed"]


def _swiglu_factory(cfg: BackboneConfig):
    """timm ``mlp_layer`` building DINOv2's SwiGLU FFN (packed w12 -> timm ``fc1``)."""
    hidden = swiglu_hidden_size(cfg.embed_dim, cfg.mlp_ratio)

    def build(in_features: int, hidden_features: int, act_layer=None, drop=0.0, device=None,
              dtype=None, **_: object) -> nn.Module:
        # DINOv2 splits w12's output as (a, b) and computes SiLU(a) * b: gate first.
        return GluMlp(in_features, 2 * hidden, act_layer=nn.SiLU, gate_last=False, drop=drop,
                      device=device, dtype=dtype)

    return build


def drop_add_residual_subset(x: torch.Tensor, branch, rate: float) -> torch.Tensor:
    """DINOv2's batch-subset stochastic depth: the branch runs on a random subset of samples.

    ``max(int(B * (1 - rate)), 1)`` samples get ``branch(x) * B / subset``; the others none.
    """
    b = x.shape[0]
    keep = max(int(b * (1 - rate)), 1)
    idx = torch.randperm(b, device=x.device)[:keep]
    residual = branch(x[idx])
    return torch.index_add(x, 0, idx, residual.to(x.dtype), alpha=b / keep)


class SubsetDropPathBlock(Block):
    """timm ``Block`` with DINOv2's batch-subset drop-path, used when the rate exceeds 0.1."""

    def __init__(self, *args, drop_path: float = 0.0, **kwargs):
        super().__init__(*args, drop_path=0.0, **kwargs)
        self.sample_drop_ratio = drop_path

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if not self.training or self.sample_drop_ratio <= 0:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = drop_add_residual_subset(x, lambda t: self.ls1(self.attn(self.norm1(t))),
                                      self.sample_drop_ratio)
        return drop_add_residual_subset(x, lambda t: self.ls2(self.mlp(self.norm2(t))),
                                         self.sample_drop_ratio)


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample a pretrained DINOv2 position embedding to a new token grid.

    Exactly the official rule: drop the CLS slot if present, view as (1, C, g, g), bicubic
    ``F.interpolate`` to the explicit size, ``align_corners=False``, no antialias, float32.

    Args:
        pos_embed: (1, 1 + g*g, C) or (1, g*g, C) pretrained embedding (37x37 for DINOv2).
        grid: target grid (H, W).

    Returns:
        (1, H*W, C) in the input dtype.
    """
    n = pos_embed.shape[1]
    side = int(round(n**0.5))
    if side * side != n:  # CLS slot first
        pos_embed = pos_embed[:, 1:]
        side = int(round((n - 1) ** 0.5))
        if side * side != n - 1:
            raise ValueError(f"pos_embed with {n} tokens is not a square grid (+ CLS)")
    c = pos_embed.shape[-1]
    dtype = pos_embed.dtype
    grid_2d = pos_embed.reshape(1, side, side, c).permute(0, 3, 1, 2).float()
    out = F.interpolate(grid_2d, size=tuple(grid), mode="bicubic", align_corners=False,
                        antialias=False)
    return out.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c).to(dtype)


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE style) for models without DINOv2 weights.

    Half the channels encode the row, half the column, each as sin/cos pairs over
    ``dim / 4`` frequencies ``10000^(-k / (dim / 4))``.

    Returns:
        (1, H*W, dim) float32, row-major like the token grid.
    """
    if dim % 4:
        raise ValueError(f"sine-cosine position embedding needs embed_dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        angles = pos[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)[None].float()


class PlacedByGrid:
    """``device`` and ``dtype`` of a network: those of its position grid (``pos_embed``)."""

    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.dtype


class LoRAT(PlacedByGrid, nn.Module):
    """One-stream ViT tracker network.

    Args:
        cfg: model config (backbone shape, crop sizes).
        device, dtype: where to allocate parameters (``torch.device("meta")`` to only count).

    Call ``model(z, x, z_feat_mask)`` with
        z: (B, 3, Ht, Wt) ImageNet-normalised template crop, Ht, Wt = template size in px;
        x: (B, 3, Hs, Ws) ImageNet-normalised search crop;
        z_feat_mask: (B, Hz, Wz) int64 in {0, 1}, 1 on template cells covering the target.
    It returns ``{"score_map": (B, Hx, Wx) float32 logits, "boxes": (B, Hx, Wx, 4) float32
    normalised x1y1x2y2}`` (see :class:`lorat.model.head.MlpHead`). The forward pass neither
    changes the grad mode nor uses autocast: callers decide.

    ``grad_checkpointing`` (attribute, default False; ``train.grad_checkpointing``): while gradients
    are recorded, each transformer block keeps only its input and recomputes its activations in the
    backward pass (``torch.utils.checkpoint``, non-reentrant): the same gradients in less memory.
    """

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        b = cfg.backbone
        dd = {"device": device, "dtype": dtype}
        self.template_grid = cfg.template_grid
        self.search_grid = cfg.search_grid
        hx, wx = self.search_grid

        if b.stem == "mobilenetv2":
            self.patch_embed = MobileNetV2Stem(b.embed_dim, **dd)
        else:
            self.patch_embed = PatchEmbed(img_size=None, patch_size=b.patch_size, in_chans=3,
                                          embed_dim=b.embed_dim, strict_img_size=False, **dd)
        # Frozen shared spatial grid, filled from the pretrained DINOv2 grid by the loaders.
        self.pos_embed = nn.Parameter(torch.zeros(1, hx * wx, b.embed_dim, **dd), requires_grad=False)
        self.token_type_embed = nn.Parameter(torch.empty(3, b.embed_dim, **dd))
        nn.init.trunc_normal_(self.token_type_embed, std=0.02)

        block_cls = SubsetDropPathBlock if b.drop_path > 0.1 else Block
        mlp_layer = _swiglu_factory(b) if b.ffn == "swiglu" else Mlp
        self.blocks = nn.ModuleList(
            block_cls(b.embed_dim, b.num_heads, mlp_ratio=b.mlp_ratio, qkv_bias=True,
                      init_values=b.layer_scale_init, drop_path=b.drop_path,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU,
                      mlp_layer=mlp_layer, **dd)
            for _ in range(b.depth)
        )
        for block in self.blocks:
            block.attn.fused_attn = True  # F.scaled_dot_product_attention
        self.norm = nn.LayerNorm(b.embed_dim, eps=1e-6, **dd)
        self.head = MlpHead(b.embed_dim, self.search_grid, **dd)
        self.grad_checkpointing = False

    def template_pos_embed(self) -> torch.Tensor:
        """(1, Hz*Wz, C): the top-left Hz x Wz sub-grid of the shared position grid."""
        hx, wx = self.search_grid
        hz, wz = self.template_grid
        grid = self.pos_embed.view(1, hx, wx, -1)[:, :hz, :wz]
        return grid.reshape(1, hz * wz, -1)

    def forward(self, z: torch.Tensor, x: torch.Tensor, z_feat_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        hz, wz = self.template_grid
        hx, wx = self.search_grid
        p = self.cfg.backbone.patch_size
        if z.shape[-2:] != (hz * p, wz * p) or x.shape[-2:] != (hx * p, wx * p):
            raise ValueError(
                f"expected template {hz * p}x{wz * p} and search {hx * p}x{wx * p} crops (HxW), "
                f"got {tuple(z.shape[-2:])} and {tuple(x.shape[-2:])}"
            )
        z_tokens = self.patch_embed(z)
        x_tokens = self.patch_embed(x)
        z_tokens = z_tokens + self.template_pos_embed() + self.token_type_embed[z_feat_mask.flatten(1)]
        x_tokens = x_tokens + self.pos_embed + self.token_type_embed[2]
        tokens = torch.cat([z_tokens, x_tokens], dim=1)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            tokens = checkpoint(block, tokens, use_reentrant=False) if recompute else block(tokens)
        tokens = self.norm(tokens)
        return self.head(tokens[:, -hx * wx:])
