"""LoRA adapters through peft, with the official LoRAT layout and initialisation.

Decisions (the paper, Sec. 3.3; the official ``trackit/models/methods/LoRAT/modules/lora/``):

* **Split qkv.** timm's fused ``attn.qkv`` Linear(C, 3C) is replaced by :class:`SplitQKV`,
  three Linear(C, C) layers ``q``, ``k``, ``v`` whose outputs are concatenated, so each gets its
  own rank-r adapter exactly as in the official code and official q/k/v adapters load 1:1.
  (LoRA on the fused layer would be a different parameterisation.) :func:`merge_lora` fuses
  them back into one Linear after merging, so inference runs one qkv matmul.
* **Targets.** q, k, v, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` of every block (ViT-g's SwiGLU
  ``w12``/``w3`` are timm's ``fc1``/``fc2``). Nothing outside ``blocks``.
* **Initialisation.** peft initialises B to zero; the official code draws *both* A and B from
  trunc-normal(std 0.02), so the adapted model differs from the backbone at step 0.
  :func:`add_lora` re-initialises after injection.
* **Trainable split.** LoRA A/B, ``token_type_embed`` and the head train; everything else
  (patch embedding, position grid, block weights, final norm) is frozen.
* **Merge.** peft's merge, W' = W + (B @ A) * s with s = alpha / r, the official formula.

This is the one module that imports peft, and only when adapters are created or merged:
``import lorat`` (and inference on merged weights) does not load peft and transformers.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from lorat.config import LoraConfig

__all__ = [
    "SplitQKV",
    "add_lora",
    "add_stream_lora",
    "merge_lora",
    "has_lora",
    "mark_trainable",
    "LORA_TARGETS",
]

# Regex (full match on module names) for peft's target_modules.
LORA_TARGETS = r"blocks\.\d+\.(attn\.qkv\.[qkv]|attn\.proj|mlp\.fc1|mlp\.fc2)"


class SplitQKV(nn.Module):
    """Fused qkv Linear(C, 3C) as three Linear(C, C); output = cat(q(x), k(x), v(x))."""

    def __init__(self, fused: nn.Linear):
        super().__init__()
        c = fused.out_features // 3
        dd = {"device": fused.weight.device, "dtype": fused.weight.dtype}
        for i, name in enumerate("qkv"):
            layer = nn.Linear(fused.in_features, c, bias=fused.bias is not None, **dd)
            layer.weight.requires_grad_(fused.weight.requires_grad)
            if fused.weight.device.type != "meta":
                with torch.no_grad():
                    layer.weight.copy_(fused.weight[i * c:(i + 1) * c])
                    if fused.bias is not None:
                        layer.bias.copy_(fused.bias[i * c:(i + 1) * c])
            setattr(self, name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def fused(self) -> nn.Linear:
        """One Linear(C, 3C) with rows [q; k; v] (call after merging the adapters)."""
        q, k, v = self.q, self.k, self.v
        dd = {"device": q.weight.device, "dtype": q.weight.dtype}
        out = nn.Linear(q.in_features, 3 * q.out_features, bias=q.bias is not None, **dd)
        with torch.no_grad():
            out.weight.copy_(torch.cat([q.weight, k.weight, v.weight], dim=0))
            if q.bias is not None:
                out.bias.copy_(torch.cat([q.bias, k.bias, v.bias], dim=0))
        return out


def _lora_layer_type() -> type | None:
    """peft's LoraLayer class, or None while peft is not imported (then no adapter can exist)."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def has_lora(model: nn.Module) -> bool:
    """True if the model currently carries (unmerged) LoRA adapters."""
    layer = _lora_layer_type()
    return layer is not None and any(isinstance(m, layer) for m in model.modules())


def mark_trainable(model: nn.Module) -> None:
    """Official split: LoRA A/B, ``token_type_embed`` and ``head.*`` train; the rest is frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_(
            ".lora_A." in name or ".lora_B." in name or name == "token_type_embed"
            or name.startswith("head.")
        )


def _inject(model: nn.Module, cfg: LoraConfig, targets: str) -> None:
    """peft LoRA layers on the modules whose names fully match ``targets``, initialised officially."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
        target_modules=targets, bias="none",
    )
    inject_adapter_in_model(peft_cfg, model)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for layer in (*module.lora_A.values(), *module.lora_B.values()):
                nn.init.trunc_normal_(layer.weight, std=0.02)


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Split every block's qkv, inject peft LoRA layers, re-initialise them officially, freeze.

    Works in place on a :class:`lorat.model.vit.LoRAT` (also on the meta device) and returns it.
    Adapter parameters are named ``blocks.N.<target>.lora_{A,B}.default.weight``; the base
    linear becomes ``blocks.N.<target>.base_layer``.
    """
    if has_lora(model):
        raise ValueError("model already has LoRA adapters")
    for block in model.blocks:
        block.attn.qkv = SplitQKV(block.attn.qkv)
    _inject(model, cfg, LORA_TARGETS)
    mark_trainable(model)
    return model


def add_stream_lora(model: nn.Module, cfg: LoraConfig, trainable: Sequence[bool]) -> nn.Module:
    """LoRATv2: LoRA on the linear copies of the streams that train, everything else frozen.

    One adapter per stream and layer (q, k, v, proj, fc1, fc2 of every block), as the official
    static-routed experts; peft serves them because each stream has its own module copy, so no
    routing by token position is needed. The streams that train keep sharing their frozen proj,
    fc1 and fc2 tensors; each splits its own copy of qkv, as the official layers do. Besides the
    adapters, the template token-type embedding trains with stream 0, and a search stream's
    token-type row and head with that stream; the final norms, registers and position grid stay
    frozen (the official split). In place on a :class:`lorat.model.v2.LoRATv2`; returns it.
    """
    if has_lora(model):
        raise ValueError("model already has LoRA adapters")
    streams = [i for i, on in enumerate(trainable) if on]
    if len(trainable) != model.streams or not streams:
        raise ValueError(f"trainable needs {model.streams} flags with at least one set, got {list(trainable)}")
    for block in model.blocks:
        for s in streams:
            block.attn.qkv[s] = SplitQKV(block.attn.qkv[s])
    alt = "|".join(map(str, streams))
    _inject(model, cfg, rf"blocks\.\d+\.(attn\.qkv\.({alt})\.[qkv]|(attn\.proj|mlp\.fc1|mlp\.fc2)\.({alt}))")
    heads = {f"heads.{s - 1}." for s in streams if s}
    rows = {f"search_region_token_type_embed.{s - 1}" for s in streams if s}
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(
            ".lora_A." in name or ".lora_B." in name or name in rows or any(name.startswith(h) for h in heads)
            or (name == "template_token_type_embed" and trainable[0]))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (peft merge), drop the adapters, fuse qkv.

    Afterwards the model is a plain LoRAT (or LoRATv2, every stream owning its weights) whose
    ``state_dict()`` has the official merged inference layout. In place; returns the model.
    """
    lora_layer = _lora_layer_type()
    for parent in list(model.modules()) if lora_layer is not None else []:
        for name, child in list(parent.named_children()):
            if isinstance(child, lora_layer):
                base = child.get_base_layer()
                base.weight = nn.Parameter(base.weight.detach().clone())  # tied streams part here
                child.merge()
                setattr(parent, name, base)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SplitQKV):
                setattr(parent, name, child.fused())
    for param in model.parameters():
        param.requires_grad_(False)
    return model
