"""``python -m lorat.track SOURCE``: track targets in a video, image folder, webcam or stream.

    python -m lorat.track video.mp4 --init 120,80,60,40 --output out.mp4 --save-txt boxes.txt
    python -m lorat.track 0 --show                       # webcam, draw the box(es) with the mouse
    python -m lorat.track frames/ --init 10,10,50,50 --init 200,40,30,30 --save-txt run.txt

Outputs: ``--save-txt PATH`` writes one line per frame to PATH exactly, ``x<TAB>y<TAB>w<TAB>h``
(frame 1 = the init box), and the scores beside it in ``<stem>_scores.txt``; with several
targets, one pair of files per target (``<stem>_1<suffix>``, ``<stem>_1_scores.txt`` ...).
``--output`` writes an annotated video (.mp4 or .avi); from a video file, an .mp4 shows every
frame at its own time, so a variable-frame-rate video keeps its timing. An image folder is read
in natural order (``frame2`` before ``frame10``). Boxes may start outside the frame
(``--init -5,10,50,50``); they are clipped to it. One box per object: two boxes that overlap
with IoU above 0.9 are refused.

Outputs are checked before the model loads (a folder, an unwritable place, the source itself or
an image in the source folder, two outputs with one name: one ``error:`` line) and created only
once the first frame is initialised, so a run that fails at start-up leaves existing files as
they were. Lines are flushed as they are written, so whatever ends the run (Ctrl-C, a broken
stream, a full disk, non-finite model outputs) leaves every finished frame on disk. A frame that
cannot be read or decoded repeats the previous boxes with score 0, keeping line k = frame k.
In the ``--show`` window: ``q`` quits, ``r`` re-selects the targets, space pauses.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import cv2
import numpy as np
from tqdm import tqdm

from lorat.errors import LoratError, run_cli
from lorat.evaluation.results import box_line
from lorat.options import add_tracker_arguments, parse_xywh
from lorat.video import FrameSource, VideoWriter, draw_targets, has_display, open_source, prefetched

if TYPE_CHECKING:  # torch is imported once the arguments are parsed: --help stays instant
    from lorat.tracking.tracker import Tracker, TrackResult

__all__ = ["main", "parse_box"]

_WINDOW = "lorat"
_NEGATIVE_VALUE = re.compile(r"-\.?\d")


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x,y,w,h"`` (commas or spaces) -> floats."""
    values = parse_xywh(text)
    if values is None:
        raise LoratError(f"--init expects x,y,w,h (four numbers), got {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise LoratError(f"--init {text!r}: the coordinates must be finite numbers (no nan or inf)")
    return values  # type: ignore[return-value]


def _attach_negative_values(argv: Sequence[str]) -> list[str]:
    """``--init -5,10,50,50`` -> ``--init=-5,10,50,50`` (argparse would read the value as an option)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--init" and _NEGATIVE_VALUE.match(arg):
            out[-1] = f"--init={arg}"
        else:
            out.append(arg)
    return out


def _output_path(text: str) -> Path:
    """An output file argument; a trailing slash names a folder, which cannot be written as a file."""
    if text.endswith(("/", os.sep)):
        raise LoratError(f"{text} names a folder; give a file name")
    return Path(text)


def _select_boxes(frame_rgb: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Let the user draw boxes with OpenCV (ENTER/SPACE confirms each, ESC finishes)."""
    print("Draw a box around each target and press ENTER; press ESC when done.")
    rois = cv2.selectROIs(_WINDOW, cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR), showCrosshair=True)
    boxes = [tuple(float(v) for v in r) for r in np.asarray(rois).reshape(-1, 4) if r[2] > 0 and r[3] > 0]
    if not boxes:
        raise LoratError("no box was selected")
    return boxes  # type: ignore[return-value]


# ----------------------------------------------------------------------------- output files


def _text_paths(path: Path | None, targets: int) -> list[tuple[Path, Path]]:
    """(box file, score file) per target: ``path`` itself for one target, ``<stem>_<k><suffix>``
    for several; the scores beside each box file in ``<stem>_scores.txt``."""
    if path is None:
        return []
    boxes = [path] if targets == 1 else [path.with_name(f"{path.stem}_{k + 1}{path.suffix}") for k in range(targets)]
    return [(b, b.with_name(f"{b.stem}_scores.txt")) for b in boxes]


def _check_outputs(args: argparse.Namespace, targets: int, source: FrameSource) -> None:
    """Refuse outputs that would destroy the input or each other, or that cannot be written."""
    paths = [p for pair in _text_paths(args.save_txt, targets) for p in pair]
    paths += [args.output] if args.output else []
    in_folder = "or add a frame to " if source.path is not None and source.path.is_dir() else ""
    seen: dict[Path, Path] = {}
    for path in paths:
        if source.would_overwrite(path):
            raise LoratError(f"{path} would overwrite {in_folder}the source {source.name}; write the results elsewhere")
        key = path.resolve()
        if key in seen:
            raise LoratError(f"{path} is named more than once by --output and --save-txt "
                             f"(as {seen[key]} and {path}); give them different names")
        seen[key] = path
        _check_writable(path)


def _check_writable(path: Path) -> None:
    """Fail now if ``path`` cannot be created, before the model loads; leaves no trace and does not
    change an existing file."""
    if path.is_dir():
        raise LoratError(f"cannot write {path}: {path} is a folder; give a file name")
    missing = [d for d in reversed(path.parents) if not d.exists()]
    existed = path.exists() or path.is_symlink()
    try:
        for folder in missing:
            folder.mkdir()
        with open(path, "a"):  # append mode: an existing file is not truncated
            pass
    except OSError as err:
        raise LoratError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if not existed:
            with suppress(OSError):
                path.unlink()
        for folder in reversed(missing):
            with suppress(OSError):
                folder.rmdir()


def _create(path: Path) -> TextIO:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w")  # noqa: SIM115 (closed in _Outputs.close())
    except OSError as err:
        raise LoratError(f"cannot write {path}: {err.strerror or err}") from None


def _write_line(file: TextIO, line: str) -> None:
    try:
        file.write(line + "\n")
        file.flush()
    except OSError as err:
        raise LoratError(f"cannot write {file.name}: {err.strerror or err}") from None


class _Outputs:
    """The run's files: per-target box and score files (one line per frame, flushed every frame)
    and the annotated video. Created when tracking starts, not before."""

    def __init__(self, args: argparse.Namespace, targets: int, source: FrameSource):
        self.texts: list[tuple[TextIO, TextIO]] = []
        self.video: VideoWriter | None = None
        try:
            if args.output:
                self.video = VideoWriter(args.output, source.fps, (source.width, source.height), timed=source.timed)
            for box_path, score_path in _text_paths(args.save_txt, targets):
                self.texts.append((_create(box_path), _create(score_path)))
        except BaseException:
            self.close(quiet=True)
            raise

    @property
    def paths(self) -> list[str]:
        return [f.name for pair in self.texts for f in pair] + ([str(self.video.path)] if self.video else [])

    def write(self, results: Sequence[TrackResult]) -> None:
        if not self.texts:
            return
        for (boxes, scores), r in zip(self.texts, results, strict=True):
            _write_line(boxes, box_line(r.box))
            _write_line(scores, f"{r.score:.6f}")

    def close(self, quiet: bool = False) -> None:
        """Close every file; ``quiet`` (the run already failed) drops errors so the first one is reported."""
        failure: LoratError | None = None
        for f in (f for pair in self.texts for f in pair):
            try:
                f.close()
            except OSError as err:
                failure = failure or LoratError(f"cannot write {f.name}: {err.strerror or err}")
        if self.video is not None:
            try:
                self.video.close()
            except LoratError as err:
                failure = failure or err
        if failure is not None and not quiet:
            raise failure


# ----------------------------------------------------------------------------- the command


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lorat.track", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("source", help="video file, folder of images, webcam index (0) or stream URL")
    p.add_argument("--init", action="append", type=parse_box, metavar="X,Y,W,H",
                   help="initial box in frame-1 pixels; repeat for several targets (default: draw it)")
    p.add_argument("--output", type=_output_path, help="annotated video (.mp4 or .avi)")
    p.add_argument("--save-txt", type=_output_path, help="box file(s), one x\\ty\\tw\\th line per frame")
    p.add_argument("--show", action="store_true", help="live window (q quit, r re-select, space pause)")
    p.add_argument("--lost-threshold", type=float, default=0.3, help="score under which a target is marked lost")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    add_tracker_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
    if args.show and not has_display():
        raise LoratError("--show needs a display (none found: DISPLAY is unset)")
    if args.max_frames is not None and args.max_frames < 1:
        raise LoratError("--max-frames must be at least 1")
    source = open_source(args.source)  # validate the source and the outputs before loading the model
    try:
        _check_outputs(args, len(args.init) if args.init else 1, source)
        from lorat.tracking.tracker import tracker_from_arguments  # torch loads only now: --help stays instant

        return _run(tracker_from_arguments(args), source, args)
    finally:
        source.close()


def _first_boxes(first: np.ndarray | None, source: FrameSource, args: argparse.Namespace) -> list:
    """The boxes to start on: ``--init``, or drawn on the first frame in a window."""
    if args.init is not None or first is None:
        return args.init or []
    if not has_display():
        raise LoratError("no --init box given and no display to draw one: pass --init x,y,w,h")
    boxes = _select_boxes(first)
    _check_outputs(args, len(boxes), source)
    return boxes


def _run(tracker: Tracker, source: FrameSource, args: argparse.Namespace) -> int:
    frames = prefetched(frame for _, frame in source)  # the next frame decodes while this one is tracked
    try:
        return _track(tracker, frames, source, args)
    finally:
        frames.close()  # stops the decoding thread before the source is closed


def _frame_total(source: FrameSource, args: argparse.Namespace) -> int | None:
    """How many frames the run will take, when known (for the progress bar)."""
    known = [x for x in (source.frame_count, args.max_frames) if x]
    return min(known) if known else None


class _Emitter:
    """Writes one frame's results everywhere (files, video, window, progress bar) and notes targets
    that leave the frame and frames that cannot be read."""

    def __init__(self, outputs: _Outputs, bar: tqdm, targets: int, args: argparse.Namespace, source: FrameSource):
        self.outputs, self.bar, self.args, self.source = outputs, bar, args, source
        self.left = [False] * targets
        self.started = time.perf_counter()

    def __call__(self, index: int, frame: np.ndarray | None, results: list[TrackResult]) -> str | None:
        """Returns the key pressed in the window, if any."""
        self.outputs.write(results)
        self._note_departures(index, results)
        if frame is None:
            self.bar.write(f"warning: frame {index + 1} is unreadable; previous boxes repeated with score 0")
        key = None
        if (self.outputs.video or self.args.show) and frame is not None:
            drawn = draw_targets(frame, [r.box for r in results], [r.score for r in results], self.args.lost_threshold)
            if self.outputs.video:
                self.outputs.video.write(drawn, self.source.time_of(index))  # a video file's own timing
            if self.args.show:
                key = _show(drawn)
        self.bar.update(1)
        self.bar.set_postfix(fps=f"{(index + 1) / (time.perf_counter() - self.started):.1f}",
                             score=" ".join(f"{r.score:.2f}" for r in results))
        return key

    def _note_departures(self, index: int, results: list[TrackResult]) -> None:
        for k, r in enumerate(results):
            gone = r.box[2] <= 0 or r.box[3] <= 0
            if gone and not self.left[k]:
                self.bar.write(f"target {k + 1} left the frame at frame {index + 1}")
            self.left[k] = gone


def _track(tracker: Tracker, frames: Iterator[np.ndarray | None], source: FrameSource,
           args: argparse.Namespace) -> int:
    first = next(frames, None)
    if first is None:
        raise LoratError(f"{source.name}: the first frame cannot be read")
    stream = tracker.stream(itertools.chain([first], frames), _first_boxes(first, source, args))
    results = next(stream)  # the targets are initialised (a bad box stops here, before any output exists)
    n = len(results.targets)
    outputs = _Outputs(args, n, source)  # only now: a failed start leaves existing files alone
    bar = tqdm(total=_frame_total(source, args), unit="frame", desc="tracking", disable=args.show, dynamic_ncols=True)
    emit = _Emitter(outputs, bar, n, args, source)
    done, stop_reason, finished = 0, None, False
    previous: np.ndarray = first
    try:
        while True:
            key = emit(results.index, results.frame, results.targets)
            done += 1
            if results.frame is not None:
                previous = results.frame
            if key == "q":
                stop_reason = "stopped by the user"
                break
            if args.max_frames and done >= args.max_frames:
                break
            if key == "r":
                _reselect(tracker, previous, n, bar)
            results = next(stream, None)
            if results is None:
                break
        finished = True
    finally:
        bar.close()
        outputs.close(quiet=not finished)
        if args.show:
            cv2.destroyAllWindows()
        if not finished and done and outputs.paths:
            print(f"kept {done} frame(s) in {', '.join(outputs.paths)}")
    for warning in source.warnings or []:
        print(f"warning: {warning}")
    elapsed = time.perf_counter() - emit.started
    print(f"tracked {n} target(s) over {done} frames in {elapsed:.1f}s ({done / max(elapsed, 1e-9):.1f} FPS)"
          + (f"; {stop_reason}" if stop_reason else ""))
    for path in outputs.paths:
        print(f"wrote {path}")
    return 0


def _reselect(tracker: Tracker, frame: np.ndarray, n: int, bar: tqdm) -> None:
    """Let the user draw the targets again on the last frame (``r`` in the window)."""
    new = _select_boxes(frame)
    if len(new) != n:
        bar.write(f"re-selection ignored: select exactly {n} box(es)")
        return
    try:
        tracker.init(frame, new)
    except LoratError as err:  # e.g. two boxes on one object: the targets tracked so far go on
        bar.write(f"re-selection ignored: {err}")


def _show(frame_rgb: np.ndarray) -> str | None:
    """Display a frame; return "q", "r" or None. Space pauses until another key."""
    cv2.imshow(_WINDOW, cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))
    key = cv2.waitKey(1) & 0xFF
    if key == ord(" "):
        key = cv2.waitKey(0) & 0xFF
    return {ord("q"): "q", 27: "q", ord("r"): "r"}.get(key)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
