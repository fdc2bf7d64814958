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
from lorat.tracking.threads import TUNER
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

    @property
    def done(self) -> bool:
        return self.index >= len(self.seq)

    def advance(self, seconds: float) -> None:
        """The current frame is done, in ``seconds``: move to the next one."""
        self.times.append(seconds)
        self.index += 1

    def image_or_blank(self, image: np.ndarray | None) -> np.ndarray:
        """``image``, or for an unreadable frame a black one of the sequence's size. The tracker's one
        policy (:meth:`lorat.tracking.tracker.Tracker.stream`): the step then repeats the previous box
        and keeps the state."""
        if image is not None:
            return image
        warnings.warn(f"{self.seq.name}: frame {self.index + 1} unreadable; the previous box is repeated",
                      stacklevel=1)
        return np.zeros((self.size[1], self.size[0], 3), np.uint8)


def _start(joining: list[_Running], images: list[np.ndarray | None], model, config, dtype, bar) -> list[TrackState]:
    """Initialise the sequences joining now on their init frame; their output there is the clipped init box."""
    states = []
    for r, image in zip(joining, images, strict=True):
        box = _init_box(r.seq, r.index, image)
        r.size = (image.shape[1], image.shape[0])
        states.append(init_state([to_frame_tensor(image, model.device)], box, model, config.tracking, dtype))
        r.boxes.append(xyxy_to_xywh(box)[0].numpy())
        bar.update(r.start)
    return states


def _step(running: list[_Running], images: list[np.ndarray | None], state: TrackState, model, config,
          dtype) -> TrackState:
    """One batched step of the sequences already running; returns the new state."""
    started = time.perf_counter()
    frames = [to_frame_tensor(r.image_or_blank(image), model.device) for r, image in zip(running, images, strict=True)]
    readable = torch.tensor([image is not None for image in images])
    step = track_step(model, state, frames, config.tracking, dtype, readable=readable)
    for r, xywh in zip(running, ensure_finite(xyxy_to_xywh(step.box).cpu().numpy()), strict=True):
        r.boxes.append(xywh)
    if model.device.type == "cpu":  # per sequence: the batch shrinks as sequences end
        TUNER.record((time.perf_counter() - started) / len(running))
    return step.state


def _retire(active: list[_Running], state: TrackState | None, folder: Path, offset: float, bar
            ) -> tuple[list[_Running], TrackState | None]:
    """Write the result files of the sequences that are done; returns the others and their state."""
    done = [r for r in active if r.done]
    for r in done:
        write_sequence(folder, r.seq.name, np.array(r.boxes), np.array(r.times), offset)
        bar.update(1)
    if not done:
        return active, state
    keep = [i for i, r in enumerate(active) if not r.done]
    return [active[i] for i in keep], (state.select(keep) if keep else None)


def track_sequences(model, config, sequences: list[TrackingSequence], folder: Path, offset: float, batch: int,
                    dtype, progress: bool = True) -> None:
    """Track sequences (batched, each at its own frame) and write their result files as they finish.

    Raises:
        DatasetError: a sequence's target is never visible, or its init frame is unreadable.
        LoratError: a result file cannot be written.
    """
    pending = list(zip(sequences, _init_frames(sequences), strict=True))
    active: list[_Running] = []
    state: TrackState | None = None
    frames_bar = tqdm(total=sum(len(s) for s in sequences), unit="frame", desc=f"{folder.name}", disable=not progress,
                      dynamic_ncols=True)
    seq_bar = tqdm(total=len(pending), unit="seq", desc="sequences", disable=not progress, position=1,
                   dynamic_ncols=True)
    with frames_bar as bar, seq_bar, ThreadPoolExecutor(max_workers=_READERS) as pool:
        while pending or active:
            count = min(len(pending), batch - len(active))
            joining = [_Running(seq, start) for seq, start in pending[:count]]
            del pending[:count]
            images = list(pool.map(lambda r: read_rgb(r.seq.frames[r.index]), active + joining))
            start = time.perf_counter()
            new_states = _start(joining, images[len(active):], model, config, dtype, bar)
            if active:
                state = _step(active, images[:len(active)], state, model, config, dtype)
            elapsed = time.perf_counter() - start  # each sequence's frame took the whole step (its latency)
            active = active + joining
            for r in active:
                r.advance(elapsed)
            bar.update(len(active))
            state = TrackState.cat(([state] if state is not None else []) + new_states) if active else None
            active, state = _retire(active, state, folder, offset, seq_bar)
