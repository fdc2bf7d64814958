"""The tracking side of a VOT session, free of the transport: frames and regions in, answers out.

:class:`VotSession` is what ``python -m lorat.vot`` (:mod:`lorat.vot.server`) runs behind the TraX
protocol: the toolkit's initial regions become :class:`Start` (:func:`start_from_points` for
rectangles and polygons, :func:`start_from_mask` for masks), every frame gives one :class:`Answer`
per object -- a box (the official integer rounding) or a frame-sized mask from a
:class:`~lorat.vot.masks.BoxMasker` -- with the tracker's score. An object added on a later frame
that cannot be tracked (:class:`Refused`: its region lies outside the frame, say) keeps its place
and is answered with an empty region, score 0, on every frame; the others are tracked as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lorat.errors import LoratError

if TYPE_CHECKING:
    from lorat.tracking.tracker import Tracker
    from lorat.vot.masks import BoxMasker

__all__ = ["OUTPUTS", "Start", "Refused", "Answer", "VotSession", "start_from_mask", "start_from_points",
           "check_inside"]

OUTPUTS = ("auto", "box", "mask")  # what objects are answered with (see VotSession)


# ----------------------------------------------------------------------------- regions in and out


@dataclass(frozen=True)
class Start:
    """An object's initial region, as the toolkit gave it.

    Attributes:
        box: (x, y, w, h) in frame pixels (continuous; a mask's pixels span [c, c + 1)).
        mask: the initial mask, frame-sized bool (H, W), when the region was a mask; else None.
    """

    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class Refused:
    """A new object (given on a later frame) that cannot be tracked, and why.

    Attributes:
        reason: the message (``object 4: the initial region ... lies outside the 320x240 frame``).
        mask: whether the toolkit gave its region as a mask (it is then answered with an empty mask
            under ``output="auto"``, as the objects given as masks are).
    """

    reason: str
    mask: bool = False


@dataclass(frozen=True)
class Answer:
    """An object's region in one frame: a box or a frame-sized mask, with the tracker's score.

    Attributes:
        box: (x, y, w, h) in frame pixels: integers (the official rounding) after the first frame.
        mask: (H, W) bool, when the object is answered with a mask; else None.
        score: confidence in [0, 1] (1.0 on the object's first frame, 0.0 on an unreadable frame).
    """

    box: tuple[float, float, float, float]
    mask: np.ndarray | None
    score: float


def start_from_mask(mask: np.ndarray, offset: tuple[int, int], frame_size: tuple[int, int], index: int) -> Start:
    """A mask region (``mask`` placed at ``offset`` = (x, y)) -> its bounding box and frame-sized mask.

    Raises:
        LoratError: the mask has no foreground pixel inside the frame.
    """
    height, width = frame_size
    full = np.zeros((height, width), dtype=bool)
    x, y = offset
    m = np.asarray(mask)[max(-y, 0):, max(-x, 0):] != 0
    m = m[:max(height - max(y, 0), 0), :max(width - max(x, 0), 0)]
    full[max(y, 0):max(y, 0) + m.shape[0], max(x, 0):max(x, 0) + m.shape[1]] = m
    rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
    if len(rows) == 0:
        raise LoratError(f"object {index + 1}: the initial mask is empty (no foreground pixel in the "
                         f"{width}x{height} frame); there is nothing to track")
    box = (float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0]))
    return Start(box, full)


def start_from_points(points: Sequence[tuple[float, float]], index: int) -> Start:
    """A rectangle's corners or a polygon's points -> their bounding box (x, y, w, h).

    Raises:
        LoratError: the region has no area.
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    lo, hi = p.min(axis=0), p.max(axis=0)
    if not np.isfinite(p).all() or (hi - lo <= 0).any():
        raise LoratError(f"object {index + 1}: the initial region {p.tolist()} has no area")
    return Start((float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])))


def check_inside(start: Start, frame_size: tuple[int, int], index: int) -> Start:
    """``start``, if the tracker can start on it in a frame of ``frame_size`` (H, W): its box, clipped to
    the frame, keeps an area (the rule of :func:`lorat.tracking.step.init_boxes`).

    Raises:
        LoratError: the region lies outside the frame.
    """
    import torch

    from lorat.tracking.boxes import clip_xyxy, is_valid_xyxy, xywh_to_xyxy

    height, width = frame_size
    xyxy = clip_xyxy(xywh_to_xyxy(torch.tensor(start.box, dtype=torch.float64)), width, height)
    if not bool(is_valid_xyxy(xyxy)):
        raise LoratError(f"object {index + 1}: the initial region (x, y, w, h) = "
                         f"({', '.join(f'{v:g}' for v in start.box)}) lies outside the {width}x{height} frame")
    return start


# ----------------------------------------------------------------------------- the session


class VotSession:
    """The tracking side of a TraX session, free of the transport: frames and regions in, answers out.

    Args:
        tracker: the loaded tracker (one batched step per frame for all objects).
        masker: turns boxes into masks for the objects answered with masks.
        output: ``"box"``, ``"mask"``, or ``"auto"`` (masks for objects given as masks, boxes otherwise).
        note: where a line goes for each new object refused (the log; default: nowhere).
    """

    def __init__(self, tracker: Tracker, masker: BoxMasker, output: str = "auto",
                 note: Callable[[str], None] | None = None):
        if output not in OUTPUTS:
            raise LoratError(f"unknown output {output!r}; use {', '.join(OUTPUTS)}")
        self.tracker = tracker
        self.masker = masker
        self.output = output
        self.note = note or (lambda message: None)
        self.wants_mask: list[bool] = []  # per tracked object, in the tracker's order
        self.last: list[Answer] = []  # per object, refused ones included, in the toolkit's order
        self.refused: dict[int, Answer] = {}  # object index -> its constant empty answer

    def _wants_mask(self, start: Start | Refused) -> bool:
        given_mask = start.mask if isinstance(start, Refused) else start.mask is not None
        return self.output == "mask" or (self.output == "auto" and given_mask)

    def _first(self, frame: np.ndarray, starts: Sequence[Start], boxes: Sequence[tuple]) -> list[Answer]:
        """The answers on an object's first frame: its region as given (a mask, or the clipped box)."""
        answers = []
        missing = [k for k, s in enumerate(starts) if self._wants_mask(s) and s.mask is None]
        masks = dict(zip(missing, self._masks(frame, [boxes[k] for k in missing]), strict=True))
        for k, (start, box) in enumerate(zip(starts, boxes, strict=True)):
            mask = (start.mask if start.mask is not None else masks[k]) if self._wants_mask(start) else None
            answers.append(Answer(box, mask, 1.0))
        self.wants_mask += [self._wants_mask(s) for s in starts]
        return answers

    def initialize(self, frame: np.ndarray, starts: Sequence[Start]) -> list[Answer]:
        """Start (or restart) on ``frame`` (H, W, 3) uint8 RGB with these objects."""
        if not starts:
            raise LoratError("the toolkit gave no object to track")
        self.wants_mask, self.refused = [], {}
        self.tracker.reset()
        # the toolkit defines the objects: all are tracked as given, even two that overlap
        results = self.tracker.init(frame, [s.box for s in starts], distinct=False)
        self.last = self._first(frame, starts, [r.box for r in results])
        return self.last

    def frame(self, frame: np.ndarray | None, new: Sequence[Start | Refused] = ()) -> list[Answer]:
        """Track every object into ``frame`` (None: unreadable, the last regions with score 0); then
        start the ``new`` objects on it. Answers in the order the objects were given.

        A :class:`Refused` new object is not given to the tracker: it is answered with an empty region
        (a zero box, or an empty mask where masks are answered) and score 0 on this and every later
        frame -- the toolkit wants one answer per object, and an empty region is its "target not
        there", so the other objects go on being tracked.
        """
        if not self.last and not new:
            return []
        if frame is None:
            if new:
                raise LoratError("new objects were given on a frame that cannot be read")
            self.last = [Answer(a.box, a.mask, 0.0) for a in self.last]
            return self.last
        tracked = iter(self._track(frame) if len(self.last) > len(self.refused) else [])
        answers = [self.refused[k] if k in self.refused else next(tracked) for k in range(len(self.last))]
        objects, boxes = self._add(frame, new, len(answers))
        firsts = iter(self._first(frame, [s for s in objects if isinstance(s, Start)], boxes))
        for start in objects:
            if isinstance(start, Refused):
                self.note(f"warning: {start.reason}; this object is not tracked (answered with an empty region, "
                          f"confidence 0)")
                empty = np.zeros(frame.shape[:2], dtype=bool) if self._wants_mask(start) else None
                answer = self.refused[len(answers)] = Answer((0.0, 0.0, 0.0, 0.0), empty, 0.0)
                answers.append(answer)
            else:
                answers.append(next(firsts))
        self.last = answers
        return answers

    def _add(self, frame: np.ndarray, new: Sequence[Start | Refused], known: int
             ) -> tuple[list[Start | Refused], list[tuple]]:
        """Give the tracker the new objects one by one: one it refuses (a box on an object already
        tracked, say) becomes :class:`Refused` alone. Returns the objects and the accepted ones' boxes."""
        objects: list[Start | Refused] = []
        boxes = []
        for k, start in enumerate(new):
            if isinstance(start, Start):
                try:
                    boxes.append(self.tracker.add(frame, [start.box], distinct=False)[0].box)
                except LoratError as err:
                    start = Refused(f"object {known + k + 1}: {err}", mask=start.mask is not None)
            objects.append(start)
        return objects, boxes

    def _track(self, frame: np.ndarray) -> list[Answer]:
        from lorat.evaluation.results import rasterize_xywh

        results = self.tracker.track_all(frame)
        boxes = [r.box for r in results]
        mask_objects = [k for k, wants in enumerate(self.wants_mask) if wants]
        masks = dict(zip(mask_objects, self._masks(frame, [boxes[k] for k in mask_objects]), strict=True))
        rounded = rasterize_xywh(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
        return [Answer(tuple(float(v) for v in rounded[k]), masks.get(k), r.score) for k, r in enumerate(results)]

    def _masks(self, frame: np.ndarray, boxes: Sequence[tuple]) -> list[np.ndarray]:
        """One masker call (one SAM image embedding) for all the boxes of a frame."""
        if not boxes:
            return []
        import torch

        from lorat.tracking.boxes import xywh_to_xyxy

        xyxy = xywh_to_xyxy(torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)).numpy()
        return list(self.masker(frame, xyxy))
