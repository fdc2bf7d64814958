"""The benchmark runner: many sequences tracked together, each at its own frame.

One batched forward pass per step (``batch`` sequences, the official evaluator's scheme); a
sequence joins on its *init frame* (the first with the target present; the box checked and
clipped by :func:`lorat.tracking.step.init_boxes`, as ``Tracker.init`` does) and leaves when its last
frame is done, its result files written at once. An unreadable later frame follows the tracker's
one policy (:meth:`lorat.tracking.tracker.Tracker.stream`): the previous box, the state unchanged.
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lorat.data.sequences import DatasetError, TrackingSequence, init_frame
from lorat.errors import LoratError, listed
from lorat.evaluation.results import write_sequence
from lorat.tracking.boxes import xyxy_to_xywh
from lorat.tracking.step import TrackState, init_boxes, init_state, to_frame_tensor, track_step
from lorat.tracking.tracker import ensure_finite
from lorat.video import read_rgb

__all__ = ["track_sequences"]

# Threads reading frames (OpenCV decodes without the GIL): enough to feed a batch of 16 on a GPU.
_READERS = max(4, min(16, os.cpu_count() or 4))


def _init_frames(sequences: list[TrackingSequence]) -> list[int]:
    """The init frame of every sequence, checked before anything is tracked.

    Raises:
        DatasetError: a target is never visible, or an init frame's image file is missing (names them).
    """
    starts = [init_frame(s) for s in sequences]
    never = [s.name for s, start in zip(sequences, starts, strict=True) if start is None]
    if never:
        raise DatasetError(f"target never visible, nothing to initialise on: {listed(never)}")
    missing = [f"{s.name}: {s.frames[start]}" for s, start in zip(sequences, starts, strict=True)
               if not s.frames[start].is_file()]
    if missing:
        raise DatasetError(f"image of the init frame missing for {len(missing)} sequence(s): {listed(missing, 3)}")
    return starts


def _init_box(seq: TrackingSequence, index: int, image: np.ndarray | None) -> torch.Tensor:
    """(1, 4) xyxy float64 init box of frame ``index``, checked and clipped by :func:`init_boxes` as
    ``Tracker.init`` does.

    Raises:
        DatasetError: the frame's image cannot be read, or the box lies outside the frame.
    """
    if image is None:
        raise DatasetError(f"{seq.name}: cannot read {seq.frames[index]}, the frame tracking starts on")
    try:
        return init_boxes(seq.tracks[0].xywh()[index], image.shape[1], image.shape[0])
    except LoratError as err:
        raise DatasetError(f"{seq.name}: the ground truth of frame {index + 1}: {err}") from None


class _Running:
    """A sequence being tracked: where it is, and what it produced so far.

    Frames before the init frame hold ``nan`` placeholders (no box, no time).
    """

    def __init__(self, seq: TrackingSequence, start: int):
        self.seq, self.start, self.index = seq, start, start
        self.boxes: list[np.ndarray] = [np.full(4, np.nan)] * start
        self.times: list[float] = [float("nan")] * start
        self.size: tuple[int, int] | None = None


def track_sequences(model, config, sequences: list[TrackingSequence], folder: Path, offset: float, batch: int,
                    dtype, progress: bool = True) -> None:
    """Track sequences (batched, each at its own frame) and write their result files as they finish.

    Raises:
        DatasetError: a sequence's target is never visible, or its init frame is unreadable.
        LoratError: a result file cannot be written.
    """
    device = model.device
    pending = list(zip(sequences, _init_frames(sequences), strict=True))
    active: list[_Running] = []
    state: TrackState | None = None
    frames_bar = tqdm(total=sum(len(s) for s in sequences), unit="frame", desc=f"{folder.name}", disable=not progress,
                      dynamic_ncols=True)
    seq_bar = tqdm(total=len(pending), unit="seq", desc="sequences", disable=not progress, position=1,
                   dynamic_ncols=True)
    with frames_bar as bar, seq_bar, ThreadPoolExecutor(max_workers=_READERS) as pool:
        while pending or active:
            joining = []
            while pending and len(active) + len(joining) < batch:
                joining.append(_Running(*pending.pop(0)))
            images = list(pool.map(lambda r: read_rgb(r.seq.frames[r.index]), active + joining))
            start = time.perf_counter()
            # sequences joining now: initialise on their init frame (output = the clipped init box)
            new_states = []
            for r, image in zip(joining, images[len(active):], strict=True):
                box = _init_box(r.seq, r.index, image)
                r.size = (image.shape[1], image.shape[0])
                new_states.append(init_state([to_frame_tensor(image, device)], box, model.cfg, config.tracking))
                r.boxes.append(xyxy_to_xywh(box)[0].numpy())
                bar.update(r.start)
            # sequences already running: one batched step
            if active:
                frames = []
                for r, image in zip(active, images[:len(active)], strict=True):
                    if image is None:  # the tracker's policy: previous box, state kept (Tracker.stream)
                        warnings.warn(f"{r.seq.name}: frame {r.index + 1} unreadable; the previous box is repeated",
                                      stacklevel=1)
                        image = np.zeros((r.size[1], r.size[0], 3), np.uint8)
                    frames.append(to_frame_tensor(image, device))
                readable = torch.tensor([image is not None for image in images[:len(active)]])
                step = track_step(model, state, frames, config.tracking, dtype, readable=readable)
                state = step.state
                for r, xywh in zip(active, ensure_finite(xyxy_to_xywh(step.box).cpu().numpy()), strict=True):
                    r.boxes.append(xywh)
            elapsed = time.perf_counter() - start  # each sequence's frame took the whole step (its latency)
            for r in active + joining:
                r.times.append(elapsed)
                r.index += 1
            bar.update(len(active) + len(joining))
            active = active + joining
            state = TrackState.cat(([state] if state is not None else []) + new_states) if active else None
            done = [i for i, r in enumerate(active) if r.index >= len(r.seq)]
            for i in done:
                r = active[i]
                write_sequence(folder, r.seq.name, np.array(r.boxes), np.array(r.times), offset)
                seq_bar.update(1)
            if done:
                keep = [i for i in range(len(active)) if i not in done]
                active = [active[i] for i in keep]
                state = state.select(keep) if keep else None
