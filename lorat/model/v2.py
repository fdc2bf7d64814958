"""The LoRATv2 network: one-stream tracking with chunk-wise causal attention and a KV cache.

LoRATv2 (Lin et al., NeurIPS 2025; the official ``trackit/models/methods/LoRATv2``) cuts the token
sequence into chunks, one per *stream*: stream 0 holds the register tokens and the template, each
later stream one search region (phase 1: the current frame; phase 2: a dynamic reference frame,
then the current frame). Attention is causal between chunks: a chunk attends to itself and to
every chunk before it, never to a later one. So the template (and the reference) can be encoded
once, their keys and values kept (:class:`KVCache`), and each new frame computes only its own
search tokens.

Every linear layer of every block (qkv, proj, fc1, fc2) has one copy per stream, chosen by the
chunk's position (static routing); LoRA adapters sit on the copies of the streams that train.
Streams that train share the frozen backbone weight tensors (their copies are tied, as the
official layers share one ``nn.Linear``); a frozen stream owns its (merged) weights. Each search
stream has its own final norm and MLP head; the last stream's head gives the output. State-dict
keys are those of the official merged inference model.

The shared spatial grid is the pretrained one (37x37 for DINOv2 at 518 px) without resampling:
the template and each search region add its top-left sub-grid. Template tokens add a token-type
row by the foreground mask (background 0, foreground 1); each search stream adds its own row.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorat.config import BackboneConfig, ModelConfig, Size
from lorat.model.head import MlpHead
from lorat.model.vit import PlacedByGrid, drop_add_residual_subset

__all__ = ["KVCache", "LoRATv2", "StreamBlock"]


def _tied_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are the original tensors (the streams' shared weights)."""
    twin = copy.copy(module)
    twin._parameters = dict(module._parameters)
    twin._modules = {name: _tied_copy(child) for name, child in module._modules.items()}
    return twin


class _StreamAttention(nn.Module):
    """Attention whose qkv and proj have one copy per stream (keys ``qkv.{i}``, ``proj.{i}``)."""

    def __init__(self, attn: nn.Module, copies):
        super().__init__()
        self.num_heads = attn.num_heads
        self.qkv = copies(attn.qkv)
        self.proj = copies(attn.proj)

    def qkv_heads(self, stream: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> q, k, v, each (B, heads, N, head_dim)."""
        b, n, c = x.shape
        qkv = self.qkv[stream](x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attend(self, stream: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention of q over (k, v), then the stream's output projection: (B, N, C)."""
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj[stream](out.transpose(1, 2).flatten(2))


class _StreamMlp(nn.Module):
    """timm's MLP with one fc1 / fc2 per stream (keys ``fc1.{i}``, ``fc2.{i}``)."""

    def __init__(self, mlp: Mlp, copies):
        super().__init__()
        self.fc1 = copies(mlp.fc1)
        self.act = mlp.act
        self.fc2 = copies(mlp.fc2)

    def forward(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        return self.fc2[stream](self.act(self.fc1[stream](x)))


class StreamBlock(nn.Module):
    """A DINOv2 ViT block (timm's) whose linear layers have one copy per stream.

    State-dict keys are the official ones (``norm1``, ``attn.qkv.{i}``, ``attn.proj.{i}``,
    ``ls1.gamma``, ``norm2``, ``mlp.fc1.{i}``, ``mlp.fc2.{i}``, ``ls2.gamma``).

    Args:
        cfg: backbone shape.
        owned: per stream, whether it owns its weights (a frozen, merged stream) or shares the
            backbone's tensors with the other sharing streams (a stream that trains through LoRA).
    """

    def __init__(self, cfg: BackboneConfig, owned: Sequence[bool], device=None, dtype=None):
        super().__init__()
        block = Block(cfg.embed_dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                      init_values=cfg.layer_scale_init, drop_path=cfg.drop_path,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU, mlp_layer=Mlp,
                      device=device, dtype=dtype)
        self.drop_path = cfg.drop_path
        self.drop_path1, self.drop_path2 = block.drop_path1, block.drop_path2

        def copies(module: nn.Module) -> nn.ModuleList:
            return nn.ModuleList(copy.deepcopy(module) if own else _tied_copy(module) for own in owned)

        self.norm1, self.ls1, self.norm2, self.ls2 = block.norm1, block.ls1, block.norm2, block.ls2
        self.attn = _StreamAttention(block.attn, copies)
        self.mlp = _StreamMlp(block.mlp, copies)

    def _attention(self, x: torch.Tensor, chunks: Sequence[int]) -> torch.Tensor:
        normed = self.norm1(x).split(list(chunks), dim=1)
        keys, values, out = [], [], []
        for stream, part in enumerate(normed):
            q, k, v = self.attn.qkv_heads(stream, part)
            keys.append(k)
            values.append(v)
            out.append(self.attn.attend(stream, q, torch.cat(keys, 2), torch.cat(values, 2)))
        return self.ls1(torch.cat(out, dim=1))

    def _mlp(self, x: torch.Tensor, chunks: Sequence[int]) -> torch.Tensor:
        normed = self.norm2(x).split(list(chunks), dim=1)
        return self.ls2(torch.cat([self.mlp(part, s) for s, part in enumerate(normed)], dim=1))

    def forward(self, x: torch.Tensor, chunks: Sequence[int]) -> torch.Tensor:
        """Full chunk-causal pass over (B, sum(chunks), C) tokens; chunk i runs through stream i.

        Training with drop_path: per-sample stochastic depth, or above a rate of 0.1 DINOv2's
        batch-subset form (as the official block)."""
        if self.training and self.drop_path > 0.1:
            x = drop_add_residual_subset(x, lambda t: self._attention(t, chunks), self.drop_path)
            return drop_add_residual_subset(x, lambda t: self._mlp(t, chunks), self.drop_path)
        x = x + self.drop_path1(self._attention(x, chunks))
        return x + self.drop_path2(self._mlp(x, chunks))

    def step(self, x: torch.Tensor, stream: int, past_k: torch.Tensor | None, past_v: torch.Tensor | None,
             kv_only: bool = False) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """One chunk (B, N, C) after the cached earlier chunks' keys and values (B, heads, L, head_dim;
        None: no earlier chunk). Returns (output tokens, this chunk's keys, values); with ``kv_only``
        (the last block of an encoding pass) the output is skipped and None."""
        q, k, v = self.attn.qkv_heads(stream, self.norm1(x))
        if kv_only:
            return None, k, v
        k_all = k if past_k is None else torch.cat([past_k.to(k.dtype), k], dim=2)
        v_all = v if past_v is None else torch.cat([past_v.to(v.dtype), v], dim=2)
        x = x + self.ls1(self.attn.attend(stream, q, k_all, v_all))
        return x + self.ls2(self.mlp(self.norm2(x), stream)), k, v


@dataclass
class KVCache:
    """Keys and values of every block for the chunks before the search region: the registers and
    the template (stream 0) and, in phase 2, the reference frame (stream 1).

    ``keys[i]`` / ``values[i]``: (N, heads, L, head_dim) for block i; ``offsets[s]``: where chunk s
    starts (the last offset is L). Sequences run along N: :meth:`select` and :meth:`cat` batch them.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    offsets: list[int]

    def __len__(self) -> int:
        return self.keys[0].shape[0]

    def select(self, index: torch.Tensor) -> KVCache:
        """The sub-batch of the given sequences (a copy)."""
        return KVCache([k[index] for k in self.keys], [v[index] for v in self.values], self.offsets)

    @staticmethod
    def cat(caches: Sequence[KVCache]) -> KVCache:
        """Several caches as one batch."""
        return KVCache([torch.cat(parts) for parts in zip(*(c.keys for c in caches), strict=True)],
                       [torch.cat(parts) for parts in zip(*(c.values for c in caches), strict=True)],
                       caches[0].offsets)


class LoRATv2(PlacedByGrid, nn.Module):
    """Chunk-causal one-stream ViT tracker network (LoRATv2).

    Args:
        cfg: model config with ``family: loratv2`` (template, reference and search sizes, register
            tokens, the pretrained position grid).
        owned: per stream, whether it owns its block weights (frozen, merged) or trains through
            LoRA on the shared backbone tensors; default: all shared.
        device, dtype: where to allocate parameters (``torch.device("meta")`` to only count).

    ``model(z, x, z_feat_mask)`` is the full (training) pass, called as :class:`lorat.model.vit.LoRAT`
    is: z (B, 3, Ht, Wt) and x (B, 3, Hs, Ws) ImageNet-normalised crops (phase 2: x is the list of the
    reference and the search crop), z_feat_mask (B, Hz, Wz) int64 in {0, 1}. It returns the last
    head's ``{"score_map": (B, H, W) float32 logits, "boxes": (B, H, W, 4) float32 normalised
    x1y1x2y2}`` on the last search region. :meth:`encode_template`, :meth:`encode_reference` and
    :meth:`track` compute the same outputs chunk by chunk through a :class:`KVCache`.
    """

    def __init__(self, cfg: ModelConfig, owned: Sequence[bool] | None = None, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if cfg.family != "loratv2" or cfg.pos_grid is None:
            raise ValueError(f"model {cfg.variant} is not a LoRATv2 config (family {cfg.family})")
        self.cfg = cfg
        b = cfg.backbone
        self.template_size = tuple(cfg.template_size)
        self.search_sizes = [tuple(s) for s in cfg.search_sizes]
        self.streams = 1 + len(self.search_sizes)
        owned = list(owned) if owned is not None else [False] * self.streams
        if len(owned) != self.streams:
            raise ValueError(f"owned has {len(owned)} entries for {self.streams} streams")
        c, p = b.embed_dim, b.patch_size
        self.pos_grid = (cfg.pos_grid[1], cfg.pos_grid[0])  # (H, W)
        self.patch_embed = PatchEmbed(img_size=None, patch_size=p, in_chans=3, embed_dim=c,
                                      strict_img_size=False, **dd)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], c, **dd),
                                      requires_grad=False)
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.register_tokens, c, **dd), requires_grad=False)
        self.template_token_type_embed = nn.Parameter(torch.empty(2, c, **dd))
        self.search_region_token_type_embed = nn.ParameterList(
            nn.Parameter(torch.empty(1, c, **dd)) for _ in self.search_sizes)
        for embed in (self.template_token_type_embed, *self.search_region_token_type_embed):
            nn.init.normal_(embed, std=1e-6)
        self.blocks = nn.ModuleList(StreamBlock(b, owned, **dd) for _ in range(b.depth))
        self.norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-6, **dd) for _ in self.search_sizes)
        self.heads = nn.ModuleList(MlpHead(c, (h // p, w // p), **dd) for w, h in self.search_sizes)
        self.grad_checkpointing = False  # as LoRAT's: recompute each block's activations in the backward pass

    def chunk_sizes(self) -> list[int]:
        """Tokens per chunk: registers + template, then each search region."""
        p = self.cfg.backbone.patch_size
        w, h = self.template_size
        return [self.reg_token.shape[1] + (w // p) * (h // p)] + [(w // p) * (h // p) for w, h in self.search_sizes]

    def _grid(self, size: Size) -> torch.Tensor:
        """(1, H*W, C): the top-left sub-grid of the position grid for a crop of ``size`` (W, H) px."""
        p = self.cfg.backbone.patch_size
        gh, gw = self.pos_grid
        grid = self.pos_embed.view(1, gh, gw, -1)[:, :size[1] // p, :size[0] // p]
        return grid.reshape(1, -1, self.cfg.backbone.embed_dim)

    def _template_tokens(self, z: torch.Tensor, z_feat_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(z) + self._grid(self.template_size)
        tokens = tokens + self.template_token_type_embed[z_feat_mask.flatten(1)]
        return torch.cat([self.reg_token.expand(z.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)

    def _search_tokens(self, x: torch.Tensor, index: int) -> torch.Tensor:
        size = self.search_sizes[index]
        if x.shape[-2:] != (size[1], size[0]):
            raise ValueError(f"search region {index} expects {size[1]}x{size[0]} crops (HxW), "
                             f"got {tuple(x.shape[-2:])}")
        return self.patch_embed(x) + self._grid(size) + self.search_region_token_type_embed[index]

    def _head(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads[-1](self.norms[-1](tokens))

    def forward(self, z: torch.Tensor, x: torch.Tensor | Sequence[torch.Tensor], z_feat_mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """The full pass, called as LoRAT is: ``x`` is the search crop, or in phase 2 the list
        (reference crop, search crop)."""
        xs = [x] if isinstance(x, torch.Tensor) else list(x)
        if len(xs) != len(self.search_sizes):
            raise ValueError(f"expected {len(self.search_sizes)} search crops, got {len(xs)}")
        chunks = self.chunk_sizes()
        parts = [self._template_tokens(z, z_feat_mask)] + [self._search_tokens(x, i) for i, x in enumerate(xs)]
        tokens = torch.cat(parts, dim=1)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            tokens = checkpoint(block, tokens, chunks, use_reentrant=False) if recompute else block(tokens, chunks)
        return self._head(tokens[:, -chunks[-1]:])

    def _run(self, tokens: torch.Tensor, stream: int, cache: KVCache | None) -> torch.Tensor | KVCache:
        """Run one chunk through every block after the cached chunks. An earlier chunk (template,
        reference) writes its keys and values into the cache (made here for the template) and
        returns it; the search chunk returns its output tokens."""
        n, last = tokens.shape[0], len(self.blocks) - 1
        chunks = self.chunk_sizes()
        start = sum(chunks[:stream])
        encode = stream < self.streams - 1
        for i, block in enumerate(self.blocks):
            past_k = cache.keys[i][:, :, :start] if start else None
            past_v = cache.values[i][:, :, :start] if start else None
            tokens, k, v = block.step(tokens, stream, past_k, past_v, kv_only=encode and i == last)
            if not encode:
                continue
            if cache is None:
                prefix = sum(chunks[:-1])
                shape = (n, k.shape[1], prefix, k.shape[3])
                cache = KVCache([k.new_zeros(shape) for _ in self.blocks], [v.new_zeros(shape) for _ in self.blocks],
                                [sum(chunks[:j]) for j in range(self.streams)])
            cache.keys[i][:, :, start:start + k.shape[2]] = k
            cache.values[i][:, :, start:start + v.shape[2]] = v
        return cache if encode else tokens

    def encode_template(self, z: torch.Tensor, z_feat_mask: torch.Tensor) -> KVCache:
        """A new cache holding the registers' and the template's keys and values (dtype: the compute
        dtype, so autocast decides)."""
        return self._run(self._template_tokens(z, z_feat_mask), 0, None)

    def encode_reference(self, x: torch.Tensor, cache: KVCache, index: int = 0) -> None:
        """Write search region ``index`` (an earlier one: phase 2's reference frame) into ``cache``,
        replacing what it held there."""
        if index >= len(self.search_sizes) - 1:
            raise ValueError(f"only the earlier search regions (0..{len(self.search_sizes) - 2}) are cached, "
                             f"got {index}")
        self._run(self._search_tokens(x, index), index + 1, cache)

    def track(self, x: torch.Tensor, cache: KVCache) -> dict[str, torch.Tensor]:
        """The last search region's outputs (as :meth:`forward`) after the cached chunks."""
        index = len(self.search_sizes) - 1
        return self._head(self._run(self._search_tokens(x, index), index + 1, cache))
