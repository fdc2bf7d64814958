"""``python -m lorat.track SOURCE``: track targets in a video, image folder, webcam or stream.

    python -m lorat.track video.mp4 --init 120,80,60,40 --output out.mp4 --save-txt boxes.txt
    python -m lorat.track 0 --show                       # webcam, draw the box(es) with the mouse
    python -m lorat.track frames/ --init 10,10,50,50 --init 200,40,30,30 --save-txt run.txt

Outputs: ``--save-txt PATH`` writes one line per frame, ``x<TAB>y<TAB>w<TAB>h`` (frame 1 = the
init box), and the scores beside it in ``<stem>_scores.txt``; with several targets, one pair
of files per target (``<stem>_1.txt`` ...). Lines are flushed as they are written, so whatever
ends the run (Ctrl-C, a broken stream, an error) leaves every finished frame on disk.
``--output`` writes an annotated video. In the ``--show`` window: ``q`` quits, ``r`` re-selects
the targets, space pauses.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import cv2
import numpy as np
from tqdm import tqdm

from lorat.checkpoint import default_weights, default_weights_notice
from lorat.errors import LoratError, run_cli
from lorat.tracker import Tracker, TrackResult
from lorat.video import FrameSource, VideoWriter, draw_targets, has_display, open_source

__all__ = ["main", "parse_box"]

_WINDOW = "lorat"


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x,y,w,h"`` (commas or spaces) -> floats."""
    parts = text.replace(",", " ").split()
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise LoratError(f"--init expects x,y,w,h (four numbers), got {text!r}")
    return values  # type: ignore[return-value]


def _select_boxes(frame_rgb: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Let the user draw boxes with OpenCV (ENTER/SPACE confirms each, ESC finishes)."""
    print("Draw a box around each target and press ENTER; press ESC when done.")
    rois = cv2.selectROIs(_WINDOW, cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR), showCrosshair=True)
    boxes = [tuple(float(v) for v in r) for r in np.asarray(rois).reshape(-1, 4) if r[2] > 0 and r[3] > 0]
    if not boxes:
        raise LoratError("no box was selected")
    return boxes  # type: ignore[return-value]


class _TextOutputs:
    """Per-target box and score files, one line per frame, flushed every frame."""

    def __init__(self, path: Path | None, targets: int):
        self.files: list[tuple[TextIO, TextIO]] = []
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        for k in range(targets):
            stem = path.with_suffix("") if targets == 1 else path.with_name(f"{path.stem}_{k + 1}")
            box_path = stem.with_suffix(path.suffix or ".txt")
            score_path = stem.with_name(f"{stem.name}_scores.txt")
            self.files.append((open(box_path, "w"), open(score_path, "w")))  # noqa: SIM115 (closed in close())

    @property
    def paths(self) -> list[str]:
        return [f.name for pair in self.files for f in pair]

    def write(self, results: Sequence[TrackResult]) -> None:
        for (boxes, scores), r in zip(self.files, results, strict=True):
            boxes.write("\t".join(f"{v:.4f}" for v in r.box) + "\n")
            scores.write(f"{r.score:.6f}\n")
            boxes.flush()
            scores.flush()

    def close(self) -> None:
        for pair in self.files:
            for f in pair:
                f.close()


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lorat.track", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("source", help="video file, folder of images, webcam index (0) or stream URL")
    p.add_argument("--config", help="model config YAML (not needed with our single-file weights)")
    p.add_argument("--weights", help="our single file, a merged state dict, or an official checkpoint "
                                     "(default: the bundled demo model)")
    p.add_argument("--backbone-weights", help="DINOv2 file, for official trainable-only checkpoints")
    p.add_argument("--init", action="append", type=parse_box, metavar="X,Y,W,H",
                   help="initial box in frame-1 pixels; repeat for several targets (default: draw it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, else float32), float32, float16, bfloat16")
    p.add_argument("--output", type=Path, help="annotated video (.mp4 or .avi)")
    p.add_argument("--save-txt", type=Path, help="box file(s), one x\\ty\\tw\\th line per frame")
    p.add_argument("--show", action="store_true", help="live window (q quit, r re-select, space pause)")
    p.add_argument("--lost-threshold", type=float, default=0.3, help="score under which a target is marked lost")
    p.add_argument("--no-assignment", action="store_true",
                   help="track several targets fully independently (no lap identity assignment)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.show and not has_display():
        raise LoratError("--show needs a display (none found: DISPLAY is unset)")
    if args.max_frames is not None and args.max_frames < 1:
        raise LoratError("--max-frames must be at least 1")
    weights = args.weights or default_weights()
    if not args.weights:
        print(default_weights_notice(weights))
    source = open_source(args.source)  # validate the source before loading the model
    try:
        tracker = Tracker.from_pretrained(weights, args.config, args.backbone_weights, device=args.device,
                                          dtype=args.dtype, assignment=not args.no_assignment)
        return _run(tracker, source, args)
    finally:
        source.close()


def _run(tracker: Tracker, source: FrameSource, args: argparse.Namespace) -> int:
    frames = iter(source)
    _, first = next(frames, (0, None))
    if first is None:
        raise LoratError(f"{source.name}: the first frame cannot be read")
    boxes = args.init
    if boxes is None:
        if not has_display():
            raise LoratError("no --init box given and no display to draw one: pass --init x,y,w,h")
        boxes = _select_boxes(first)
    results = tracker.init(first, boxes)
    previous: np.ndarray | None = first
    n = len(results)
    texts = _TextOutputs(args.save_txt, n)
    writer = VideoWriter(args.output, source.fps, (source.width, source.height)) if args.output else None
    total = min(x for x in (source.frame_count, args.max_frames) if x) if (source.frame_count or args.max_frames) \
        else None
    bar = tqdm(total=total, unit="frame", desc="tracking", disable=args.show, dynamic_ncols=True)
    left = [False] * n
    done, started, stop_reason = 0, time.perf_counter(), None

    def emit(index: int, frame: np.ndarray | None, results: list[TrackResult]) -> str | None:
        """Write one frame's results everywhere; return the key pressed in the window."""
        texts.write(results)
        for k, r in enumerate(results):
            gone = r.box[2] <= 0 or r.box[3] <= 0
            if gone and not left[k]:
                bar.write(f"target {k + 1} left the frame at frame {index + 1}")
            left[k] = gone
        key = None
        if (writer or args.show) and frame is not None:
            drawn = draw_targets(frame, [r.box for r in results], [r.score for r in results], args.lost_threshold)
            if writer:
                writer.write(drawn)
            if args.show:
                key = _show(drawn)
        bar.update(1)
        bar.set_postfix(fps=f"{(index + 1) / (time.perf_counter() - started):.1f}",
                        score=" ".join(f"{r.score:.2f}" for r in results))
        return key

    try:
        key = emit(0, first, results)
        done = 1
        for index, frame in frames:
            if key == "q":
                stop_reason = "stopped by the user"
                break
            if args.max_frames and done >= args.max_frames:
                break
            if key == "r" and previous is not None:
                new = _select_boxes(previous)
                if len(new) == n:
                    tracker.init(previous, new)
                else:
                    bar.write(f"re-selection ignored: select exactly {n} box(es)")
            if frame is None:  # unreadable image: keep the previous boxes, say so
                bar.write(f"warning: frame {index + 1} is unreadable; previous boxes repeated with score 0")
                results = [TrackResult(r.box, 0.0) for r in results]
            else:
                results = tracker.track_all(frame)
                previous = frame
            key = emit(index, frame, results)
            done += 1
    finally:
        bar.close()
        texts.close()
        if writer:
            writer.close()
        if args.show:
            cv2.destroyAllWindows()
    for warning in source.warnings or []:
        print(f"warning: {warning}")
    elapsed = time.perf_counter() - started
    print(f"tracked {n} target(s) over {done} frames in {elapsed:.1f}s ({done / max(elapsed, 1e-9):.1f} FPS)"
          + (f"; {stop_reason}" if stop_reason else ""))
    for path in texts.paths + ([str(writer.path)] if writer else []):
        print(f"wrote {path}")
    return 0


def _show(frame_rgb: np.ndarray) -> str | None:
    """Display a frame; return "q", "r" or None. Space pauses until another key."""
    cv2.imshow(_WINDOW, cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))
    key = cv2.waitKey(1) & 0xFF
    if key == ord(" "):
        key = cv2.waitKey(0) & 0xFF
    return {ord("q"): "q", 27: "q", ord("r"): "r"}.get(key)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
