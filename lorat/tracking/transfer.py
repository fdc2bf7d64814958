"""Host <-> device transfers of a tracking loop on a GPU: one synchronisation per frame.

Uploading a numpy frame with ``tensor.to("cuda")`` copies from pageable memory, which the driver
does synchronously through a bounce buffer, and reading the boxes back with ``.cpu()`` waits again:
two stalls of the host per frame, which at batch 1 cap the loop well below the model's speed.
:class:`FrameUploader` copies each frame into a pinned (page-locked) staging buffer, reused while the
frame size stays the same, and starts an asynchronous copy from it; :class:`HostReadback` copies the
step's (N, 5) results into a pinned buffer asynchronously and waits once, for that copy: the one
synchronisation of the frame. On a CPU both are plain views and copies (nothing to pin or wait for).
"""

from __future__ import annotations

import numpy as np
import torch

from lorat.errors import LoratError

__all__ = ["to_frame_tensor", "FrameUploader", "HostReadback"]


def to_frame_tensor(frame: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A frame as a (3, H, W) tensor in [0, 255] on ``device`` (uint8 stays uint8: a view, no copy).

    Accepts HWC uint8 RGB numpy arrays or tensors, or CHW uint8 tensors, on any device. One
    synchronous upload; a loop over frames uses :class:`FrameUploader` instead.

    Raises:
        LoratError: not an HxWx3 array or an HxWx3 / 3xHxW tensor.
    """
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise LoratError(f"expected an HxWx3 RGB frame, got an array of shape {frame.shape}")
        return torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1)
    if isinstance(frame, torch.Tensor):
        if frame.ndim != 3 or 3 not in (frame.shape[0], frame.shape[2]):
            raise LoratError(f"expected an HxWx3 or 3xHxW frame tensor, got shape {tuple(frame.shape)}")
        tensor = frame.to(device, non_blocking=True)
        return tensor if tensor.shape[0] == 3 else tensor.permute(2, 0, 1)
    raise LoratError(f"expected a numpy array or torch tensor frame, got {type(frame).__name__}")


class FrameUploader:
    """Frames (HWC uint8 RGB numpy arrays, or HWC/CHW tensors on any device) -> (3, H, W) tensors on
    ``device``, values in [0, 255], dtype kept (uint8 stays uint8).

    On CUDA a numpy frame goes through a pinned staging buffer with an asynchronous copy; before the
    buffer is written again, the previous copy out of it is waited for (an event, normally long
    done). ``pin=False`` stages through ordinary memory (what a CPU-only machine can test).

    Args:
        device: where the frames go.
        pin: stage numpy frames in page-locked memory (default: on CUDA devices).
    """

    def __init__(self, device: torch.device | str, pin: bool | None = None):
        self.device = torch.device(device)
        self.staged = self.device.type != "cpu" if pin is None else True
        self.pin = self.device.type == "cuda" if pin is None else pin
        self._buffer: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def __call__(self, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        if not self.staged or not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3:
            return to_frame_tensor(frame, self.device)  # the CPU (a view), a tensor, or the error message
        buffer = self._staging(frame.shape, frame.dtype)
        buffer.numpy()[...] = frame  # any strides in, contiguous out
        on_device = buffer.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return on_device.permute(2, 0, 1)

    def _staging(self, shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
        """The staging buffer for frames of ``shape``, free to write (the last copy out of it has ended)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        wanted = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        if self._buffer is None or tuple(self._buffer.shape) != tuple(shape) or self._buffer.dtype != wanted:
            self._buffer = torch.empty(shape, dtype=wanted, pin_memory=self.pin)
        return self._buffer


class HostReadback:
    """Copy a step's results to the host with one wait: into a pinned buffer, asynchronously, then wait
    for that copy only. On a CPU tensor: ``tensor.numpy()`` (no copy).

    Returns float64 numpy arrays that stay valid until the next call (copy them to keep them).
    """

    def __init__(self, pin: bool | None = None):
        self.pin = pin
        self._buffer: torch.Tensor | None = None

    def __call__(self, tensor: torch.Tensor) -> np.ndarray:
        if tensor.device.type == "cpu":
            return tensor.numpy()
        pin = tensor.device.type == "cuda" if self.pin is None else self.pin
        if self._buffer is None or self._buffer.shape != tensor.shape or self._buffer.dtype != tensor.dtype:
            self._buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
        self._buffer.copy_(tensor, non_blocking=True)
        if tensor.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
            done.synchronize()  # the frame's one synchronisation
        return self._buffer.numpy()
