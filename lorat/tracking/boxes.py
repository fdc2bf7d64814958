"""Box formats and small box operations, in torch (any device) and numpy.

Formats: ``xywh`` is (x, y, w, h) with (x, y) the top-left corner — what users, OpenCV,
LaSOT files and pytracking use; ``xyxy`` is (x1, y1, x2, y2) in a *continuous* pixel frame
(pixel k covers [k, k + 1); an image covers [0, W] x [0, H]) — what the code uses inside.
All functions work on the last axis, so any leading batch shape is fine.
"""

from __future__ import annotations

import torch

from lorat.files import RASTER_EPS

__all__ = ["xywh_to_xyxy", "xyxy_to_xywh", "clip_xyxy", "is_valid_xyxy", "rasterize"]


def xywh_to_xyxy(box: torch.Tensor) -> torch.Tensor:
    """(..., 4) xywh -> (..., 4) xyxy, i.e. (x, y, x + w, y + h).

    The arithmetic of ``torchvision.ops.box_convert``, written out: importing ``torchvision.ops``
    imports ``torch._dynamo`` (about 1 s), which a tracking run otherwise never needs."""
    x, y, w, h = box.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def xyxy_to_xywh(box: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (..., 4) xywh, i.e. (x1, y1, x2 - x1, y2 - y1) (see :func:`xywh_to_xyxy`)."""
    x1, y1, x2, y2 = box.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


def clip_xyxy(box: torch.Tensor, width: torch.Tensor | float, height: torch.Tensor | float) -> torch.Tensor:
    """Clip xyxy boxes to [0, width] x [0, height]; ``width``/``height`` broadcast per box.

    (``torchvision.ops.clip_boxes_to_image`` takes one integer size for all boxes; a batch of
    sequences has one frame size per box.)
    """
    w = torch.as_tensor(width, dtype=box.dtype, device=box.device)
    h = torch.as_tensor(height, dtype=box.dtype, device=box.device)
    x1 = torch.minimum(box[..., 0].clamp(min=0), w)
    y1 = torch.minimum(box[..., 1].clamp(min=0), h)
    x2 = torch.minimum(box[..., 2].clamp(min=0), w)
    y2 = torch.minimum(box[..., 3].clamp(min=0), h)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def is_valid_xyxy(box: torch.Tensor) -> torch.Tensor:
    """(..., 4) -> (...) bool: finite with x1 < x2 and y1 < y2."""
    return torch.isfinite(box).all(dim=-1) & (box[..., 0] < box[..., 2]) & (box[..., 1] < box[..., 3])


def rasterize(box: torch.Tensor) -> torch.Tensor:
    """Continuous xyxy -> integer pixel rectangle, end-exclusive (official rule).

    x1, y1 are floored; x2, y2 become floor(v + 1 - 1e-4), so a pixel is included when the box
    covers more than ~1e-4 of it. Returns int64.
    """
    lo = torch.floor(box[..., :2])
    hi = torch.floor(box[..., 2:] + 1 - RASTER_EPS)
    return torch.cat([lo, hi], dim=-1).to(torch.int64)
