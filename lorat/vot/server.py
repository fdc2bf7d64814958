"""``python -m lorat.vot``: LoRAT as a tracker of the VOT toolkit (TraX protocol), answering boxes or masks.

The VOT toolkit (``pip install 'lorat[vot]'``) starts this command for every sequence and talks
to it over TraX, frame by frame, for one object or several. Register it in the workspace's
``trackers.ini`` (``--ini NAME`` prints the entry for this Python and these options):

    [LoRAT]
    label = LoRAT
    protocol = trax
    command = /usr/bin/python3 -m lorat.vot --weights /models/lorat_b224.safetensors
    timeout = 300

then ``vot test LoRAT``, ``vot evaluate --workspace ws LoRAT``, ``vot analysis --workspace ws LoRAT``.

The tracking is that of ``python -m lorat.track``: one model, every object of a sequence in one
batched step, ``lap`` assignment when objects compete (``--no-assignment``: independent objects,
as the official code). Initial regions may be rectangles, polygons or masks (their bounding box);
answers are rectangles (the official integer rounding) or, for objects given as masks (VOTS
stacks) or with ``--output mask``, frame-sized masks: SAM prompted with each box
(``--sam-weights sam_vit_h_4b8939.pth``, one image embedding per frame), or the box filled.
Each answer carries the score as the ``confidence`` property (long-term analyses read it).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorat.errors import LoratError, run_cli
from lorat.options import add_tracker_arguments, tracker_from_arguments

if TYPE_CHECKING:
    from lorat.tracking.tracker import Tracker
    from lorat.vot.masks import BoxMasker

__all__ = ["main", "Start", "Answer", "VotSession", "start_from_mask", "start_from_points", "trackers_ini"]

OUTPUTS = ("auto", "box", "mask")
_INSTALL = "pip install 'lorat[vot]' (vot-toolkit and vot-trax)"
_IDENTIFIER = re.compile(r"[A-Za-z0-9_-]+")  # the toolkit's rule for tracker names
_FILE_OPTIONS = ("--weights", "--config", "--backbone-weights", "--sam-weights")


def _note(message: str) -> None:
    """A line for the toolkit's log (stderr: stdout carries the protocol)."""
    print(message, file=sys.stderr, flush=True)


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


# ----------------------------------------------------------------------------- the session


class VotSession:
    """The tracking side of a TraX session, free of the transport: frames and regions in, answers out.

    Args:
        tracker: the loaded tracker (one batched step per frame for all objects).
        masker: turns boxes into masks for the objects answered with masks.
        output: ``"box"``, ``"mask"``, or ``"auto"`` (masks for objects given as masks, boxes otherwise).
    """

    def __init__(self, tracker: Tracker, masker: BoxMasker, output: str = "auto"):
        if output not in OUTPUTS:
            raise LoratError(f"unknown output {output!r}; use {', '.join(OUTPUTS)}")
        self.tracker = tracker
        self.masker = masker
        self.output = output
        self.wants_mask: list[bool] = []
        self.last: list[Answer] = []

    def _wants_mask(self, start: Start) -> bool:
        return self.output == "mask" or (self.output == "auto" and start.mask is not None)

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
        self.wants_mask = []
        self.tracker.reset()
        results = self.tracker.init(frame, [s.box for s in starts])
        self.last = self._first(frame, starts, [r.box for r in results])
        return self.last

    def frame(self, frame: np.ndarray | None, new: Sequence[Start] = ()) -> list[Answer]:
        """Track every object into ``frame`` (None: unreadable, the last regions with score 0); then
        start the ``new`` objects on it. Answers in the order the objects were given."""
        if not self.last and not new:
            return []
        if frame is None:
            if new:
                raise LoratError("new objects were given on a frame that cannot be read")
            self.last = [Answer(a.box, a.mask, 0.0) for a in self.last]
            return self.last
        answers = self._track(frame) if self.last else []
        if new:
            results = self.tracker.add(frame, [s.box for s in new])
            answers += self._first(frame, new, [r.box for r in results])
        self.last = answers
        return answers

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


# ----------------------------------------------------------------------------- TraX


def _trax() -> Any:
    try:
        import trax
        import trax.server  # noqa: F401  (the Server class lives there)
    except ImportError:
        raise LoratError(f"the VOT integration needs the TraX bindings, which are not installed: {_INSTALL}") from None
    except OSError as err:  # libtrax.so that cannot load
        raise LoratError(f"the TraX library (vot-trax) cannot be loaded: {err}") from None
    return trax


def _read_frame(images: dict, trax: Any) -> tuple[np.ndarray | None, str]:
    """The request's color image as (H, W, 3) uint8 RGB (None if it cannot be read), and its name."""
    import cv2

    image = images.get(trax.ImageChannel.COLOR) if images else None
    if image is None or image.type() != trax.Image.PATH:
        raise LoratError("the toolkit sent no color image file (only color images, given as paths, are supported)")
    path = image.path()
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    return (None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), path


def _start(region: Any, index: int, frame_size: tuple[int, int], trax: Any) -> Start:
    kind = region.type
    if kind == trax.Region.RECTANGLE:
        x, y, w, h = region.bounds()
        return start_from_points([(x, y), (x + w, y + h)], index)
    if kind == trax.Region.POLYGON:
        return start_from_points(list(region), index)
    if kind == trax.Region.MASK:
        return start_from_mask(region.array(), region.offset(), frame_size, index)
    raise LoratError(f"object {index + 1}: an initial region of type {kind!r} cannot be tracked")


def _encode(answer: Answer) -> Any:
    from trax.region import Mask, Rectangle

    if answer.mask is None:
        return Rectangle.create(*answer.box)
    rows, cols = np.flatnonzero(answer.mask.any(axis=1)), np.flatnonzero(answer.mask.any(axis=0))
    if len(rows) == 0:  # nothing left of the object: a one-pixel empty mask
        return Mask.create(np.zeros((1, 1), dtype=np.uint8))
    crop = answer.mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # the frame-sized mask, sent as its bounding crop
    return Mask.create(np.ascontiguousarray(crop, dtype=np.uint8), int(cols[0]), int(rows[0]))


def serve(session: VotSession, multiobject: bool, trax: Any) -> None:
    """Answer the toolkit until it quits. A :class:`LoratError` ends the session with its message."""
    from trax.server import Server

    server = Server([trax.Region.RECTANGLE, trax.Region.POLYGON, trax.Region.MASK], [trax.Image.PATH],
                    [trax.ImageChannel.COLOR], tracker_name="LoRAT",
                    tracker_description="LoRAT (ECCV 2024), lorat implementation", tracker_family="LoRAT",
                    multiobject=multiobject)
    started = False
    try:
        while True:
            try:
                request = server.wait()
            except trax.TraxException as err:
                raise LoratError(f"the TraX connection broke: {err}") from None
            if request.type == trax.TraxStatus.QUIT:
                break
            frame, name = _read_frame(request.image, trax)
            if request.type == trax.TraxStatus.INITIALIZE:
                if frame is None:
                    raise LoratError(f"cannot read the first frame {name}")
                starts = [_start(r, k, frame.shape[:2], trax) for k, (r, _) in enumerate(request.objects)]
                answers, started = session.initialize(frame, starts), True
            else:
                if not started:
                    raise LoratError("the toolkit sent a frame before initialising any object")
                if frame is None and request.objects:
                    raise LoratError(f"new objects were given on a frame that cannot be read: {name}")
                if frame is None:
                    _note(f"warning: cannot read {name}; the last regions are repeated with confidence 0")
                    answers = session.frame(None)
                else:
                    regions = [r for r, _ in request.objects or []]
                    known = len(session.last)
                    new = [_start(r, known + k, frame.shape[:2], trax) for k, r in enumerate(regions)]
                    answers = session.frame(frame, new)
            server.status([(_encode(a), {"confidence": f"{a.score:.4f}"}) for a in answers])
    except LoratError as err:
        server.quit(reason=str(err))
        raise
    server.quit()


# ----------------------------------------------------------------------------- the command


def trackers_ini(name: str, argv: Sequence[str]) -> str:
    """A ``trackers.ini`` entry that runs ``python -m lorat.vot`` with ``argv`` under this Python; file
    arguments become absolute (the toolkit starts trackers in a temporary folder)."""
    args, absolute = list(argv), []
    for k, arg in enumerate(args):
        option, eq, value = arg.partition("=")
        if eq and option in _FILE_OPTIONS and Path(value).exists():
            arg = f"{option}={Path(value).resolve()}"
        elif k and args[k - 1] in _FILE_OPTIONS and Path(arg).exists():
            arg = str(Path(arg).resolve())
        absolute.append(arg)
    command = shlex.join([sys.executable, "-m", "lorat.vot", *absolute])
    return (f"[{name}]\nlabel = {name}\nprotocol = trax\ncommand = {command}\n"
            f"# seconds the toolkit waits for an answer, the model and SAM loading included\ntimeout = 300\n\n")


def _strip_ini(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ini":
            skip = True
        elif not arg.startswith("--ini="):
            out.append(arg)
    return out


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lorat.vot", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--output", choices=OUTPUTS, default="auto",
                   help="answer with boxes, masks, or auto: masks for objects the toolkit gave as masks (VOTS "
                        "stacks), boxes otherwise (default auto)")
    p.add_argument("--sam-weights", type=Path, metavar="FILE",
                   help="Segment Anything checkpoint (sam_vit_{b,l,h}_*.pth; the variant is read from the file) "
                        "that turns boxes into masks (default: the box filled)")
    p.add_argument("--single-object", action="store_true",
                   help="tell the toolkit to run one object per tracker process (default: all objects of a "
                        "sequence in one process, one batched step per frame)")
    p.add_argument("--ini", metavar="NAME",
                   help="print a trackers.ini entry named NAME that runs this command with the other options, "
                        "then exit")
    add_tracker_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser().parse_args(argv)
    if args.ini is not None:
        if not _IDENTIFIER.fullmatch(args.ini):
            raise LoratError(f"--ini {args.ini!r}: a VOT tracker name is letters, digits, '_' and '-'")
        print(trackers_ini(args.ini, _strip_ini(argv)), end="")
        return 0
    if args.sam_weights is not None and not args.sam_weights.is_file():
        raise LoratError(f"SAM checkpoint {args.sam_weights} not found")
    trax = _trax()
    if sys.stdin.isatty():
        raise LoratError("python -m lorat.vot talks TraX to the VOT toolkit, which starts it: register it in "
                         "trackers.ini (print an entry with --ini NAME) and run vot test NAME")
    with redirect_stdout(sys.stderr):  # a stray print must not reach the protocol on stdout
        tracker = tracker_from_arguments(args, say=_note)
        masker = _masker(args, tracker)
        _note(f"LoRAT {tracker.config.model.variant} on {tracker.device} for the VOT toolkit: "
              f"{'one object' if args.single_object else 'all objects'} per process, output {args.output}")
        serve(VotSession(tracker, masker, args.output), multiobject=not args.single_object, trax=trax)
    return 0


def _masker(args: argparse.Namespace, tracker: Tracker) -> BoxMasker:
    from lorat.vot.masks import SamMasker, filled_boxes, load_sam

    if args.sam_weights is not None:
        masker = SamMasker(load_sam(args.sam_weights, tracker.device))
        _note(f"masks: SAM {masker.name} from {args.sam_weights}, prompted with each box")
        return masker
    if args.output != "box":
        _note("note: no --sam-weights given: where masks are asked for, the mask is the box filled "
              "(give a SAM checkpoint for segmentation masks)")
    return filled_boxes


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
