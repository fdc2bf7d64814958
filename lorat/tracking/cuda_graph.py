"""The whole tracking step as one CUDA graph: crop, model and post-processing replayed with one launch.

At batch 1 a GPU step is bound by kernel launches (a few hundred small kernels per frame), not by
arithmetic. :class:`GraphedStep` captures :func:`lorat.tracking.step.track_step` once for a fixed frame
size and number of targets, keeps the tracking state in static device tensors that the graph
updates in place, and per frame only copies in the uploaded frame and replays the graph; the
caller reads the boxes and scores back (:class:`lorat.tracking.transfer.HostReadback`: the one
synchronisation of the frame). The boxes are the eager step's: the same
kernels run on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch

from lorat.config import TrackingConfig
from lorat.tracking.boxes import xyxy_to_xywh
from lorat.tracking.constants import static_constants
from lorat.tracking.step import TrackState, track_step

if TYPE_CHECKING:
    from lorat.model.vit import LoRAT

__all__ = ["capture", "GraphedStep"]

T = TypeVar("T")


def capture(fn: Callable[[], T], store: dict, warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run ``fn`` ``warmup`` times on a side stream, then capture one call of it as a CUDA graph.

    Autocast's weight cache is off throughout (a graph must not keep casts made outside it), and
    :func:`lorat.tracking.constants.const` constants are kept in ``store`` (keep it as long as the graph).

    Returns:
        The graph and the tensors ``fn`` returned while captured: every replay overwrites them.

    Raises:
        RuntimeError: ``fn`` does something a graph cannot hold (a host synchronisation, a copy from
            host memory).
    """
    cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        with static_constants(store):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
    finally:
        torch.set_autocast_cache_enabled(cache)
    return graph, out


class GraphedStep:
    """:func:`lorat.tracking.step.track_step` for N targets in frames of one size, as a CUDA graph.

    Args:
        model: merged LoRAT in eval mode, on a CUDA device.
        state: the targets' state (from :func:`lorat.tracking.step.init_state`); copied, not kept.
        frame_size: (H, W) of every frame this graph will track.
        track_cfg: tracking constants.
        autocast_dtype: as for :func:`lorat.tracking.step.track_step`.

    Attributes:
        state: the static state the graph reads and updates; :meth:`load` replaces its values.
    """

    def __init__(self, model: LoRAT, state: TrackState, frame_size: tuple[int, int], track_cfg: TrackingConfig,
                 autocast_dtype: torch.dtype | None = None):
        self.frame_size = tuple(frame_size)
        self.autocast_dtype = autocast_dtype
        self.state = TrackState(*(t.clone() for t in state.tensors()))
        self._frame = torch.zeros((*self.frame_size, 3), dtype=torch.uint8, device=state.box.device)
        n = len(self.state)

        def step() -> torch.Tensor:
            chw = self._frame.permute(2, 0, 1)
            result = track_step(model, self.state, [chw] * n, track_cfg, autocast_dtype)
            self.state.box.copy_(result.state.box)
            return torch.cat([xyxy_to_xywh(result.box), result.score[:, None].to(result.box.dtype)], dim=1)

        start = self.state.box.clone()  # the warm-up steps move the box: put it back afterwards
        self._constants: dict = {}
        self._graph, self._packed = capture(step, self._constants)
        self.state.box.copy_(start)

    def matches(self, state: TrackState, frame_size: tuple[int, int], autocast_dtype: torch.dtype | None) -> bool:
        """Whether this graph can track ``state``'s targets in frames of ``frame_size`` (H, W) with
        ``autocast_dtype``."""
        same = (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                for a, b in zip(self.state.tensors(), state.tensors(), strict=True))
        return tuple(frame_size) == self.frame_size and autocast_dtype == self.autocast_dtype and all(same)

    def load(self, state: TrackState) -> None:
        """Track ``state``'s targets from now on (after a re-initialisation); see :meth:`matches`."""
        if state is self.state:
            return
        for mine, theirs in zip(self.state.tensors(), state.tensors(), strict=True):
            mine.copy_(theirs)

    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        """Track one frame: (3, H, W) in [0, 255] on any device (see
        :class:`lorat.tracking.transfer.FrameUploader`) -> (N, 5) ``x, y, w, h, score`` rows (float64) on
        the device, overwritten by the next call; the state advances. Nothing here waits for the GPU."""
        self._frame.permute(2, 0, 1).copy_(frame, non_blocking=True)
        self._graph.replay()
        return self._packed
