"""The tracking loop: the official LoRAT inference pipeline, batched and on the model's device.

Two layers (like SAM's ``predict`` / ``predict_torch``):

* :func:`init_state` / :func:`track_step` are stateless and batched over independent sequences:
  a :class:`TrackState` holds, per sequence, the cached template, template mask, frame-0 mean
  and last box. The evaluator advances many sequences per forward pass with them.
* :class:`Tracker` is the friendly object: ``init(frame, box)``, then ``track(frame)`` per frame,
  for one target or several in the same video (one batched forward per frame, optionally with
  ``lap`` assignment so look-alike targets keep their identities).

Per frame (LORAT_SPEC section 4): search crop around the cached box (enlarged to
``min_object_size``, factor 4 or 5, padded with frame 0's mean), one forward pass with the cached
template and mask, ``sigmoid`` scores with a symmetric Hann window (weight 0.45), argmax, the
unpenalised score reported, the box mapped back with the *realised* crop parameters and clipped
to the frame; the cached box is replaced only by a valid clipped box. The template is never
updated. Crops and post-processing run in torch on the model's device; on a GPU only the final
box and score are copied to the host.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lorat.assignment import assign_peaks, score_peaks
from lorat.boxes import clip_xyxy, is_valid_xyxy, xywh_to_xyxy, xyxy_to_xywh
from lorat.checkpoint import load_model
from lorat.config import Config, ModelConfig, TrackingConfig, load_config
from lorat.crop import (
    box_from_crop,
    box_to_crop,
    const,
    crop_frames,
    geometry_dtype,
    nominal_crop_params,
    normalize_crops,
    template_mask,
)
from lorat.errors import LoratError
from lorat.graph_step import GraphedStep
from lorat.model import LoRAT
from lorat.runtime import BACKENDS, resolve_device, resolve_dtype

__all__ = [
    "TrackState", "StepResult", "TrackResult", "Tracker", "init_state", "track_step", "search_crops", "run_model",
    "decode_step", "cast_for_autocast", "to_frame_tensor", "hann_window", "init_boxes", "ensure_finite", "FrameResults",
    "StageTimer",
]

Frame = np.ndarray | torch.Tensor
StageTimer = Callable[[str], None]
"""Called with a stage name (``"crop"``, ``"model"``, ``"postprocess"``) as each stage of a step ends."""


# ----------------------------------------------------------------------------- inputs


def to_frame_tensor(frame: Frame, device: torch.device) -> torch.Tensor:
    """A frame as a (3, H, W) tensor in [0, 255] on ``device`` (uint8 stays uint8: a view, no copy).

    Accepts HWC uint8 RGB numpy arrays or tensors, or CHW uint8 tensors, on any device.
    """
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise LoratError(f"expected an HxWx3 RGB frame, got an array of shape {frame.shape}")
        # One synchronous uint8 upload; pinning a fresh buffer every frame costs more than it saves.
        return torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1)
    if isinstance(frame, torch.Tensor):
        if frame.ndim != 3 or 3 not in (frame.shape[0], frame.shape[2]):
            raise LoratError(f"expected an HxWx3 or 3xHxW frame tensor, got shape {tuple(frame.shape)}")
        tensor = frame.to(device)
        if tensor.shape[0] != 3:  # HWC
            tensor = tensor.permute(2, 0, 1)
        return tensor
    raise LoratError(f"expected a numpy array or torch tensor frame, got {type(frame).__name__}")


def init_boxes(box: Sequence[float] | Sequence[Sequence[float]] | np.ndarray | torch.Tensor, width: int,
               height: int) -> torch.Tensor:
    """Check first-frame boxes and clip them to the frame, as the official pipeline does.

    Args:
        box: one (x, y, w, h) box or (N, 4) of them, pixels.
        width, height: the frame's size.

    Returns:
        (N, 4) float64 xyxy boxes inside ``[0, width] x [0, height]``.

    Raises:
        LoratError: no box, a box with non-finite values, zero/negative size, or outside the frame.
    """
    boxes = torch.as_tensor(np.asarray(box, dtype=np.float64)).reshape(-1, 4)
    if boxes.numel() == 0:
        raise LoratError("no init box given")
    xyxy = clip_xyxy(xywh_to_xyxy(boxes), width, height)
    for i, (b, raw) in enumerate(zip(xyxy, boxes.tolist(), strict=True)):
        label = f"init box {i + 1} ({', '.join(f'{v:g}' for v in raw)})"
        if not np.isfinite(raw).all():
            raise LoratError(f"{label} has non-finite values (nan or inf)")
        if raw[2] <= 0 or raw[3] <= 0:
            raise LoratError(f"{label} must have a positive width and height")
        if not is_valid_xyxy(b):
            raise LoratError(f"{label} lies outside the {width}x{height} frame")
    return xyxy


def hann_window(grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(H, W) float32 outer product of *symmetric* Hann windows (zeros on the border)."""
    h = torch.hann_window(grid[0], periodic=False, dtype=torch.float64, device=device)
    w = torch.hann_window(grid[1], periodic=False, dtype=torch.float64, device=device)
    return torch.outer(h, w).float()


# ----------------------------------------------------------------------------- stateless core


@dataclass
class TrackState:
    """Per-sequence tracking state, batched along the first axis (N sequences).

    Attributes:
        template: (N, 3, Ht, Wt) float32 normalised template crops (never updated).
        mask: (N, Hz, Wz) int64 template foreground masks.
        background: (N, 3) float32 frame-0 channel means in [0, 255] (search-crop padding).
        box: (N, 4) xyxy cached boxes in frame px (float64; float32 on MPS).
    """

    template: torch.Tensor
    mask: torch.Tensor
    background: torch.Tensor
    box: torch.Tensor

    def __len__(self) -> int:
        return self.box.shape[0]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(template, mask, background, box), the constructor's order."""
        return self.template, self.mask, self.background, self.box

    def select(self, index: Sequence[int] | torch.Tensor) -> TrackState:
        """The sub-batch of the given sequences."""
        idx = torch.as_tensor(index, dtype=torch.int64, device=self.box.device)
        return TrackState(*(t[idx] for t in self.tensors()))

    @staticmethod
    def cat(states: Sequence[TrackState]) -> TrackState:
        """Concatenate states of several sequences into one batch."""
        return TrackState(*(torch.cat(parts) for parts in zip(*(s.tensors() for s in states), strict=True)))


@dataclass
class StepResult:
    """Output of :func:`track_step` for N sequences (tensors on the model's device).

    Attributes:
        state: updated state.
        box: (N, 4) xyxy frame boxes, clipped to the frame (possibly degenerate).
        score: (N,) float32 unpenalised confidence in [0, 1].
    """

    state: TrackState
    box: torch.Tensor
    score: torch.Tensor


def init_state(frames: Sequence[torch.Tensor], boxes: torch.Tensor, model_cfg: ModelConfig,
               track_cfg: TrackingConfig) -> TrackState:
    """Start N sequences: template crops, masks and cached boxes.

    Args:
        frames: N (3, H, W) [0, 255] first frames on the model's device (see
            :func:`to_frame_tensor`); the same frame may appear several times (several targets).
        boxes: (N, 4) xyxy first-frame boxes, valid and inside their frames.
    """
    device = frames[0].device
    boxes = boxes.to(device=device, dtype=geometry_dtype(device))
    background = torch.stack([f.float().mean(dim=(1, 2)) for f in frames])
    scale, translation = nominal_crop_params(boxes, track_cfg.template_area_factor, model_cfg.template_size)
    crops, scale, translation = crop_frames(frames, scale, translation, model_cfg.template_size, background)
    mask = template_mask(box_to_crop(boxes, scale, translation), model_cfg.template_size, model_cfg.template_grid)
    return TrackState(normalize_crops(crops), mask, background, boxes)


def search_crops(state: TrackState, frames: Sequence[torch.Tensor], model_cfg: ModelConfig,
                 track_cfg: TrackingConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised search crops around the cached boxes, with the realised crop parameters."""
    scale, translation = nominal_crop_params(state.box, track_cfg.search_area_factor, model_cfg.search_size,
                                             track_cfg.min_object_size)
    crops, scale, translation = crop_frames(frames, scale, translation, model_cfg.search_size, state.background)
    return normalize_crops(crops), scale, translation


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cast_for_autocast(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Store the weights and biases of every Linear and Conv2d layer in ``dtype``, in place.

    Autocast casts them to ``dtype`` at every forward pass anyway (it caches casts only for
    tensors that need gradients), so the outputs are bit-identical while each pass skips reading
    the float32 weights and writing the copies: B-224 on a 2-core AVX-512 BF16 CPU goes from 117
    to 66 ms. Only for a model that runs under ``dtype`` autocast from now on; None does nothing.
    """
    if dtype is None or dtype == torch.float32:
        return model
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
    return model


def run_model(model: LoRAT, state: TrackState, x: torch.Tensor,
              autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One forward pass on cached templates and new search crops (inference mode, optional autocast)."""
    with torch.inference_mode(), _autocast(x.device, autocast_dtype):
        return model(state.template, x.to(state.template.dtype), state.mask)


def decode_step(out: dict[str, torch.Tensor], state: TrackState, frame_sizes: torch.Tensor, scale: torch.Tensor,
                translation: torch.Tensor, track_cfg: TrackingConfig, search_size: tuple[int, int],
                assign: bool = False, top_k: int = 5, overlap_iou: float = 0.5) -> StepResult:
    """Post-process model outputs: Hann-penalised argmax (or peak assignment), map back, clip, update.

    Args:
        out: model outputs for N sequences.
        state: their state before this frame.
        frame_sizes: (N, 2) frame (W, H) in px.
        scale, translation: realised search-crop parameters (N, 2).
        search_size: search crop (W, H) px.
    """
    device = state.box.device
    prob = out["score_map"].float().sigmoid()  # (N, H, W)
    window = hann_window(prob.shape[1:], device)
    penalised = (1 - track_cfg.window_penalty) * prob + track_cfg.window_penalty * window
    size = const(search_size * 2, scale.dtype, device)
    boxes = out["boxes"].flatten(1, 2).to(scale.dtype) * size  # (N, H*W, 4) crop px
    n = len(state)
    if assign and n > 1:
        values, index = score_peaks(penalised, top_k)
        k = index.shape[1]
        peak_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4)).reshape(-1, 4)
        frame_boxes = box_from_crop(peak_boxes, scale.repeat_interleave(k, 0), translation.repeat_interleave(k, 0))
        choice = torch.as_tensor(assign_peaks(frame_boxes.view(n, k, 4), values, overlap_iou), device=device)
        best = index.gather(1, choice[:, None])[:, 0]
    else:
        best = penalised.flatten(1).argmax(dim=1)
    rows = torch.arange(n, device=device)
    score = prob.flatten(1)[rows, best]
    box = box_from_crop(boxes[rows, best], scale, translation)
    box = clip_xyxy(box, frame_sizes[:, 0].to(box.dtype), frame_sizes[:, 1].to(box.dtype))
    keep = is_valid_xyxy(box)
    return StepResult(replace(state, box=torch.where(keep[:, None], box, state.box)), box, score)


def track_step(model: LoRAT, state: TrackState, frames: Sequence[torch.Tensor], track_cfg: TrackingConfig,
               autocast_dtype: torch.dtype | None = None, assign: bool = False, top_k: int = 5,
               overlap_iou: float = 0.5, readable: torch.Tensor | None = None,
               timer: StageTimer | None = None) -> StepResult:
    """Advance N sequences by one frame each (stateless; one forward pass).

    Args:
        model: merged LoRAT in eval mode.
        state: the sequences' state (from :func:`init_state` or a previous step).
        frames: N (3, H, W) [0, 255] current frames on the model's device.
        track_cfg: tracking constants.
        autocast_dtype: ``torch.float16`` / ``torch.bfloat16`` for mixed precision, else float32.
        assign: the N sequences are targets in one video: keep them on different objects
            (:mod:`lorat.assignment`). Off for independent sequences.
        readable: (N,) bool; where False the frame could not be read (pass any frame of the right
            size): that sequence keeps its state and its previous box, with score 0.
        timer: called with ``"crop"`` and ``"model"`` after those stages (benchmarks).
    """
    x, scale, translation = search_crops(state, frames, model.cfg, track_cfg)
    if timer is not None:
        timer("crop")
    out = run_model(model, state, x, autocast_dtype)
    if timer is not None:
        timer("model")
    sizes = const([[f.shape[-1], f.shape[-2]] for f in frames], torch.int64, state.box.device)
    step = decode_step(out, state, sizes, scale, translation, track_cfg, model.cfg.search_size, assign, top_k,
                       overlap_iou)
    if readable is None:
        return step
    keep = readable.to(state.box.device)
    return StepResult(replace(step.state, box=torch.where(keep[:, None], step.state.box, state.box)),
                      torch.where(keep[:, None], step.box, state.box), torch.where(keep, step.score, 0.0))


# ----------------------------------------------------------------------------- the Tracker


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
    """Track one or several targets through a video with a LoRAT model.

    Frames are HWC uint8 **RGB** numpy arrays (or HWC/CHW uint8 tensors on any device). Boxes at
    this API are **xywh** in pixels; inside, boxes are continuous xyxy. Typical use::

        tracker = Tracker.from_pretrained("weights/lorat_b224.safetensors")
        tracker.init(first_frame, (x, y, w, h))
        for frame in frames:
            result = tracker.track(frame)   # TrackResult(box=(x, y, w, h), score=...)

    Args:
        model: merged LoRAT (see :func:`lorat.load_model`); the tracker runs on its device.
        config: the model's config (its ``tracking`` section sets the loop constants).
        dtype: autocast dtype (``None``/float32, float16, bfloat16).
        assignment: keep several targets on different objects (default: on when there are
            two or more targets); ignored for one target.
        cuda_graph: on a CUDA device (default on), replay each step (crop, model, post-process)
            as one CUDA graph (:mod:`lorat.graph_step`), captured on the first frame of each frame
            size: 4x the eager speed for B-224 on an H100, the same boxes. Not with several targets
            under ``assignment`` (the assignment runs on the host), nor with a stage ``timer``:
            those steps run eagerly, as every step does where the capture fails (with a warning).
    """

    def __init__(self, model: LoRAT, config: Config, dtype: torch.dtype | None = None,
                 assignment: bool = True, top_k: int = 5, overlap_iou: float = 0.5, cuda_graph: bool = True):
        self.model = model.eval()
        self.config = config
        self.dtype = dtype
        self.assignment = assignment
        self.top_k = top_k
        self.overlap_iou = overlap_iou
        self.cuda_graph = cuda_graph
        self.state: TrackState | None = None
        self._graph = None

    @classmethod
    def from_pretrained(cls, weights: str | Path, config: str | Path | Config | None = None,
                        backbone_weights: str | Path | None = None, device: str | torch.device = "auto",
                        dtype: str | torch.dtype | None = "auto", backend: str = "auto", **kwargs) -> Tracker:
        """Load weights (see :func:`lorat.load_model`) onto ``device`` and wrap them.

        ``backend``: ``"torch"``, ``"onnxruntime"`` (an ``.onnx`` file from ``python -m lorat.export
        --onnx``, run on the CPU in float32; see :mod:`lorat.onnx_backend`) or ``"auto"`` (ONNX Runtime
        for ``.onnx`` files, else torch).
        """
        if backend not in BACKENDS:
            raise LoratError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
        onnx_file = Path(weights).suffix.lower() == ".onnx"
        cfg = load_config(config) if isinstance(config, (str, Path)) else config
        if backend == "onnxruntime" or (backend == "auto" and onnx_file):
            if not onnx_file:
                raise LoratError(f"the onnxruntime backend runs an .onnx file, got {weights}; make one with "
                                 f"python -m lorat.export --weights {weights} --onnx model.onnx")
            cpu = device in (None, "auto", "cpu", torch.device("cpu"))
            if not cpu or dtype not in ("auto", None, "float32", "fp32", torch.float32):
                raise LoratError(f"the onnxruntime backend runs on the CPU in float32, not {device} / {dtype}")
            from lorat.onnx_backend import load_onnx

            model, file_cfg = load_onnx(weights)
            tracking = cfg.tracking if cfg is not None else file_cfg.tracking
            return cls(model, replace(file_cfg, tracking=tracking), dtype=None, **kwargs)
        if onnx_file:
            raise LoratError(f"{weights} is an ONNX model: use the onnxruntime backend")
        dev = resolve_device(device)
        model, cfg = load_model(weights, cfg, backbone_weights, device=dev)
        autocast = resolve_dtype(dtype, dev, cfg.model.backbone.embed_dim)
        return cls(cast_for_autocast(model, autocast), cfg, dtype=autocast, **kwargs)

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

    def init(self, frame: Frame, box: Sequence[float] | Sequence[Sequence[float]] | np.ndarray) -> list[TrackResult]:
        """Start tracking on ``frame``.

        Args:
            frame: the first frame (HWC uint8 RGB).
            box: one (x, y, w, h) box or a list of them (several targets); pixels.

        Returns:
            The initial results (the given boxes, clipped to the frame, score 1.0).

        Raises:
            LoratError: a box with non-finite values, zero/negative size, or outside the frame.
        """
        image = to_frame_tensor(frame, self.device)
        xyxy = init_boxes(box, image.shape[-1], image.shape[-2])
        self.state = init_state([image] * len(xyxy), xyxy, self.model.cfg, self.config.tracking)
        return [TrackResult(tuple(float(v) for v in xyxy_to_xywh(b)), 1.0) for b in xyxy]

    def add(self, frame: Frame, box: Sequence[float] | Sequence[Sequence[float]] | np.ndarray) -> list[TrackResult]:
        """Start more targets on ``frame`` beside those already tracked (objects that appear later).

        Call it after :meth:`track_all` on the same frame; the new targets follow the others in
        every later result. Without targets this is :meth:`init`.

        Returns:
            The new targets' initial results (their boxes clipped to the frame, score 1.0).
        """
        if self.state is None:
            return self.init(frame, box)
        previous = self.state
        results = self.init(frame, box)
        self.state = TrackState.cat([previous, self.state])
        return results

    def track_all(self, frame: Frame, timer: StageTimer | None = None) -> list[TrackResult]:
        """Advance every target by one frame; one batched forward pass.

        ``timer`` (optional) is called after each stage of the step (see :data:`StageTimer`).

        Raises:
            LoratError: the model's boxes or scores are not finite (damaged weights, fp16 overflow).
        """
        if self.state is None:
            raise LoratError("call init(frame, box) before track(frame)")
        image = to_frame_tensor(frame, self.device)
        if self._graphed(image, timer):
            packed = self._graph(image).numpy()
            self.state = self._graph.state
        else:
            step = track_step(self.model, self.state, [image] * len(self.state), self.config.tracking,
                              self.dtype, assign=self.assignment, top_k=self.top_k, overlap_iou=self.overlap_iou,
                              timer=timer)
            self.state = step.state
            packed = torch.cat([xyxy_to_xywh(step.box), step.score[:, None].to(step.box.dtype)], dim=1)
            packed = packed.cpu().numpy()  # the only device -> host copy of the frame
        ensure_finite(packed)
        if timer is not None:
            timer("postprocess")
        return [TrackResult(tuple(float(v) for v in row[:4]), float(row[4])) for row in packed]

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
