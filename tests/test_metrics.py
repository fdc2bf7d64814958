"""Hand-computed metric cases, including the quirks of pytracking's analysis code (``extract_results.py``)."""

import numpy as np
import pytest

from lorat.evaluation.metrics import got10k_metrics, sequence_curves, summarize_curves

GT = np.array([[10.0, 10, 20, 20]] * 4)


def test_perfect_tracking_reaches_20_of_21():
    s = summarize_curves([sequence_curves(GT, GT)])
    assert s["success_auc"] == pytest.approx(20 / 21)  # IoU 1 is never "> 1"
    assert s["precision"] == 1 and s["norm_precision"] == 1


def test_iou_is_the_continuous_iou():
    c = sequence_curves(np.array([[0.0, 0, 10, 10]]), np.array([[5.0, 0, 10, 10]]))
    # IoU 1/3: above the thresholds 0 .. 0.3 (7 of 21)
    assert c.success.tolist() == pytest.approx([1.0] * 7 + [0.0] * 14)
    c = sequence_curves(np.array([[0.5, 0.25, 10, 10]]), np.array([[5.5, 0.25, 10, 10]]))
    assert c.success[6] == 1 and c.success[7] == 0  # fractional boxes: same IoU


def test_absent_frames_lasot_vs_lasot_extension():
    present = np.array([True, True, False, True])
    gt = GT.copy()
    gt[2] = np.nan  # absent frames carry NaN ground truth in the evaluation
    lasot = summarize_curves([sequence_curves(GT, gt, present, "lasot")])
    ext = summarize_curves([sequence_curves(GT, gt, present, "lasot_ext")])
    assert lasot["success_auc"] == pytest.approx(3 / 4 * 20 / 21)  # denominator: all frames
    assert lasot["precision"] == pytest.approx(0.75) and lasot["norm_precision"] == pytest.approx(0.75)
    assert ext["precision"] == pytest.approx(0.75)
    assert ext["norm_precision"] == 1.0  # the quirk: invalid frames count as hits for P_norm
    got = summarize_curves([sequence_curves(GT, gt, present, "got10k")])
    assert got["norm_precision"] == 1.0 and got["success_auc"] == pytest.approx(3 / 4 * 20 / 21)


def test_lasot_presence_decides_validity_even_with_a_box():
    present = np.array([True, False, True, True])
    s = summarize_curves([sequence_curves(GT, GT, present, "lasot")])
    assert s["precision"] == pytest.approx(0.75)
    assert summarize_curves([sequence_curves(GT, GT, present, "custom")])["precision"] == 1.0  # not for others


def test_zero_size_predictions():
    pred = GT.copy()
    pred[1] = [19.5, 19.5, 0, 0]  # a point at the target centre
    c = sequence_curves(pred, GT)
    assert c.success[0] == pytest.approx(0.75)  # IoU 0 is not > 0
    # centre x + (w - 1) / 2 = 19.0 vs 19.5 per axis: error 0.71 px, a hit from 1 px on
    assert c.precision[0] == pytest.approx(0.75) and c.precision[1] == 1.0


def test_nan_predictions_are_misses():
    pred = GT.copy()
    pred[3] = np.nan
    s = summarize_curves([sequence_curves(pred, GT)])
    assert s["precision"] == pytest.approx(0.75) and s["success_auc"] == pytest.approx(0.75 * 20 / 21)


def test_dataset_summary_is_the_mean_of_sequence_curves():
    a = sequence_curves(GT, GT)
    b = sequence_curves(GT + [100, 100, 0, 0], GT)  # always far off
    s = summarize_curves([a, b])
    assert s["success_auc"] == pytest.approx(10 / 21) and s["precision"] == pytest.approx(0.5)


def test_got10k_metrics_pool_frames_and_skip_the_first():
    pred = [GT.copy(), GT[:2].copy()]
    pred[0][0] = [500, 500, 5, 5]  # frame 1 is ignored
    pred[1][1] = [20, 10, 20, 20]  # IoU 1/3
    m = got10k_metrics(pred, [GT, GT[:2]], [None, None])
    assert m["ao"] == pytest.approx((3 + 1 / 3) / 4)  # pooled over 3 + 1 frames
    assert m["sr_0.5"] == pytest.approx(0.75)


@pytest.mark.parametrize("bad", [[10, 10, -1, 20], [10, 10, 20, -0.5], [np.inf, 10, 20, 20], [10, 10, 20, -np.inf]])
def test_negative_size_or_infinite_predictions_are_refused(bad):
    pred = GT.copy()
    pred[2] = bad
    with pytest.raises(ValueError, match="frame 3"):
        sequence_curves(pred, GT)
    with pytest.raises(ValueError, match="frame 3"):
        got10k_metrics([pred], [GT], [None])
