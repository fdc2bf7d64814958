"""The network of the paper (Lin et al., ECCV 2024, Fig. 2): a DINOv2 ViT over one shared token grid.

* :mod:`lorat.model.vit` -- :class:`~lorat.model.vit.LoRAT`: template and search tokens with the
  decoupled position embeddings (one spatial grid plus token-type embeddings), the timm blocks.
* :mod:`lorat.model.stem` -- the token stems: DINOv2's patch projection, or a MobileNetV2 stem for
  small CPU models.
* :mod:`lorat.model.head` -- the anchor-free MLP head (score map and boxes).
* :mod:`lorat.model.lora` -- LoRA adapters through peft: added for training, merged for inference.
* :mod:`lorat.model.v2` -- :class:`~lorat.model.v2.LoRATv2` (Lin et al., NeurIPS 2025): chunk-causal
  streams (template, reference, search) with a key-value cache.

Nothing here reads files; :mod:`lorat.checkpoint` builds models from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from lorat.config import LoraConfig, ModelConfig

__all__ = ["build_network", "training_streams"]


def training_streams(cfg: ModelConfig) -> list[bool]:
    """LoRATv2: which streams train (the official recipe): phase 1 all (template and search), phase 2
    only the last (the new search stream; template and reference come merged from phase 1)."""
    return [False, False, True] if cfg.reference_size is not None else [True, True]


def build_network(cfg: ModelConfig, lora: LoraConfig | None = None) -> nn.Module:
    """The network ``cfg`` describes, on the current default device: merged (every LoRATv2 stream
    owning its weights), or with ``lora`` the official training build's adapters (peft)."""
    if cfg.family == "loratv2":
        from lorat.model.lora import add_stream_lora
        from lorat.model.v2 import LoRATv2

        if lora is None:
            return LoRATv2(cfg, owned=[True] * (1 + len(cfg.search_sizes)))
        trainable = training_streams(cfg)
        return add_stream_lora(LoRATv2(cfg, owned=[not on for on in trainable]), lora, trainable)
    from lorat.model.lora import add_lora
    from lorat.model.vit import LoRAT

    return LoRAT(cfg) if lora is None else add_lora(LoRAT(cfg), lora)
