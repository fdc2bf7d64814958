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

import torch
from torch import nn

from lorat.config import LoraConfig

__all__ = [
    "SplitQKV",
    "add_lora",
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


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Split every block's qkv, inject peft LoRA layers, re-initialise them officially, freeze.

    Works in place on a :class:`lorat.model.vit.LoRAT` (also on the meta device) and returns it.
    Adapter parameters are named ``blocks.N.<target>.lora_{A,B}.default.weight``; the base
    linear becomes ``blocks.N.<target>.base_layer``.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    if has_lora(model):
        raise ValueError("model already has LoRA adapters")
    for block in model.blocks:
        block.attn.qkv = SplitQKV(block.attn.qkv)
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
        target_modules=LORA_TARGETS, bias="none",
    )
    inject_adapter_in_model(peft_cfg, model)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for layer in (*module.lora_A.values(), *module.lora_B.values()):
                nn.init.trunc_normal_(layer.weight, std=0.02)
    mark_trainable(model)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (peft merge), drop the adapters, fuse qkv.

    Afterwards the model is a plain LoRAT whose ``state_dict()`` has the official merged
    inference layout. In place; returns the model.
    """
    lora_layer = _lora_layer_type()
    for parent in list(model.modules()) if lora_layer is not None else []:
        for name, child in list(parent.named_children()):
            if isinstance(child, lora_layer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
    for block in model.blocks:
        if isinstance(block.attn.qkv, SplitQKV):
            block.attn.qkv = block.attn.qkv.fused()
    for param in model.parameters():
        param.requires_grad_(False)
    return model

