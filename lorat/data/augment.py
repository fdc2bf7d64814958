"""The official code's training augmentation, on (3, H, W) float32 images in [0, 1]
(``trackit/data/methods/siamese_tracker_train/transform/default/augmentation/``).

1. horizontal flip (p 0.5), independently for template and search;
2. colour jitter, independently: a random order of brightness / contrast / saturation / hue (hue
   disabled), factors U(1 - j, 1 + j), torchvision blend semantics, clamped to [0, 1];
3. DeiT-III augmentation, the *same* choice for both images and always applied: one of grayscale,
   solarize (threshold 128) or Gaussian blur (radius U(0.1, 2.0)), done in PIL on 8-bit images
   obtained by truncation (``x * 255`` then ``uint8``), so every training image is quantised.

All randomness comes from the numpy ``Generator`` passed in, so a sample is a pure function of
its seed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

__all__ = ["hflip", "color_jitter", "deit3", "GRAY_WEIGHTS"]

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale


def hflip(image: torch.Tensor, box: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Mirror a (3, H, W) image and its xyxy box (x1' = W - x2, x2' = W - x1)."""
    w = image.shape[-1]
    return image.flip(-1), np.array([w - box[2], box[1], w - box[0], box[3]])


def _gray(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


def _blend(image: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    return (factor * image + (1 - factor) * other).clamp(0, 1)


def color_jitter(image: torch.Tensor, rng: np.random.Generator, strength: float = 0.4) -> torch.Tensor:
    """Brightness, contrast and saturation jitter in a random order (hue is a disabled slot)."""
    order = rng.permutation(4)
    factors = rng.uniform(1 - strength, 1 + strength, 3)
    for op in order:
        if op == 0:
            image = _blend(image, 0.0, factors[0])
        elif op == 1:
            image = _blend(image, float(_gray(image).mean()), factors[1])
        elif op == 2:
            image = _blend(image, _gray(image)[None].expand_as(image), factors[2])
    return image


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image * 255).to(torch.uint8).permute(1, 2, 0).numpy())  # truncation, like torchvision


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def deit3(images: list[torch.Tensor], rng: np.random.Generator) -> list[torch.Tensor]:
    """One DeiT-III operation, chosen once and applied to every image."""
    choice = int(rng.integers(3))
    radius = float(rng.uniform(0.1, 2.0))
    out = []
    for image in images:
        pil = _to_pil(image)
        if choice == 0:
            pil = pil.convert("L")
        elif choice == 1:
            pil = ImageOps.solarize(pil, 128)
        else:
            pil = pil.filter(ImageFilter.GaussianBlur(radius))
        out.append(_from_pil(pil))
    return out
