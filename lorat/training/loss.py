"""The LoRAT training loss (Lin et al., ECCV 2024, "Tracking Meets LoRA"; the official code's
``trackit/criteria/methods/box_with_score_map/__init__.py``, github.com/LitingLin/LoRAT).

* classification: ``BCEWithLogits`` over **all** response cells against an IoU-aware soft target
  (0 everywhere, IoU(GT, predicted box) at positive cells, no gradient through the target),
  summed and divided by the number of positive cells;
* regression: ``1 - GIoU(predicted box, GT)`` summed over positive cells, divided likewise;
* total = cls + reg. In DDP the positive count is the mean over processes, so that the averaged
  gradients equal those of one process holding the whole batch.

Boxes are normalised x1y1x2y2 in float32; IoU and GIoU use eps 1e-6 on unions and enclosing areas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["iou_and_giou", "lorat_loss"]


def iou_and_giou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise IoU and GIoU of (N, 4) xyxy boxes.

    Not ``torchvision.ops.generalized_box_iou_loss``: that adds eps 1e-7 to the denominators, the
    official code clamps them at 1e-6, and the IoU is needed too (the classification target).
    """
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    union = (area_a + area_b - inter).clamp(min=eps)
    iou = inter / union
    enclose = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0).prod(dim=1)
    enclose = enclose.clamp(min=eps)
    return iou, iou - (enclose - union) / enclose


def lorat_loss(outputs: dict[str, torch.Tensor], target_box: torch.Tensor, positive: torch.Tensor,
               num_positive: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
    """Loss of a batch.

    Args:
        outputs: model outputs, ``score_map`` (B, H, W) logits and ``boxes`` (B, H, W, 4).
        target_box: (B, 4) normalised xyxy ground truth in the search crop.
        positive: (B, H, W) bool positive cells.
        num_positive: normaliser (default: this batch's positive count); clamped to >= 1.

    Returns:
        ``loss`` (scalar to backpropagate), ``cls`` and ``reg`` (detached parts).
    """
    logits = outputs["score_map"].float().flatten(1)
    boxes = outputs["boxes"].float().flatten(1, 2)
    pos = positive.flatten(1)
    if num_positive is None:
        num_positive = pos.sum()
    norm = torch.as_tensor(num_positive, dtype=torch.float32, device=logits.device).clamp(min=1)
    batch_idx, cell_idx = pos.nonzero(as_tuple=True)
    pred = boxes[batch_idx, cell_idx]
    gt = target_box.float()[batch_idx]
    iou, giou = iou_and_giou(pred, gt)
    target = torch.zeros_like(logits)
    target[batch_idx, cell_idx] = iou.detach()
    cls = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / norm
    reg = (1 - giou).sum() / norm if len(pred) else boxes.mean() * 0
    return {"loss": cls + reg, "cls": cls.detach(), "reg": reg.detach()}
