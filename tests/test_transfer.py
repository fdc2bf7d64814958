"""Frame upload and result readback (lorat.tracking.transfer): the staging logic runs on any machine
(ordinary memory stands in for pinned memory); the pinned, asynchronous CUDA path needs a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorat.errors import LoratError
from lorat.tracking.transfer import FrameUploader, HostReadback, to_frame_tensor


def _frame(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_staging_reuses_one_buffer_per_frame_size_and_copies_exactly():
    upload = FrameUploader("cpu", pin=False)  # staged as on a GPU, in ordinary memory
    a, b = _frame(seed=1), _frame(seed=2)
    first = upload(a)
    buffer = upload._buffer
    assert first.shape == (3, 48, 64) and first.dtype == torch.uint8
    assert torch.equal(first, torch.from_numpy(a).permute(2, 0, 1))
    kept = first.clone()
    second = upload(b)
    assert upload._buffer is buffer  # same size: the same staging buffer
    assert torch.equal(second, torch.from_numpy(b).permute(2, 0, 1))
    assert torch.equal(kept, torch.from_numpy(a).permute(2, 0, 1))
    upload(_frame(32, 40))
    assert upload._buffer is not buffer and tuple(upload._buffer.shape) == (32, 40, 3)  # a new size: a new buffer


def test_strided_frames_are_staged_as_their_values():
    """A BGR->RGB view (negative strides) or a crop of a larger array arrive as their pixel values."""
    upload = FrameUploader("cpu", pin=False)
    bgr = _frame(seed=3)
    for view in (bgr[:, :, ::-1], _frame(80, 90, seed=4)[10:58, 5:69]):
        assert torch.equal(upload(view), torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1))


def test_cpu_frames_are_views_and_tensors_pass_through():
    upload = FrameUploader("cpu")
    frame = _frame()
    out = upload(frame)
    assert out.data_ptr() == torch.from_numpy(frame).data_ptr()  # no copy on the CPU
    chw = torch.from_numpy(frame).permute(2, 0, 1)
    assert torch.equal(upload(chw), chw) and torch.equal(upload(torch.from_numpy(frame)), chw)


@pytest.mark.parametrize("bad, message", [(np.zeros((4, 4), np.uint8), "HxWx3 RGB frame"),
                                          (torch.zeros(2, 4, 4), "3xHxW frame tensor"), ([1, 2], "numpy array")])
def test_bad_frames_are_refused_by_every_path(bad, message):
    for convert in (FrameUploader("cpu"), FrameUploader("cpu", pin=False), lambda f: to_frame_tensor(f, "cpu")):
        with pytest.raises(LoratError, match=message):
            convert(bad)


def test_readback_on_the_cpu_is_the_tensor():
    values = torch.arange(10, dtype=torch.float64).reshape(2, 5)
    out = HostReadback()(values)
    assert isinstance(out, np.ndarray) and np.array_equal(out, values.numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_upload_and_one_wait_readback_on_cuda():
    upload, readback = FrameUploader("cuda"), HostReadback()
    frames = [_frame(seed=s) for s in range(4)]
    for frame in frames:
        on_gpu = upload(frame)
        assert on_gpu.is_cuda and upload._buffer.is_pinned()
        assert torch.equal(on_gpu.cpu(), torch.from_numpy(frame).permute(2, 0, 1))
        host = readback(on_gpu[:, :2, :5].double().flatten(1))
        assert readback._buffer.is_pinned()
        assert np.array_equal(host, torch.from_numpy(frame).permute(2, 0, 1)[:, :2, :5].double().flatten(1).numpy())
