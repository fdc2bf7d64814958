"""One tracking step, stateless and batched: the official LoRAT inference for N sequences at once.

:func:`init_state` starts N sequences (template crops, masks, frame-0 means, boxes) and
:func:`track_step` advances them by one frame each with one forward pass; a :class:`TrackState`
carries everything between frames. :class:`lorat.tracking.tracker.Tracker` drives these for one
video; the evaluator (:mod:`lorat.evaluation.runner`) advances many sequences per forward pass.

Per frame (the official ``LoRAT`` tracker's ``track``): search crop around the cached box
(enlarged to ``min_object_size``, factor 4 or 5, padded with frame 0's mean), one forward pass
with the cached template and mask, ``sigmoid`` scores with a symmetric Hann window (weight 0.45),
argmax, the unpenalised score reported, the box mapped back with the *realised* crop parameters
and clipped to the frame; the cached box is replaced only by a valid clipped box. The template is
never updated. Crops and post-processing run in torch on the model's device, with no host
synchronisation.

LoRATv2 (``model.family: loratv2``) runs the same loop; its state also carries the key-value cache
of the template (encoded once in :func:`init_state`) and, in phase 2, the dynamic reference frame,
which a frame scoring above ``tracking.reference_threshold`` replaces (cropped around the new box).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from lorat.config import ModelConfig, TrackingConfig
from lorat.errors import LoratError
from lorat.tracking.assignment import assign_peaks, score_peaks
from lorat.tracking.boxes import clip_xyxy, is_valid_xyxy, xywh_to_xyxy
from lorat.tracking.constants import const
from lorat.tracking.crop import (
    box_from_crop,
    box_to_crop,
    crop_frames,
    geometry_dtype,
    nominal_crop_params,
    normalize_crops,
    template_mask,
)
from lorat.tracking.transfer import to_frame_tensor

if TYPE_CHECKING:
    from lorat.model.v2 import KVCache, LoRATv2
    from lorat.model.vit import LoRAT

__all__ = ["Frame", "StageTimer", "TrackState", "StepResult", "init_state", "track_step", "search_crops", "run_model",
           "decode_step", "to_frame_tensor", "hann_window", "init_boxes", "DUPLICATE_IOU"]

Frame = np.ndarray | torch.Tensor
StageTimer = Callable[[str], None]
"""Called with a stage name (``"crop"``, ``"model"``, ``"postprocess"``) as each stage of a step ends."""


# ----------------------------------------------------------------------------- inputs


DUPLICATE_IOU = 0.9
"""Two targets whose first boxes overlap more than this (IoU) would track one object twice: refused."""


def _box_text(xyxy: Sequence[float]) -> str:
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    return ", ".join(f"{round(v, 2):g}" for v in (x1, y1, x2 - x1, y2 - y1))


def _refuse_duplicates(xyxy: torch.Tensor, labels: Sequence[str], tracked: torch.Tensor | None) -> None:
    """Raise when two of the new boxes, or a new box and a tracked target, overlap with IoU above
    :data:`DUPLICATE_IOU` (one object, two targets: both would follow it, each a copy of the other)."""
    if len(xyxy) < 2 and (tracked is None or len(tracked) == 0):
        return  # one box: nothing to compare (and no torchvision import, about 1 s, for the usual run)
    from torchvision.ops import box_iou

    iou = box_iou(xyxy, xyxy).triu(diagonal=1)
    if bool((iou > DUPLICATE_IOU).any()):
        i, j = (int(v) for v in (iou > DUPLICATE_IOU).nonzero()[0])
        raise LoratError(f"{labels[i]} and {labels[j]} overlap (IoU {float(iou[i, j]):.2f} > {DUPLICATE_IOU}): they "
                         f"mark the same object, which would be tracked twice; give one box per object")
    if tracked is None or len(tracked) == 0:
        return
    tracked = tracked.detach().to("cpu", torch.float64)
    iou = box_iou(xyxy, tracked)
    if bool((iou > DUPLICATE_IOU).any()):
        i, j = (int(v) for v in (iou > DUPLICATE_IOU).nonzero()[0])
        raise LoratError(f"{labels[i]} overlaps target {j + 1}, now at ({_box_text(tracked[j])}) (IoU "
                         f"{float(iou[i, j]):.2f} > {DUPLICATE_IOU}): that object is already tracked")


def init_boxes(box: Sequence[float] | Sequence[Sequence[float]] | np.ndarray | torch.Tensor, width: int,
               height: int, tracked: torch.Tensor | None = None, distinct: bool = True) -> torch.Tensor:
    """Check first-frame boxes and clip them to the frame, as the official pipeline does.

    Every way of starting targets goes through here (``Tracker.init`` / ``add``, so the CLI, the
    app and the VOT server; the evaluator), so each rule holds everywhere.

    Args:
        box: one (x, y, w, h) box or (N, 4) of them, pixels.
        width, height: the frame's size.
        tracked: (M, 4) xyxy boxes of the targets already tracked (``Tracker.add``), if any.
        distinct: refuse two boxes on one object (a person's typo); off for objects a benchmark
            defines (the VOT toolkit's: they are tracked as given, overlapping or not).

    Returns:
        (N, 4) float64 xyxy boxes inside ``[0, width] x [0, height]``.

    Raises:
        LoratError: no box, a box with non-finite values, zero/negative size, or outside the frame;
            two boxes on one object (IoU above :data:`DUPLICATE_IOU` after clipping, between two
            new boxes or between a new box and a tracked target).
    """
    boxes = torch.as_tensor(np.asarray(box, dtype=np.float64)).reshape(-1, 4)
    if boxes.numel() == 0:
        raise LoratError("no init box given")
    xyxy = clip_xyxy(xywh_to_xyxy(boxes), width, height)
    labels = []
    for i, (b, raw) in enumerate(zip(xyxy, boxes.tolist(), strict=True)):
        label = f"init box {i + 1} ({', '.join(f'{v:g}' for v in raw)})"
        if not np.isfinite(raw).all():
            raise LoratError(f"{label} has non-finite values (nan or inf)")
        if raw[2] <= 0 or raw[3] <= 0:
            raise LoratError(f"{label} must have a positive width and height")
        if not is_valid_xyxy(b):
            raise LoratError(f"{label} lies outside the {width}x{height} frame")
        labels.append(label)
    if distinct:
        _refuse_duplicates(xyxy, labels, tracked)
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
        reference: LoRATv2 phase 2: (N, 3, Hr, Wr) float32 normalised crops of the dynamic reference
            frame; else None.
        cache: LoRATv2 with its key-value cache: the keys and values of the template (and
            reference) chunks (:class:`lorat.model.v2.KVCache`); None for LoRAT, or with the cache off
            (every step then encodes the template and reference again).
    """

    template: torch.Tensor
    mask: torch.Tensor
    background: torch.Tensor
    box: torch.Tensor
    reference: torch.Tensor | None = None
    cache: KVCache | None = None

    def __len__(self) -> int:
        return self.box.shape[0]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(template, mask, background, box), the constructor's first four (what LoRAT keeps)."""
        return self.template, self.mask, self.background, self.box

    def select(self, index: Sequence[int] | torch.Tensor) -> TrackState:
        """The sub-batch of the given sequences."""
        idx = torch.as_tensor(index, dtype=torch.int64, device=self.box.device)
        return TrackState(*(t[idx] for t in self.tensors()),
                          reference=None if self.reference is None else self.reference[idx],
                          cache=None if self.cache is None else self.cache.select(idx))

    @staticmethod
    def cat(states: Sequence[TrackState]) -> TrackState:
        """Concatenate states of several sequences into one batch (all with or all without a
        reference and a cache)."""
        references = [s.reference for s in states]
        caches = [s.cache for s in states]
        if len({r is None for r in references}) > 1 or len({c is None for c in caches}) > 1:
            raise ValueError("cannot batch sequences with and without a reference crop or key-value cache")
        from lorat.model.v2 import KVCache

        return TrackState(*(torch.cat(parts) for parts in zip(*(s.tensors() for s in states), strict=True)),
                          reference=None if references[0] is None else torch.cat(references),
                          cache=None if caches[0] is None else KVCache.cat(caches))


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


def _crops(frames: Sequence[torch.Tensor], boxes: torch.Tensor, area_factor: float, size: tuple[int, int],
           background: torch.Tensor, min_size: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised SiamFC crops of ``size`` around ``boxes`` with the realised crop parameters."""
    scale, translation = nominal_crop_params(boxes, area_factor, size, min_size)
    crops, scale, translation = crop_frames(frames, scale, translation, size, background)
    return normalize_crops(crops), scale, translation


def init_state(frames: Sequence[torch.Tensor], boxes: torch.Tensor, model: LoRAT | LoRATv2,
               track_cfg: TrackingConfig, autocast_dtype: torch.dtype | None = None,
               kv_cache: bool = True) -> TrackState:
    """Start N sequences: template crops, masks and cached boxes.

    For LoRATv2, phase 2 also crops the first frame around the box as the first reference frame
    (factor ``tracking.reference_area_factor``); with ``kv_cache`` the model encodes the template
    (and the reference) once, here.

    Args:
        frames: N (3, H, W) [0, 255] first frames on the model's device (see
            :func:`to_frame_tensor`); the same frame may appear several times (several targets).
        boxes: (N, 4) xyxy first-frame boxes, valid and inside their frames.
        model: the network (its config decides the crops).
        autocast_dtype, kv_cache: LoRATv2's encoding pass (compute dtype; whether to cache at all).
    """
    cfg = model.cfg
    device = frames[0].device
    boxes = boxes.to(device=device, dtype=geometry_dtype(device))
    background = torch.stack([f.float().mean(dim=(1, 2)) for f in frames])
    template, scale, translation = _crops(frames, boxes, track_cfg.template_area_factor, cfg.template_size,
                                          background)
    mask = template_mask(box_to_crop(boxes, scale, translation), cfg.template_size, cfg.template_grid)
    state = TrackState(template, mask, background, boxes)
    if cfg.family != "loratv2":
        return state
    if cfg.reference_size is not None:
        state.reference = _crops(frames, boxes, track_cfg.reference_area_factor, cfg.reference_size, background,
                                 track_cfg.min_object_size)[0]
    if kv_cache:
        with torch.inference_mode(), _autocast(device, autocast_dtype):
            state.cache = model.encode_template(template, mask)
            if state.reference is not None:
                model.encode_reference(state.reference, state.cache)
    return state


def search_crops(state: TrackState, frames: Sequence[torch.Tensor], model_cfg: ModelConfig,
                 track_cfg: TrackingConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised search crops around the cached boxes, with the realised crop parameters."""
    return _crops(frames, state.box, track_cfg.search_area_factor, model_cfg.search_size, state.background,
                  track_cfg.min_object_size)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_model(model: LoRAT | LoRATv2, state: TrackState, x: torch.Tensor,
              autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One forward pass on cached templates and new search crops (inference mode, optional autocast).

    LoRATv2 with a cache computes only the search tokens; without one it encodes the template (and
    the reference) again in the same pass (the same outputs)."""
    with torch.inference_mode(), _autocast(x.device, autocast_dtype):
        x = x.to(state.template.dtype)
        if state.cache is not None:
            return model.track(x, state.cache)
        return model(state.template, x if state.reference is None else [state.reference, x], state.mask)


def _update_reference(model: LoRATv2, state: TrackState, frames: Sequence[torch.Tensor], score: torch.Tensor,
                      track_cfg: TrackingConfig, autocast_dtype: torch.dtype | None) -> TrackState:
    """LoRATv2 phase 2: each sequence whose score passes ``tracking.reference_threshold`` takes this
    frame, cropped around its new cached box, as its reference (crop, and keys and values)."""
    rows = torch.nonzero(score > track_cfg.reference_threshold).flatten()
    if len(rows) == 0:
        return state
    picked = [frames[i] for i in rows.tolist()]
    crops = _crops(picked, state.box[rows], track_cfg.reference_area_factor, model.cfg.reference_size,
                   state.background[rows], track_cfg.min_object_size)[0]
    reference = state.reference.clone()
    reference[rows] = crops
    cache = state.cache
    if cache is not None:
        with torch.inference_mode(), _autocast(crops.device, autocast_dtype):
            part = cache.select(rows)
            model.encode_reference(crops, part)
        cache = cache.select(torch.arange(len(state), device=rows.device))  # a copy: states stay immutable
        for mine, theirs in zip(cache.keys + cache.values, part.keys + part.values, strict=True):
            mine[rows] = theirs
    return replace(state, reference=reference, cache=cache)


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
            (:mod:`lorat.tracking.assignment`). Off for independent sequences.
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
    if readable is not None:
        keep = readable.to(state.box.device)
        step = StepResult(replace(step.state, box=torch.where(keep[:, None], step.state.box, state.box)),
                          torch.where(keep[:, None], step.box, state.box), torch.where(keep, step.score, 0.0))
    if step.state.reference is not None:
        step.state = _update_reference(model, step.state, frames, step.score, track_cfg, autocast_dtype)
    return step
