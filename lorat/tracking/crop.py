"""Pixel-aligned SiamFC crops on any device (the official ``trackit/core/utils/siamfc_cropping.py``).

A crop is a per-axis scale ``s`` and translation ``t`` mapping frame coordinates ``p`` to crop
coordinates ``u = s * p + t``. The official crop is *pixel aligned*: the frame rectangle is
mapped into the crop and rasterised, mapped back and rasterised again, and the integer source
rectangle is resized (bilinear, ``align_corners=False``, no antialias) into the integer output
rectangle; everything else is filled with a background colour. The parameters actually
realised, ``s' = out_size / in_size`` and ``t' = out_x1 - in_x1 * s'``, are returned and must be
used for every later box mapping.

Everything is batched torch on the device of the inputs: geometry in float64 (float32 on MPS),
sampling reproduces ``F.interpolate(mode="bilinear")`` index by index, and no value is copied to
the host, so a GPU pipeline never synchronises here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorat.tracking.boxes import rasterize
from lorat.tracking.constants import const

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "geometry_dtype",
    "nominal_crop_params",
    "crop_frames",
    "box_to_crop",
    "box_from_crop",
    "normalize_crops",
    "template_mask",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def geometry_dtype(device: torch.device) -> torch.dtype:
    """float64 for crop geometry, except where the device has none (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def nominal_crop_params(
    box: torch.Tensor, area_factor: float, out_size: tuple[int, int], min_size: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiamFC crop parameters centred on a box.

    The box is first enlarged about its centre to at least ``min_size`` px per side. The context
    region is (w + (f-1)(w+h)/2, h + (f-1)(w+h)/2); its area is scaled to the output area.

    Args:
        box: (N, 4) xyxy frame boxes (float64 recommended).
        area_factor: context factor f (2 for templates, 4 or 5 for search regions).
        out_size: crop (W, H) in px.
        min_size: minimum box side before computing the context.

    Returns:
        scale (N, 2), translation (N, 2), same dtype as ``box``; ``u = scale * p + translation``.
    """
    centre = (box[:, :2] + box[:, 2:]) / 2
    wh = (box[:, 2:] - box[:, :2]).clamp(min=min_size)
    pad = (area_factor - 1) * wh.sum(dim=1, keepdim=True) / 2
    context = wh + pad
    out = const(out_size, box.dtype, box.device)
    scale = torch.sqrt(out.prod() / context.prod(dim=1, keepdim=True)).expand(-1, 2)
    translation = out / 2 - centre * scale
    return scale.contiguous(), translation


def box_to_crop(box: torch.Tensor, scale: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """(N, 4) xyxy frame boxes -> crop coordinates with (N, 2) scale and translation."""
    return box * scale.repeat(1, 2) + translation.repeat(1, 2)


def box_from_crop(box: torch.Tensor, scale: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`box_to_crop`: crop coordinates -> frame coordinates."""
    return (box - translation.repeat(1, 2)) / scale.repeat(1, 2)


def _axis_indices(out_lo: torch.Tensor, in_lo: torch.Tensor, out_len: torch.Tensor, in_len: torch.Tensor,
                  size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear source indices/weights along one axis, as ``F.interpolate`` computes them.

    Returns (i0, i1, w1, inside), each (N, size): frame indices of the two neighbours, the
    weight of the second, and whether the output position lies in the output rectangle.
    """
    pos = torch.arange(size, device=out_lo.device)
    local = pos[None, :] - out_lo[:, None]
    inside = (local >= 0) & (local < out_len[:, None])
    ratio = (in_len.float() / out_len.clamp(min=1).float())[:, None]  # float32 like PyTorch's kernel
    src = (ratio * (local.float() + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().to(torch.int64)
    w1 = (src - i0.float()).clamp(0, 1)
    i1 = i0 + (i0 < in_len[:, None] - 1).to(torch.int64)
    return i0 + in_lo[:, None], i1 + in_lo[:, None], w1, inside


def _gather(frame: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Pixels of a (3, H, W) frame at (Oh, Ow) flat indices -> (3, Oh, Ow) float32.

    Uses ``index_select`` on whichever memory layout the frame has (HWC views of decoded
    frames are common), which is much faster than 2-D advanced indexing.
    """
    h, w = frame.shape[-2:]
    oh, ow = flat_index.shape
    hwc = frame.permute(1, 2, 0)
    if hwc.is_contiguous():
        picked = hwc.reshape(h * w, 3).index_select(0, flat_index.reshape(-1))
        return picked.float().view(oh, ow, 3).permute(2, 0, 1)
    picked = frame.reshape(3, h * w).index_select(1, flat_index.reshape(-1))
    return picked.float().view(3, oh, ow)


def crop_frames(
    frames: Sequence[torch.Tensor],
    scale: torch.Tensor,
    translation: torch.Tensor,
    out_size: tuple[int, int],
    background: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel-aligned crop-and-resize of N frames (frames may differ in size).

    Args:
        frames: N tensors (3, H_i, W_i) with values in [0, 255] (uint8 or float), on one device;
            channel-last views (``hwc.permute(2, 0, 1)``) are fine and are not copied.
        scale, translation: (N, 2) nominal parameters (frame -> crop).
        out_size: crop (W, H).
        background: (N, 3) fill colour in [0, 255].

    Returns:
        crops (N, 3, H, W) float32 in [0, 255], realised scale (N, 2), realised translation (N, 2).
    """
    device = scale.device
    n = len(frames)
    ow, oh = out_size
    sizes = const([[f.shape[-1], f.shape[-2]] for f in frames], scale.dtype, device)
    out_max = const([ow, oh], scale.dtype, device)
    # 1. frame rectangle -> crop, clipped to the crop, rasterised.
    lo = torch.minimum(translation.clamp(min=0), out_max)
    hi = torch.minimum((sizes * scale + translation).clamp(min=0), out_max)
    out_rect = rasterize(torch.cat([lo, hi], dim=1))
    # 2. back to the frame with the inverse, rasterised, clipped to the frame.
    in_rect = rasterize((out_rect.to(scale.dtype) - translation.repeat(1, 2)) / scale.repeat(1, 2))
    int_sizes = sizes.to(torch.int64)
    in_rect = torch.minimum(in_rect.clamp(min=0), int_sizes.repeat(1, 2))
    out_len = out_rect[:, 2:] - out_rect[:, :2]
    in_len = in_rect[:, 2:] - in_rect[:, :2]
    ok = ((out_len > 0) & (in_len > 0)).all(dim=1, keepdim=True)
    # 4. the parameters actually realised.
    real_scale = torch.where(ok, out_len.to(scale.dtype) / in_len.clamp(min=1).to(scale.dtype), scale)
    real_translation = torch.where(ok, out_rect[:, :2].to(scale.dtype) - in_rect[:, :2] * real_scale, translation)
    # 3. bilinear resize of the source rectangle into the output rectangle, background elsewhere.
    x0, x1, wx, in_x = _axis_indices(out_rect[:, 0], in_rect[:, 0], out_len[:, 0], in_len[:, 0], ow)
    y0, y1, wy, in_y = _axis_indices(out_rect[:, 1], in_rect[:, 1], out_len[:, 1], in_len[:, 1], oh)
    inside = in_y[:, :, None] & in_x[:, None, :] & ok[:, :, None]
    crops = []
    for i, frame in enumerate(frames):
        # Gather the four neighbours in the frame's own dtype (uint8 frames stay small), then blend.
        h, w = frame.shape[-2:]
        ya, yb = y0[i].clamp(0, h - 1)[:, None] * w, y1[i].clamp(0, h - 1)[:, None] * w
        xa, xb = x0[i].clamp(0, w - 1)[None, :], x1[i].clamp(0, w - 1)[None, :]
        fy, fx = wy[i][None, :, None], wx[i][None, None, :]
        top = _gather(frame, ya + xa) * (1 - fx) + _gather(frame, ya + xb) * fx
        bottom = _gather(frame, yb + xa) * (1 - fx) + _gather(frame, yb + xb) * fx
        crops.append(top * (1 - fy) + bottom * fy)
    crop = torch.stack(crops) if n else torch.empty(0, 3, oh, ow, device=device)
    crop = torch.where(inside[:, None], crop, background.to(crop.dtype)[:, :, None, None])
    return crop, real_scale, real_translation


def normalize_crops(crops: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 255] -> ImageNet-normalised float32 network input."""
    mean = const(IMAGENET_MEAN, torch.float32, crops.device).view(1, 3, 1, 1)
    std = const(IMAGENET_STD, torch.float32, crops.device).view(1, 3, 1, 1)
    return (crops / 255.0 - mean) / std


def template_mask(box_in_crop: torch.Tensor, template_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Template foreground mask (the paper, Sec. 3.2: the token-type embedding of each template token).

    Args:
        box_in_crop: (N, 4) xyxy target boxes in template-crop pixels.
        template_size: template crop (W, H) px.
        grid: template token grid (Hz, Wz).

    Returns:
        (N, Hz, Wz) int64, 1 on every cell that the box overlaps by more than ~1e-4 of a stride.
    """
    hz, wz = grid
    stride = const([template_size[0] / wz, template_size[1] / hz] * 2, box_in_crop.dtype, box_in_crop.device)
    cells = rasterize(box_in_crop / stride)
    limit = const([wz, hz, wz, hz], torch.int64, cells.device)
    cells = torch.minimum(cells.clamp(min=0), limit)
    rows = torch.arange(hz, device=cells.device)
    cols = torch.arange(wz, device=cells.device)
    in_rows = (rows[None] >= cells[:, 1:2]) & (rows[None] < cells[:, 3:4])
    in_cols = (cols[None] >= cells[:, 0:1]) & (cols[None] < cells[:, 2:3])
    return (in_rows[:, :, None] & in_cols[:, None, :]).to(torch.int64)
