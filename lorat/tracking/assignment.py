"""Keeping several targets apart: score-map peaks assigned to targets with ``lap``.

Each target is tracked independently (its own template and search crop, as in the official tracker),
so two targets that look alike can both lock onto the same object. With assignment on, every
target proposes its top-k score-map peaks (3x3 local maxima of the window-penalised score);
peaks whose frame boxes overlap (IoU above a threshold) are one object; a linear assignment
(``lap.lapjv``) then gives each target a different object, maximising the total penalised score.
A target that gets nothing keeps its own best peak. When no two targets compete for an object
the result is exactly each target's own argmax, i.e. the official single-target output.
"""

from __future__ import annotations

import lap
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["score_peaks", "assign_peaks"]

_FORBIDDEN = 1e6  # cost of a target taking an object it did not propose
_UNASSIGNED = 1e3  # cost limit: leaving a target unassigned costs half of it


def score_peaks(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k 3x3 local maxima of score maps.

    Args:
        score: (N, H, W) penalised scores.
        k: peaks per map (fewer real peaks are padded with -inf scores).

    Returns:
        (values (N, k), flat indices (N, k)), best first; index 0 is the global argmax.
    """
    pooled = F.max_pool2d(score[:, None], 3, stride=1, padding=1)[:, 0]
    peaks = torch.where(score >= pooled, score, torch.full_like(score, float("-inf")))
    flat = peaks.flatten(1)
    k = min(k, flat.shape[1])
    values, index = flat.topk(k, dim=1)
    # The global argmax (first occurrence) is always a peak; keep it first as the official rule does.
    best = score.flatten(1).argmax(dim=1)
    values[:, 0] = score.flatten(1).gather(1, best[:, None])[:, 0]
    index[:, 0] = best
    return values, index


def assign_peaks(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5) -> np.ndarray:
    """Choose one peak per target so that no two targets take overlapping boxes.

    Args:
        boxes: (N, k, 4) xyxy frame boxes of each target's peaks.
        scores: (N, k) their penalised scores (-inf = no peak).
        iou_threshold: peaks with IoU above this are the same object.

    Returns:
        (N,) int array: the chosen peak of each target (0 = its own best).
    """
    n, k = scores.shape
    boxes = boxes.detach().double().cpu().reshape(n * k, 4)
    flat_scores = scores.detach().double().cpu().reshape(n * k).numpy()
    valid = np.isfinite(flat_scores)
    # Group peaks into objects: connected components of the overlap graph.
    # (torchvision's IoU is NaN for two empty boxes; NaN > threshold is False, as an IoU of 0 would be)
    from torchvision.ops import box_iou  # on first use: it imports torch._dynamo (about 1 s)

    overlap = (box_iou(boxes, boxes) > iou_threshold).numpy() & valid[:, None] & valid[None, :]
    group = -np.ones(n * k, dtype=np.int64)
    groups = 0
    for start in np.flatnonzero(valid):
        if group[start] >= 0:
            continue
        stack = [start]
        group[start] = groups
        while stack:
            j = stack.pop()
            for other in np.flatnonzero(overlap[j] & (group < 0)):
                group[other] = groups
                stack.append(other)
        groups += 1
    cost = np.full((n, max(groups, 1)), _FORBIDDEN)
    best_peak = np.zeros((n, max(groups, 1)), dtype=np.int64)
    for idx in np.flatnonzero(valid):
        target, peak = divmod(int(idx), k)
        g = group[idx]
        if -flat_scores[idx] < cost[target, g]:
            cost[target, g] = -flat_scores[idx]
            best_peak[target, g] = peak
    # cost_limit lets a target stay unassigned (at half the limit) rather than take a forbidden object.
    allowed = cost < _FORBIDDEN
    _, row_to_col, _ = lap.lapjv(cost, extend_cost=True, cost_limit=_UNASSIGNED)
    choice = np.zeros(n, dtype=np.int64)
    for target, col in enumerate(row_to_col):
        if 0 <= col < allowed.shape[1] and allowed[target, col]:
            choice[target] = best_peak[target, col]
    return choice
