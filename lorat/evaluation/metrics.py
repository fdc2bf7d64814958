"""One-pass-evaluation metrics, pytracking / OSTrack "compatible" convention.

The convention of pytracking's ``pytracking/analysis/extract_results.py``, which the official code's
``trackit/data/components/result_collector/handler/one_pass_evaluation_compatible/ope_metrics.py``
follows.

Per sequence, predictions and ground truth are xywh in pixels:

* a frame is *valid* when the ground truth has w > 0 and h > 0 (NaN is invalid); for LaSOT,
  LaSOT_Extension and VastTrack it must also be flagged present;
* IoU uses the pixel-inclusive formula, which equals the continuous IoU; centres are
  x + (w - 1) / 2 (the -1/2 cancels in differences); the normalised centre error divides both
  centres by the ground-truth (w, h) per axis;
* invalid frames get IoU -1, normalised error -1 and centre error +inf; then, for LaSOT and
  VastTrack only (**not** LaSOT_Extension), absent frames get +inf errors. Quirk kept from
  pytracking: every other invalid frame (LaSOT_Extension or GOT-10k absent frames) has normalised
  error -1 and so counts as a hit for normalised precision at every threshold;
* curves divide by **all** frames of the sequence: success(t) = share of IoU > t for
  t in {0, 0.05, ..., 1} (21 values, t = 1 never met, so the AUC is at most 20/21); precision(d)
  = share of centre error <= d px, d = 0..50; normalised precision(d') = share <= d',
  d' = 0, 0.01, ..., 0.5;
* a dataset's curves are the mean of the per-sequence curves (float32); success AUC = mean of the
  21 success values, P = precision at 20 px, P_norm = normalised precision at 0.20.

Frame 0 is scored like any other frame; runners write the init box there (``lorat.evaluate``
also overwrites frame 0 of foreign result files with the ground truth, as pytracking does; for a
sequence whose target is absent at first it starts, and overwrites, on the first present frame).
Zero-size predictions are not replaced: their IoU is 0, their centre x + (0 - 1) / 2 is still
scored for precision. NaN predictions (a lost target) are misses on every curve (``lorat.evaluate``
warns about those on frames with a visible target). Predictions with a negative width or height
or an infinite value have no meaning and are refused (``ValueError`` naming the frame;
:func:`lorat.evaluation.results.read_sequence` already names the file and line). Predictions on invalid
frames (absent target) are never looked at, so any placeholder is fine there.

GOT-10k metrics (:func:`got10k_metrics`, the GOT-10k toolkit convention): continuous IoU, first
frame and absent frames excluded, IoUs of all sequences pooled; AO = mean IoU, SR0.5 / SR0.75 =
share of IoU strictly above 0.5 / 0.75.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SequenceCurves", "sequence_curves", "check_predictions", "got10k_metrics", "summarize_curves",
           "SUCCESS_THRESHOLDS", "PRECISION_THRESHOLDS", "NORM_PRECISION_THRESHOLDS", "ABSENT_AS_MISS", "P20",
           "P_NORM_02", "SR_05", "SR_075"]

SUCCESS_THRESHOLDS = np.linspace(0, 1, 21)
PRECISION_THRESHOLDS = np.arange(0, 51, dtype=np.float64)
NORM_PRECISION_THRESHOLDS = np.linspace(0, 0.5, 51)
# Indices of the reported points on those curves.
P20 = 20        # PRECISION_THRESHOLDS[20] = 20 px
P_NORM_02 = 20  # NORM_PRECISION_THRESHOLDS[20] = 0.2
SR_05 = 10      # SUCCESS_THRESHOLDS[10] = 0.5 IoU
SR_075 = 15     # SUCCESS_THRESHOLDS[15] = 0.75 IoU
ABSENT_AS_MISS = {"lasot", "vasttrack"}  # datasets whose absent frames count as misses everywhere
PRESENCE_VALIDITY = {"lasot", "lasot_ext", "vasttrack"}  # datasets where presence decides validity


@dataclass
class SequenceCurves:
    """Per-sequence curves (float32): success (21,), precision (51,), norm_precision (51,)."""

    success: np.ndarray
    precision: np.ndarray
    norm_precision: np.ndarray


def check_predictions(pred_xywh: np.ndarray) -> None:
    """Refuse predictions with a negative width or height or an infinite value (NaN is allowed).

    Raises:
        ValueError: names the first such frame (1-based).
    """
    pred = np.asarray(pred_xywh, dtype=np.float64)
    bad = np.flatnonzero(np.isinf(pred).any(axis=1) | (pred[:, 2:] < 0).any(axis=1))
    if len(bad):
        raise ValueError(f"frame {bad[0] + 1}: prediction {pred[bad[0]].tolist()} has a negative size "
                         f"or an infinite value ({len(bad)} such frames)")


def sequence_curves(pred_xywh: np.ndarray, gt_xywh: np.ndarray, present: np.ndarray | None = None,
                    dataset: str = "") -> SequenceCurves:
    """Curves of one sequence.

    Args:
        pred_xywh: (T, 4) predicted boxes.
        gt_xywh: (T, 4) ground truth (NaN rows allowed).
        present: (T,) bool target-present flags (None: all present).
        dataset: name deciding the validity/absent conventions (``lasot``, ``lasot_ext``, ...).
    """
    pred = np.asarray(pred_xywh, dtype=np.float64)
    gt = np.asarray(gt_xywh, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has {len(pred)} boxes, ground truth {len(gt)}")
    check_predictions(pred)
    present = np.ones(len(gt), dtype=bool) if present is None else np.asarray(present, dtype=bool)
    with np.errstate(invalid="ignore"):
        valid = (gt[:, 2] > 0) & (gt[:, 3] > 0)
    if dataset in PRESENCE_VALIDITY:
        valid &= present
    # IoU, pixel-inclusive form (reduces to the continuous IoU).
    x1 = np.maximum(pred[:, 0], gt[:, 0])
    y1 = np.maximum(pred[:, 1], gt[:, 1])
    x2 = np.minimum(pred[:, 0] + pred[:, 2] - 1, gt[:, 0] + gt[:, 2] - 1)
    y2 = np.minimum(pred[:, 1] + pred[:, 3] - 1, gt[:, 1] + gt[:, 3] - 1)
    inter = np.clip(x2 - x1 + 1, 0, None) * np.clip(y2 - y1 + 1, 0, None)
    union = pred[:, 2] * pred[:, 3] + gt[:, 2] * gt[:, 3] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
        pc = pred[:, :2] + (pred[:, 2:] - 1) / 2
        gc = gt[:, :2] + (gt[:, 2:] - 1) / 2
        err = np.sqrt(((pc - gc) ** 2).sum(axis=1))
        norm_err = np.sqrt((((pc - gc) / gt[:, 2:]) ** 2).sum(axis=1))
    iou = np.where(valid, np.nan_to_num(iou, nan=0.0), -1.0)
    err = np.where(valid, np.nan_to_num(err, nan=np.inf), np.inf)
    norm_err = np.where(valid, np.nan_to_num(norm_err, nan=np.inf), -1.0)
    if dataset in ABSENT_AS_MISS:
        err = np.where(present, err, np.inf)
        norm_err = np.where(present, norm_err, np.inf)
    n = len(gt)
    return SequenceCurves(
        success=((iou[None] > SUCCESS_THRESHOLDS[:, None]).sum(1) / n).astype(np.float32),
        precision=((err[None] <= PRECISION_THRESHOLDS[:, None]).sum(1) / n).astype(np.float32),
        norm_precision=((norm_err[None] <= NORM_PRECISION_THRESHOLDS[:, None]).sum(1) / n).astype(np.float32),
    )


def summarize_curves(curves: Sequence[SequenceCurves]) -> dict[str, float]:
    """Dataset summary: ``success_auc``, ``precision`` (@20 px), ``norm_precision`` (@0.20), SR0.5/0.75."""
    if not curves:
        raise ValueError("no sequences to summarize")
    success = np.mean([c.success for c in curves], axis=0)
    precision = np.mean([c.precision for c in curves], axis=0)
    norm = np.mean([c.norm_precision for c in curves], axis=0)
    return {
        "success_auc": float(success.mean()),
        "precision": float(precision[P20]),
        "norm_precision": float(norm[P_NORM_02]),
        "success_rate_0.5": float(success[SR_05]),
        "success_rate_0.75": float(success[SR_075]),
        "sequences": len(curves),
    }


def got10k_metrics(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                   presents: Sequence[np.ndarray | None]) -> dict[str, float]:
    """GOT-10k toolkit metrics: IoUs of all sequences pooled, first frame and absent frames excluded.

    AO = mean IoU; SR0.5 / SR0.75 = share of IoU > 0.5 / 0.75 (continuous xywh IoU).
    """
    pooled = []
    for pred, gt, present in zip(preds, gts, presents, strict=True):
        check_predictions(pred)
        pred, gt = np.asarray(pred, dtype=np.float64)[1:], np.asarray(gt, dtype=np.float64)[1:]
        keep = np.ones(len(gt), dtype=bool) if present is None else np.asarray(present, dtype=bool)[1:]
        keep &= np.isfinite(gt).all(axis=1) & (gt[:, 2] > 0) & (gt[:, 3] > 0)
        p, g = pred[keep], gt[keep]
        w = np.clip(np.minimum(p[:, 0] + p[:, 2], g[:, 0] + g[:, 2]) - np.maximum(p[:, 0], g[:, 0]), 0, None)
        h = np.clip(np.minimum(p[:, 1] + p[:, 3], g[:, 1] + g[:, 3]) - np.maximum(p[:, 1], g[:, 1]), 0, None)
        inter = w * h
        union = np.clip(p[:, 2], 0, None) * np.clip(p[:, 3], 0, None) + g[:, 2] * g[:, 3] - inter
        pooled.append(np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0))
    ious = np.concatenate(pooled) if pooled else np.zeros(0)
    if not len(ious):
        raise ValueError("no valid frames to score")
    return {"ao": float(ious.mean()), "sr_0.5": float((ious > 0.5).mean()), "sr_0.75": float((ious > 0.75).mean())}
