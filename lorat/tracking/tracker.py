"""The tracker object: one video, one or several targets, frame by frame.

``Tracker.from_pretrained(weights).init(frame, box)``, then ``track(frame)`` per frame (or
``stream(frames, box)``): every target advances in one batched step (:mod:`lorat.tracking.step`),
with ``lap`` assignment so look-alike targets keep their identities, and on CUDA the step is
replayed as one CUDA graph (:mod:`lorat.tracking.cuda_graph`). Only the final boxes and scores
are copied to the host.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lorat.checkpoint.loader import LoadedModel, load
from lorat.config import Config
from lorat.errors import LoratError
from lorat.options import ModelOptions
from lorat.tracking.boxes import xyxy_to_xywh
from lorat.tracking.cuda_graph import GraphedStep
from lorat.tracking.step import Frame, StageTimer, TrackState, init_boxes, init_state, track_step
from lorat.tracking.threads import TUNER
from lorat.tracking.transfer import FrameUploader, HostReadback

if TYPE_CHECKING:
    import argparse

    from lorat.model.vit import LoRAT

__all__ = ["TrackResult", "FrameResults", "Tracker", "ensure_finite", "tracker_from_arguments"]


@dataclass(frozen=True)
class FrameResults:
    """What :meth:`Tracker.stream` yields for each frame.

    Attributes:
        index: 0-based frame index in the stream.
        frame: the HWC uint8 RGB frame, or None where it could not be read.
        targets: one result per target (previous boxes with score 0 on an unreadable frame).
    """

    index: int
    frame: Frame | None
    targets: list[TrackResult]


@dataclass(frozen=True)
class TrackResult:
    """One target in one frame.

    Attributes:
        box: (x, y, w, h) in frame pixels (float; w or h may be 0 if the target left the frame).
        score: unpenalised confidence in [0, 1]; 1.0 on the first frame.
    """

    box: tuple[float, float, float, float]
    score: float


def ensure_finite(outputs: np.ndarray) -> np.ndarray:
    """Return the host copy of a step's boxes / scores, or raise if any value is NaN or inf.

    Raises:
        LoratError: non-finite outputs (damaged weights, float16 overflow), instead of writing ``nan`` boxes.
    """
    if not np.isfinite(outputs).all():
        raise LoratError("the model produced non-finite boxes or scores (nan or inf): are its weights damaged? "
                         "(with float16 autocast, also try float32)")
    return outputs


class Tracker:
    """Track one or several targets through a video with a LoRAT or LoRATv2 model.

    Frames are HWC uint8 **RGB** numpy arrays (or HWC/CHW uint8 tensors on any device). Boxes at
    this API are **xywh** in pixels; inside, boxes are continuous xyxy. Typical use::

        tracker = Tracker.from_pretrained("LoRAT-B-224")   # or a weight file; None: the demo model
        tracker.init(first_frame, (x, y, w, h))
        for frame in frames:
            result = tracker.track(frame)   # TrackResult(box=(x, y, w, h), score=...)

    Args:
        model: merged LoRAT or LoRATv2 (see :func:`lorat.load_model`); the tracker runs on its device.
        config: the model's config (its ``tracking`` section sets the loop constants).
        dtype: autocast dtype (``None``/float32, float16, bfloat16).
        assignment: keep several targets on different objects (default: on when there are
            two or more targets); ignored for one target.
        cuda_graph: on a CUDA device (default on), replay each step (crop, model, post-process)
            as one CUDA graph (:mod:`lorat.tracking.cuda_graph`), captured on the first frame of each frame
            size: 4x the eager speed for B-224 on an H100, the same boxes. Not with several targets
            under ``assignment`` (the assignment runs on the host), nor with a stage ``timer``:
            those steps run eagerly, as every step does where the capture fails (with a warning).
            LoRATv2 steps run eagerly (phase 2 replaces its reference frame by score).
        kv_cache: LoRATv2 (default on): encode the template (and reference) once and keep their keys
            and values; off, every step encodes them again (the same boxes, slower).
    """

    def __init__(self, model: LoRAT, config: Config, dtype: torch.dtype | None = None,
                 assignment: bool = True, top_k: int = 5, overlap_iou: float = 0.5, cuda_graph: bool = True,
                 kv_cache: bool = True):
        self.model = model.eval()
        self.config = config
        self.dtype = dtype
        self.assignment = assignment
        self.top_k = top_k
        self.overlap_iou = overlap_iou
        self.cuda_graph = cuda_graph and config.model.family != "loratv2"
        self.kv_cache = kv_cache
        self.state: TrackState | None = None
        self._graph = None
        self._upload: FrameUploader | None = None  # pinned staging on CUDA, made for the model's device
        self._readback = HostReadback()

    @classmethod
    def from_pretrained(cls, weights: str | Path | None = None, config: str | Path | Config | None = None,
                        backbone_weights: str | Path | None = None, device: str | torch.device = "auto",
                        dtype: str | torch.dtype | None = "auto", backend: str = "auto", **kwargs) -> Tracker:
        """Load weights (see :func:`lorat.load_model`; None: the bundled demo model) onto ``device`` and wrap them.

        ``dtype``: the compute (autocast) dtype, ``"auto"`` as :func:`lorat.runtime.resolve_dtype` chooses.
        ``backend``: ``"torch"``, ``"onnxruntime"`` (an ``.onnx`` file from ``python -m lorat.export
        --onnx``, run on the CPU in float32; see :mod:`lorat.checkpoint.onnx`) or ``"auto"`` (ONNX Runtime
        for ``.onnx`` files, else torch). The other keywords go to the constructor.
        """
        options = ModelOptions(weights, config, backbone_weights, device=device, dtype=dtype, backend=backend)
        return cls.from_loaded(load(options, say=None), **kwargs)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, **kwargs) -> Tracker:
        """Wrap a model from :func:`lorat.checkpoint.loader.load` (its config and compute dtype)."""
        return cls(loaded.model, loaded.config, dtype=loaded.dtype, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def num_targets(self) -> int:
        return 0 if self.state is None else len(self.state)

    def reset(self) -> None:
        """Forget all targets."""
        self.state = None
        self._graph = None

    def init(self, frame: Frame, box: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
             distinct: bool = True) -> list[TrackResult]:
        """Start tracking on ``frame`` (the targets tracked so far are forgotten).

        Args:
            frame: the first frame (HWC uint8 RGB).
            box: one (x, y, w, h) box or a list of them (several targets, one per object); pixels.
            distinct: refuse boxes on one object (below); off where a benchmark defines the objects.

        Returns:
            The initial results (the given boxes, clipped to the frame, score 1.0).

        Raises:
            LoratError: a box with non-finite values, zero/negative size, or outside the frame; two
                boxes on one object (IoU above 0.9, see :func:`lorat.tracking.step.init_boxes`).
        """
        image = self._uploaded(frame)
        xyxy = init_boxes(box, image.shape[-1], image.shape[-2], distinct=distinct)
        self.state = init_state([image] * len(xyxy), xyxy, self.model, self.config.tracking, self.dtype,
                                self.kv_cache)
        return _first_results(xyxy)

    def add(self, frame: Frame, box: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
            distinct: bool = True) -> list[TrackResult]:
        """Start more targets on ``frame`` beside those already tracked (objects that appear later).

        Call it after :meth:`track_all` on the same frame; the new targets follow the others in
        every later result. Without targets this is :meth:`init`.

        Returns:
            The new targets' initial results (their boxes clipped to the frame, score 1.0).

        Raises:
            LoratError: as :meth:`init`, and a new box on an object already tracked (IoU above 0.9
                with a target's box on this frame); the targets tracked so far are kept.
        """
        if self.state is None:
            return self.init(frame, box, distinct)
        image = self._uploaded(frame)
        xyxy = init_boxes(box, image.shape[-1], image.shape[-2], tracked=self.state.box, distinct=distinct)
        new = init_state([image] * len(xyxy), xyxy, self.model, self.config.tracking, self.dtype, self.kv_cache)
        self.state = TrackState.cat([self.state, new])
        return _first_results(xyxy)

    def track_all(self, frame: Frame, timer: StageTimer | None = None) -> list[TrackResult]:
        """Advance every target by one frame; one batched forward pass.

        ``timer`` (optional) is called after each stage of the step (see :data:`StageTimer`).

        Raises:
            LoratError: the model's boxes or scores are not finite (damaged weights, fp16 overflow).
        """
        if self.state is None:
            raise LoratError("call init(frame, box) before track(frame)")
        started = time.perf_counter()
        image = self._uploaded(frame)
        if self._graphed(image, timer):
            packed = self._graph(image)
            self.state = self._graph.state
        else:
            step = track_step(self.model, self.state, [image] * len(self.state), self.config.tracking,
                              self.dtype, assign=self.assignment, top_k=self.top_k, overlap_iou=self.overlap_iou,
                              timer=timer)
            self.state = step.state
            packed = torch.cat([xyxy_to_xywh(step.box), step.score[:, None].to(step.box.dtype)], dim=1)
        packed = ensure_finite(self._readback(packed))  # the only device -> host copy (and wait) of the frame
        if self.device.type == "cpu" and timer is None:
            TUNER.record(time.perf_counter() - started)
        if timer is not None:
            timer("postprocess")
        return [TrackResult(tuple(float(v) for v in row[:4]), float(row[4])) for row in packed]

    def _uploaded(self, frame: Frame) -> torch.Tensor:
        """``frame`` as a (3, H, W) tensor on the model's device (see :class:`FrameUploader`)."""
        if self._upload is None or self._upload.device != self.device:
            self._upload = FrameUploader(self.device)
        return self._upload(frame)

    def _graphed(self, image: torch.Tensor, timer: StageTimer | None) -> bool:
        """Whether this step replays a CUDA graph; captures (or re-targets) it when needed."""
        if (not self.cuda_graph or self.device.type != "cuda" or timer is not None
                or (self.assignment and len(self.state) > 1)):
            return False
        size = tuple(image.shape[-2:])
        if self._graph is not None and self._graph.matches(self.state, size, self.dtype):
            self._graph.load(self.state)
            return True
        try:
            self._graph = GraphedStep(self.model, self.state, size, self.config.tracking, self.dtype)
        except RuntimeError as err:  # e.g. a compiled model or a custom layer that synchronises
            warnings.warn(f"CUDA graph capture failed, tracking without it: {str(err).splitlines()[0]}",
                          stacklevel=3)
            self.cuda_graph, self._graph = False, None
            return False
        return True

    def track(self, frame: Frame) -> TrackResult:
        """Advance a single target by one frame (use :meth:`track_all` for several)."""
        if self.num_targets > 1:
            raise LoratError("several targets are being tracked: use track_all(frame)")
        return self.track_all(frame)[0]

    def stream(self, frames: Iterable[Frame | None], box: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
               timer: StageTimer | None = None) -> Iterator[FrameResults]:
        """Track through a stream of frames, yielding each frame's results as soon as they exist.

        The first frame initialises every target on ``box`` (clipped to the frame, score 1.0); every
        later frame is tracked. The one policy for a frame that could not be read or decoded
        (``None`` in ``frames``): the previous boxes are repeated with score 0 and the tracker's
        state is left as it was, so line k of a result file is always frame k. Calling
        :meth:`init` between two frames (re-selection) is taken into account from the next one.

        Raises:
            LoratError: the first frame is missing or unreadable, a bad box (see :meth:`init`), or
                non-finite model outputs.
        """
        iterator = iter(frames)
        first = next(iterator, None)
        if first is None:
            raise LoratError("the first frame is missing or cannot be read; there is nothing to initialise on")
        results = self.init(first, box)
        yield FrameResults(0, first, results)
        for index, frame in enumerate(iterator, start=1):
            if frame is None:
                results = [TrackResult(r.box, 0.0) for r in results]
            else:
                results = self.track_all(frame, timer)
            yield FrameResults(index, frame, results)


def _first_results(xyxy: torch.Tensor) -> list[TrackResult]:
    """The results of targets on their first frame: their (clipped) boxes, score 1.0."""
    return [TrackResult(tuple(float(v) for v in xyxy_to_xywh(b)), 1.0) for b in xyxy]


def tracker_from_arguments(args: argparse.Namespace, say: Callable[[str], object] | None = print) -> Tracker:
    """The tracker the options of :func:`lorat.options.add_tracker_arguments` describe; ``say`` reports
    which weights were chosen when none were given."""
    return Tracker.from_loaded(load(ModelOptions.from_args(args), say=say), assignment=not args.no_assignment,
                               cuda_graph=not args.no_cuda_graph, kv_cache=not getattr(args, "no_kv_cache", False))
