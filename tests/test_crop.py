"""Crop geometry against the spec's worked examples and a literal F.interpolate reference."""

import numpy as np
import pytest
import torch

from lorat.tracking.boxes import clip_xyxy, rasterize, xywh_to_xyxy, xyxy_to_xywh
from lorat.tracking.crop import box_from_crop, box_to_crop, crop_frames, nominal_crop_params, template_mask

from . import reference


def _frame(h=480, w=640, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(0, 255, (3, h, w)).astype(np.float32))


def test_spec_search_crop_example():
    """The official crop on a 640x480 frame, box (100.3,120.7,180.2,200.9), f=4, O=224."""
    box = torch.tensor([[100.3, 120.7, 180.2, 200.9]], dtype=torch.float64)
    s, t = nominal_crop_params(box, 4.0, (224, 224))
    np.testing.assert_allclose(s[0].numpy(), [0.699563] * 2, atol=1e-6)
    np.testing.assert_allclose(t[0].numpy(), [13.886, -0.490], atol=1e-3)
    frame = _frame()
    _, rs, rt = crop_frames([frame], s, t, (224, 224), frame.mean((1, 2))[None])
    np.testing.assert_allclose(rs[0].numpy(), [0.700997, 0.697819], atol=1e-6)
    np.testing.assert_allclose(rt[0].numpy(), [13, 0], atol=1e-9)


def test_spec_template_mask_example():
    """The official template mask: the box maps to (28.035, 28.313, 83.617, 84.104), cells c 2..5, r 2..6."""
    box = torch.tensor([[100.3, 120.7, 180.2, 200.9]], dtype=torch.float64)
    frame = _frame()
    s, t = nominal_crop_params(box, 2.0, (112, 112))
    _, rs, rt = crop_frames([frame], s, t, (112, 112), frame.mean((1, 2))[None])
    in_crop = box_to_crop(box, rs, rt)
    np.testing.assert_allclose(in_crop[0].numpy(), [28.035, 28.313, 83.617, 84.104], atol=1e-3)
    mask = template_mask(in_crop, (112, 112), (8, 8))[0]
    expected = torch.zeros(8, 8, dtype=torch.long)
    expected[2:7, 2:6] = 1
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("box, factor, out, min_size", [
    ((100.3, 120.7, 180.2, 200.9), 4.0, (224, 224), 10),
    ((600.3, 10.2, 612.1, 19.9), 2.0, (112, 112), 0),        # upsampling at the frame corner
    ((-30.0, 400.0, 20.0, 470.0), 5.0, (378, 378), 10),      # partly outside the frame
    ((300.0, 200.0, 302.0, 201.0), 4.0, (252, 168), 10),     # tiny box, min size, rectangular crop
    ((0.0, 0.0, 640.0, 480.0), 2.0, (112, 112), 0),          # whole frame: heavy downsampling
])
def test_crop_matches_literal_reference(box, factor, out, min_size):
    frame = _frame()
    bg = frame.mean((1, 2))
    b = torch.tensor([box], dtype=torch.float64)
    s, t = nominal_crop_params(b, factor, out, min_size)
    crop, rs, rt = crop_frames([frame], s, t, out, bg[None])
    ref, ref_s, ref_t = reference.crop(frame.permute(1, 2, 0).numpy(), np.array(box), factor, out,
                                       bg.numpy(), min_size)
    np.testing.assert_allclose(rs[0].numpy(), ref_s, rtol=1e-12)
    np.testing.assert_allclose(rt[0].numpy(), ref_t, atol=1e-9)
    np.testing.assert_allclose(crop[0].permute(1, 2, 0).numpy(), ref, atol=0.02)  # of 255


def test_batch_of_different_frame_sizes_and_round_trip():
    frames = [_frame(480, 640, 1), _frame(240, 320, 2)]
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [200.5, 100.25, 250.0, 180.0]], dtype=torch.float64)
    s, t = nominal_crop_params(boxes, 4.0, (224, 224), 10)
    crops, rs, rt = crop_frames(frames, s, t, (224, 224), torch.stack([f.mean((1, 2)) for f in frames]))
    for i in range(2):
        single, ss, st = crop_frames([frames[i]], s[i:i + 1], t[i:i + 1], (224, 224), frames[i].mean((1, 2))[None])
        assert torch.equal(single[0], crops[i]) and torch.equal(ss[0], rs[i]) and torch.equal(st[0], rt[i])
    torch.testing.assert_close(box_from_crop(box_to_crop(boxes, rs, rt), rs, rt), boxes)


def test_box_helpers():
    xywh = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert xywh_to_xyxy(xywh).tolist() == [[10, 20, 40, 60]]
    assert torch.equal(xyxy_to_xywh(xywh_to_xyxy(xywh)), xywh)
    assert clip_xyxy(torch.tensor([[-5.0, 10, 700, 500]]), 640, 480).tolist() == [[0, 10, 640, 480]]
    assert rasterize(torch.tensor([[1.2, 2.0, 5.0, 5.00005]])).tolist() == [[1, 2, 5, 5]]
    assert rasterize(torch.tensor([[1.2, 2.0, 5.0002, 5.5]])).tolist() == [[1, 2, 6, 6]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_gpu_crop_matches_cpu():
    frame = _frame()
    b = torch.tensor([[100.3, 120.7, 180.2, 200.9]], dtype=torch.float64)
    s, t = nominal_crop_params(b, 4.0, (224, 224), 10)
    cpu = crop_frames([frame], s, t, (224, 224), frame.mean((1, 2))[None])
    gpu = crop_frames([frame.cuda()], s.cuda(), t.cuda(), (224, 224), frame.mean((1, 2))[None].cuda())
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=0.02, rtol=0)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1])
