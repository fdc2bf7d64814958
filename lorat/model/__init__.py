"""The network of the paper (Lin et al., ECCV 2024, Fig. 2): a DINOv2 ViT over one shared token grid.

* :mod:`lorat.model.vit` -- :class:`~lorat.model.vit.LoRAT`: template and search tokens with the
  decoupled position embeddings (one spatial grid plus token-type embeddings), the timm blocks.
* :mod:`lorat.model.stem` -- the token stems: DINOv2's patch projection, or a MobileNetV2 stem for
  small CPU models.
* :mod:`lorat.model.head` -- the anchor-free MLP head (score map and boxes).
* :mod:`lorat.model.lora` -- LoRA adapters through peft: added for training, merged for inference.

Nothing here reads files; :mod:`lorat.checkpoint` builds models from them.
"""
