"""LoRAT web demo: upload a video, draw the target box(es) on the start frame, track.

    python apps/gradio_app.py [--host 0.0.0.0] [--port 7860] [--weights FILE ...] [--device cpu]

Settings: a flag, else the first environment variable set of those listed, else the default.

    --host           LORAT_HOST, GRADIO_SERVER_NAME    127.0.0.1 (0.0.0.0: every network interface)
    --port           LORAT_PORT, GRADIO_SERVER_PORT    7860
    --weights        LORAT_WEIGHTS (comma-separated)   the bundled demo model
    --device         LORAT_DEVICE                      auto
    --dtype, --threads                                 auto, auto: measured while tracking (as every command)
    --max-frames     LORAT_MAX_FRAMES                  3000 (longer videos are trimmed to this many frames from
                                                            the start frame, not refused)
    --max-side       LORAT_MAX_SIDE                    1920 (videos with a longer frame side are refused)
    --max-upload-mb  LORAT_MAX_UPLOAD_MB               200

Models are loaded once at start-up and shared by every request; requests wait in Gradio's
queue. Frames are read and written one at a time, so long videos do not fill memory; the frame
count limit (a longer video is trimmed) and the frame size limit (checked on upload, before a frame
is decoded, and again on Track) bound the time one request holds the worker. A Track whose client
has gone (a closed page, a killed API client, a cancelled job) stops after its current frame, as
Stop does, so it does not keep the next user waiting.

API (``gradio_client``; the boxes and the start frame are kept per client session):
``/load_first_frame(video)``; ``/start_frame(start, video=None)`` (the video of ``/load_first_frame``
when none is given; it clears the boxes); ``/add_typed_box(text)`` (``"x,y,w,h"``, one call per
target; a box (nearly) identical to one already selected is refused); ``/clear_boxes()``;
``/track(video, model_name, threshold)``; ``/stop()``.

Files: each Track request writes into its own folder under one folder of this app,
``$TMPDIR/lorat_app_<pid>_*``. Gradio copies returned files into its cache before serving them,
so only the newest ``KEEP_RESULTS`` request folders are kept; the app's folder is removed when it
stops (Ctrl-C or SIGTERM), and folders of apps that were killed are removed at the next start.
Gradio's cache (uploads, served copies) drops files older than an hour (``delete_cache``).

A bad upload, box or request (an API call with wrong arguments included) is refused with a message
on the page (server paths cut to the file's name) and one ``refused: ...`` line in the server log,
not a traceback; the app keeps serving. The webcam source says on the page when the browser has no
camera or denies access to it. Uses only the public ``lorat`` API; of Gradio it also relies on two
internals, each in one function: its input checks (``_Blocks.preprocess_data``) and its queue's record
of the running events (``_client_gone``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import gradio as gr
import numpy as np

import lorat
from lorat.checkpoint.loader import LoadedModel, load
from lorat.evaluation.results import box_line
from lorat.options import ModelOptions, add_model_arguments, parse_xywh
from lorat.runtime import default_weights, default_weights_notice
from lorat.tracking.step import DUPLICATE_IOU
from lorat.video import FrameSource, VideoWriter, draw_targets, open_source

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "assets" / "box.mp4"
EXAMPLE_BOX = [290.0, 14.0, 308.0, 228.0]  # the box on the example's first frame (assets/box_pseudo_gt.txt)
_STOPS: dict[str, threading.Event] = {}  # session -> "stop the running Track" (set by the Stop button)
_STOPS_LOCK = threading.Lock()
KEEP_RESULTS = 4  # request folders kept; Gradio has its own copy of the files once a request returns
CACHE_LIFETIME_S = 3600  # Gradio's cached uploads and results older than this are deleted
log = logging.getLogger("lorat.app")


@dataclass(frozen=True)
class Limits:
    """What one request may ask: at most ``max_frames`` frames of at most ``max_side`` px on the long side."""

    max_frames: int = 3000
    max_side: int = 1920


class Models:
    """Weight files loaded once (through :func:`lorat.checkpoint.loader.load`, with the app's model
    options) and shared; ``tracker`` is thread-safe and gives each request its own
    :class:`lorat.Tracker` over the shared model, with the compute dtype chosen at load (float16 on CUDA)."""

    def __init__(self, weights: Sequence[str | os.PathLike], options: ModelOptions | None = None):
        self.options = options or ModelOptions()
        self.paths = {Path(w).stem: Path(w) for w in weights}
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        for name in self.paths:  # load at start-up: a bad file fails now, not on the first request
            self.tracker(name)

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def tracker(self, name: str) -> lorat.Tracker:
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = load(dataclasses.replace(self.options, weights=self.paths[name]), say=None)
            loaded = self._loaded[name]
        return lorat.Tracker.from_loaded(loaded)


class ResultFolders:
    """The app's own temp folder, with one sub-folder per Track request; only the newest ``keep`` stay.

    Older folders can go because Gradio serves copies from its cache. Creating one also removes the
    folders of apps that died without cleaning up (``lorat_app_<pid>_*`` whose process is gone).
    """

    PREFIX = "lorat_app_"

    def __init__(self, parent: str | os.PathLike | None = None, keep: int = KEEP_RESULTS):
        parent = Path(parent if parent is not None else tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        _remove_folders_of_dead_apps(parent, self.PREFIX)
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.PREFIX}{os.getpid()}_", dir=parent))
        self.keep = keep
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def new(self) -> Path:
        """A new, empty folder for one request; the oldest beyond ``keep`` are deleted."""
        with self._lock:
            folder = self.root / f"{next(self._numbers):06d}"
            folder.mkdir()
            for old in sorted(self.root.iterdir(), key=lambda p: int(p.name))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            return folder

    def close(self) -> None:
        """Delete every result folder (at exit)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _remove_folders_of_dead_apps(parent: Path, prefix: str) -> None:
    if os.name != "posix":  # os.kill(pid, 0) only probes on POSIX (it terminates on Windows)
        return
    for folder in parent.glob(f"{prefix}*"):
        pid = folder.name[len(prefix):].split("_", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a number no pid can be
        return True
    return True


# ---- user errors: one log line, no server paths -------------------------------------------------

_DIRECTORIES = re.compile(r"(?<![\w.~])/(?:[^/\s]+/)+")  # the /dir/.../ part of an absolute path


def hide_paths(text: str, *paths: str | os.PathLike) -> str:
    """``text`` with server paths cut to their base name: each of ``paths``, then any other ``/dir/.../``."""
    for path in sorted((str(p) for p in paths if p), key=len, reverse=True):
        text = text.replace(path, Path(path).name)
    return _DIRECTORIES.sub("", text)


def _refuse(message: str, *paths: str | os.PathLike) -> gr.Error:
    """The error to raise for an expected user error: paths hidden, logged as one line, no traceback."""
    message = hide_paths(message, *paths)
    log.warning("refused: %s", " ".join(message.split()))
    return gr.Error(message, print_exception=False)


class _Blocks(gr.Blocks):
    """``gr.Blocks`` whose refusal of a bad call is the app's own: Gradio checks each input (a file, a
    number in the slider's range, one of the menu's choices) before calling a handler, and an API call
    with wrong arguments (``client.predict(0, api_name="/load_first_frame")``) fails there with a
    traceback in the log; here it is one ``refused:`` line and a message naming the endpoint's inputs."""

    async def preprocess_data(self, block_fn, *args, **kwargs):  # Gradio's internal step before a handler
        try:
            return await super().preprocess_data(block_fn, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 (every failure here is a bad input; gr.Error included)
            raise _refuse(f"Bad call of /{block_fn.api_name}({_endpoint_inputs(block_fn)}): "
                          f"{_input_error(err)}") from None


def _endpoint_inputs(block_fn) -> str:
    """The API's view of an endpoint's inputs: its handler's parameter names (with a default if any),
    without the session state, e.g. ``start, video=None``."""
    import inspect

    try:
        parameters = list(inspect.signature(block_fn.fn).parameters.values())
    except (TypeError, ValueError):
        return "..."
    names = []
    for parameter, component in zip(parameters, block_fn.inputs, strict=False):
        if not getattr(component, "stateful", False):
            default = "" if parameter.default is inspect.Parameter.empty else f"={parameter.default!r}"
            names.append(parameter.name + default)
    return ", ".join(names)


def _input_error(err: Exception) -> str:
    """What was wrong with an input, in a line: Gradio's message, or pydantic's for a file that is not one."""
    errors = getattr(err, "errors", None)
    if callable(errors):  # pydantic's ValidationError: a file input given something else
        first = (errors() or [{}])[0]
        if "FileData" in str(getattr(err, "title", "")):
            return f"{first.get('input')!r} is not a file (send files as gradio_client.handle_file(path))"
        return str(first.get("msg", err))
    text = getattr(err, "message", None) or str(err)
    expected = [part for part in str(text).split("\n\n") if part.startswith("Expected")]
    return " ".join((expected[0] if expected else str(text)).split())


# ---- handlers ------------------------------------------------------------------------------------

def _empty_state() -> dict:
    return {"boxes": [], "pending": None, "frame": None, "start": 0, "video": None}


def _is_example(video: str) -> bool:
    """Whether an upload is the bundled example (Gradio serves a copy of it under its own path)."""
    path = Path(video)
    return (EXAMPLE.is_file() and path.name == EXAMPLE.name and path.stat().st_size == EXAMPLE.stat().st_size
            and path.read_bytes() == EXAMPLE.read_bytes())


def _stop_event(request: gr.Request | None) -> threading.Event:
    """The Stop flag of the request's browser session (one per session; cleared when a Track starts)."""
    key = getattr(request, "session_hash", None) or "no-session"
    with _STOPS_LOCK:
        return _STOPS.setdefault(key, threading.Event())


def _client_gone() -> Callable[[], bool]:
    """For the running request: a check whether its client has gone, so its Track can stop (see ``track``).

    Gradio runs a sync handler in a worker thread that nothing stops: when the client's event stream
    closes (a closed page, a killed API client) the queue only marks the event not ``alive``, and a
    cancelled event (``/cancel``, ``Job.cancel()``) leaves the running jobs while its thread goes on.
    Outside Gradio's queue (a direct call) the check is always False.
    """
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or not event_id or not hasattr(queue, "active_jobs"):
        return lambda: False

    def gone() -> bool:
        for job in list(queue.active_jobs):
            for event in job or ():
                if getattr(event, "_id", None) == event_id:
                    return not getattr(event, "alive", True)
        return True  # no longer among the running jobs: cancelled

    return gone


def stop_tracking(request: gr.Request) -> str:
    """Ask the session's running Track to stop after its current frame (its results so far are kept)."""
    _stop_event(request).set()
    return "Stopping after the current frame..."


def _open_video(video: str, max_side: int) -> FrameSource:
    """Open an uploaded video; refuse one that cannot be read or whose frames exceed ``max_side``."""
    probe = cv2.VideoCapture(video)  # the size from the headers, before a (possibly huge) frame is decoded
    try:
        _check_size(int(probe.get(cv2.CAP_PROP_FRAME_WIDTH)), int(probe.get(cv2.CAP_PROP_FRAME_HEIGHT)), max_side)
    finally:
        probe.release()
    try:
        source = open_source(video)
    except lorat.LoratError as err:
        raise _refuse(f"Cannot read this video: {err}", video) from None
    try:
        _check_size(source.width, source.height, max_side)
    except gr.Error:
        source.close()
        raise
    return source


def _check_size(width: int, height: int, max_side: int) -> None:
    if max(width, height) > max_side:
        raise _refuse(f"The video is {width}x{height}; this demo takes frames of at most {max_side} pixels on "
                      f"the long side. Please downscale it (e.g. with ffmpeg's scale filter) and upload it again.")


def make_load_fn(limits: Limits) -> Callable[..., tuple]:
    """The handler of a new upload, refusing videos over ``limits.max_side``."""

    def load_first_frame(video: str | None):
        """New video: show its first frame for drawing; reset the boxes (the example comes with its box);
        the start-frame slider spans the frames that can be tracked."""
        if not video:
            return None, _empty_state(), "Upload a video, record one, or pick the example.", gr.update(value=0)
        source = _open_video(video, limits.max_side)
        try:
            _, frame = next(iter(source))
            count = source.frame_count
            info = f"{source.width}x{source.height}, {count or '?'} frames at {source.fps:.0f} fps. "
        finally:
            source.close()
        if frame is None:
            raise _refuse("The first frame of this video cannot be decoded.", video)
        state = {**_empty_state(), "frame": frame, "video": video}
        if count and count > limits.max_frames:
            info += f"Longer than the {limits.max_frames} frames this demo tracks: it will be trimmed. "
        if _is_example(video):
            state["boxes"] = [list(EXAMPLE_BOX)]
            message = info + "The example's box is selected: press Track, or clear it and click your own."
        else:
            message = info + "Click two opposite corners of the target (repeat for more targets)."
        slider = gr.update(value=0, maximum=max((count or limits.max_frames) - 1, 1))  # a slider needs max > min
        return _draw_selection(frame, state["boxes"], None), state, message, slider

    return load_first_frame


def make_start_fn(limits: Limits) -> Callable[..., tuple]:
    """The handler of the start-frame slider: show that frame for drawing; tracking will start there."""

    def show_start_frame(start: float, video: str | None = None, state: dict | None = None
                         ) -> tuple[np.ndarray, dict, str]:
        """Frame ``start`` (from 0) of ``video``, or of the session's video when none is given (an API
        call after ``/load_first_frame``); the boxes are cleared, to be drawn on that frame."""
        video = video or (state or {}).get("video")
        if not video:
            raise _refuse("Load a video first.")
        index = int(start or 0)
        source = _open_video(video, limits.max_side)
        try:
            frame = next((f for i, f in itertools.islice(source, index, index + 1)), None)
        finally:
            source.close()
        if frame is None:
            raise _refuse(f"Frame {index + 1} of this video cannot be decoded; pick another start frame.")
        state = {**_empty_state(), "frame": frame, "start": index, "video": video}
        return frame.copy(), state, (f"Start frame {index + 1}: click two opposite corners of each target there "
                                     f"(tracking starts on this frame).")

    return show_start_frame


def _draw_selection(frame: np.ndarray, boxes: list, pending) -> np.ndarray:
    out = draw_targets(frame, boxes, [1.0] * len(boxes)) if boxes else frame.copy()
    if pending is not None:
        cv2.drawMarker(out, tuple(int(v) for v in pending), (255, 220, 0), cv2.MARKER_CROSS, 18, 2)
    return out


def _boxes_text(boxes: list) -> str:
    return f"{len(boxes)} target(s): " + "; ".join(
        f"#{i + 1} {', '.join(f'{v:.0f}' for v in b)}" for i, b in enumerate(boxes))


def _check_new_box(box: list[float], boxes: list) -> None:
    """Refuse a box identical, or nearly (IoU above ``DUPLICATE_IOU``, the tracker's own limit), to one
    already selected: the same object would be tracked twice (and the Track refused)."""
    if not boxes:
        return
    import torch
    from torchvision.ops import box_iou

    from lorat.tracking.boxes import xywh_to_xyxy

    xyxy = xywh_to_xyxy(torch.tensor([box, *boxes], dtype=torch.float64))
    for k, overlap in enumerate(box_iou(xyxy[:1], xyxy[1:])[0].tolist()):  # the tracker's own IoU
        if overlap > DUPLICATE_IOU:
            raise _refuse(f"That box is (nearly) the same as target #{k + 1} (IoU {overlap:.2f} with it), so it "
                          f"is not added: each target is tracked once. Clear the boxes to start over.")


def click(state: dict, evt: gr.SelectData) -> tuple[np.ndarray, dict, str]:
    """Two clicks make one box (corners in either order)."""
    if state.get("frame") is None:
        raise _refuse("Load a video first.")
    index = getattr(evt, "index", None)
    if not isinstance(index, (list, tuple)) or len(index) != 2:  # e.g. /click called through the API
        raise _refuse("Click two opposite corners on the image (through the API, use /add_typed_box).")
    x, y = (float(v) for v in index)
    if state["pending"] is None:
        state["pending"] = (x, y)
        message = f"First corner at ({x:.0f}, {y:.0f}); click the opposite corner."
    else:
        (x0, y0), state["pending"] = state["pending"], None
        box = [min(x0, x), min(y0, y), abs(x - x0), abs(y - y0)]
        if box[2] < 2 or box[3] < 2:
            raise _refuse("That box is too small; click two opposite corners.")
        _check_new_box(box, state["boxes"])
        state["boxes"].append(box)
        message = _boxes_text(state["boxes"])
    return _draw_selection(state["frame"], state["boxes"], state["pending"]), state, message


def parse_box(text: str, width: int, height: int) -> tuple[list[float], bool]:
    """A typed ``x,y,w,h`` box clipped to a ``width`` x ``height`` frame, and whether clipping changed it.

    Raises:
        gr.Error: not four finite numbers, a size that is not positive, or no overlap with the frame.
    """
    values = list((parse_xywh(text) if isinstance(text, str) else None) or ())
    if len(values) != 4 or not all(map(math.isfinite, values)) or values[2] <= 0 or values[3] <= 0:
        raise _refuse("Type the box as four finite numbers x,y,w,h with a positive width and height.")
    x, y, w, h = values
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        raise _refuse(f"The box {x:g},{y:g},{w:g},{h:g} lies outside the {width}x{height} frame.")
    box = [x0, y0, x1 - x0, y1 - y0]
    return box, box != values


def add_typed_box(text: str, state: dict) -> tuple[np.ndarray, dict, str]:
    """A box typed as x,y,w,h (for precise placement); only a valid box, not one of those already
    selected, reaches the state."""
    frame = state.get("frame")
    if frame is None:
        raise _refuse("Load a video first.")
    box, clipped = parse_box(text, frame.shape[1], frame.shape[0])
    _check_new_box(box, state["boxes"])
    state["boxes"].append(box)
    message = _boxes_text(state["boxes"]) + (" (the last box was clipped to the frame)" if clipped else "")
    return _draw_selection(frame, state["boxes"], state["pending"]), state, message


def clear_boxes(state: dict) -> tuple[np.ndarray | None, dict, str]:
    """Forget the boxes (and a pending first corner)."""
    state["boxes"], state["pending"] = [], None
    frame = state.get("frame")
    return (frame.copy() if frame is not None else None), state, "Boxes cleared."


def _score_plot(scores: np.ndarray, threshold: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6), dpi=100)
    for k in range(scores.shape[1]):
        ax.plot(scores[:, k], linewidth=1.5, label=f"target #{k + 1}")
    ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"lost below {threshold:.2f}")
    ax.set(xlabel="frame", ylabel="score", ylim=(0, 1.02), xlim=(0, max(len(scores) - 1, 1)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def _track_frames(tracker: lorat.Tracker, source: FrameSource, boxes: list, writer: VideoWriter, threshold: float,
                  start: int, count: int, stop: threading.Event, progress: gr.Progress,
                  gone: Callable[[], bool] = lambda: False) -> tuple[list[tuple], list[list[float]]]:
    """Track ``boxes`` from frame ``start`` for at most ``count`` frames of ``source`` into ``writer``:
    rows (frame, target, x, y, w, h, score), scores. Stops early when ``stop`` is set or the client is
    ``gone()`` (both checked after each frame).

    An undecodable frame repeats the previous boxes with score 0 and the last picture (line k = frame k).
    """
    rows, scores, drawn = [], [], None
    frames = (frame for _, frame in itertools.islice(source, start, start + count))
    try:
        for result in tracker.stream(frames, boxes):
            if result.frame is not None:
                drawn = draw_targets(result.frame, [r.box for r in result.targets],
                                     [r.score for r in result.targets], threshold)
            writer.write(drawn)
            number = start + result.index + 1
            rows.extend((number, k + 1, *r.box, r.score) for k, r in enumerate(result.targets))
            scores.append([r.score for r in result.targets])
            progress((result.index + 1) / count, desc=f"frame {number}")
            if stop.is_set() or gone():
                break
    except lorat.LoratError as err:
        raise _refuse(str(err)) from None
    return rows, scores


def _write_box_files(out: Path, rows: list[tuple], targets: int) -> list[str]:
    """One pytracking text file per target and a CSV of every row."""
    files = []
    for k in range(targets):
        path = out / (f"boxes_{k + 1}.txt" if targets > 1 else "boxes.txt")
        path.write_text("".join(box_line(r[2:6]) + "\n" for r in rows if r[1] == k + 1))
        files.append(str(path))
    with open(out / "boxes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame", "target", "x", "y", "w", "h", "score"])
        w.writerows([r[0], r[1], *box_line(r[2:6]).split("\t"), f"{r[6]:.4f}"] for r in rows)
    return files + [str(out / "boxes.csv")]


def make_track_fn(models: Models, limits: Limits, results: ResultFolders) -> Callable[..., tuple]:
    """The Track handler; its files go to a new folder of ``results``."""

    def track(video: str | None, state: dict, model_name: str, threshold: float, request: gr.Request = None,
              progress=gr.Progress()):  # noqa: B008 (Gradio injects the progress tracker this way)
        """Track every selected target from the start frame; Stop ends it early, keeping what is done."""
        if not video:
            raise _refuse("Upload a video or pick the example first.")
        state = state or {}
        boxes = state.get("boxes") or []
        if not boxes:
            raise _refuse("Select at least one target: click two corners on the first frame.")
        start = int(state.get("start") or 0)
        source = _open_video(video, limits.max_side)
        left = (source.frame_count - start) if source.frame_count else limits.max_frames
        count = min(left, limits.max_frames)
        stop, gone = _stop_event(request), _client_gone()
        stop.clear()
        tracker = models.tracker(model_name)
        out = results.new()
        try:
            with VideoWriter(out / "tracked.mp4", source.fps, (source.width, source.height)) as writer:
                rows, scores = _track_frames(tracker, source, boxes, writer, threshold, start, max(count, 1), stop,
                                             progress, gone)
        finally:
            source.close()
        if gone():  # nobody to answer: say so in the log and free the worker for the next request
            log.info("cancelled: the client left; tracking stopped at frame %d (of frames %d-%d)",
                     start + len(scores), start + 1, start + count)
            raise gr.Error("The client left; tracking stopped.", print_exception=False)
        if not scores:
            raise _refuse(f"No frame of this video could be decoded from frame {start + 1}.")
        files = _write_box_files(out, rows, len(boxes)) + [str(out / "tracked.mp4")]
        scores = np.array(scores)
        lost = int((scores[1:] < threshold).any(axis=1).sum())
        first, last = start + 1, start + len(scores)
        message = (f"Tracked {len(boxes)} target(s) over {len(scores)} frames ({first}-{last}); "
                   f"{lost} frame(s) with a target under the threshold.")
        if stop.is_set():
            message += f" Stopped at frame {last} by the user; the results so far are below."
        elif left > limits.max_frames:
            message += f" Trimmed: this demo tracks at most {limits.max_frames} frames from the start frame."
        return str(out / "tracked.mp4"), _score_plot(scores, threshold), files, message

    return track


# The webcam source fails in the browser only (no camera, access denied, a page that is not https or
# localhost): Gradio logs it to the console and shows nothing. This page-load script wraps
# getUserMedia and writes what went wrong into the note under the video input (#webcam-note).
WEBCAM_NOTE_JS = """
() => {
  const show = (text) => {
    const box = document.getElementById("webcam-note");
    const line = document.getElementById("webcam-note-text");
    if (!box || !line) return;
    line.textContent = text;
    box.style.display = text ? "" : "none";
  };
  const explain = (err) => {
    const name = (err && err.name) || "";
    if (["NotFoundError", "DevicesNotFoundError", "OverconstrainedError"].includes(name))
      return "Webcam: no camera was found. Connect one, or upload a video instead.";
    if (["NotAllowedError", "PermissionDeniedError", "SecurityError"].includes(name))
      return "Webcam: access to the camera was denied. Allow it in the browser's site settings (the icon "
        + "in the address bar) and reload the page, or upload a video instead.";
    if (["NotReadableError", "TrackStartError", "AbortError"].includes(name))
      return "Webcam: the camera is in use by another program or could not be started.";
    return "Webcam: the camera could not be opened (" + (name || "error") + ": "
      + ((err && err.message) || err) + ").";
  };
  show("");
  const media = navigator.mediaDevices;
  if (!media || !media.getUserMedia) {  // only a secure page (https or localhost) has cameras
    document.addEventListener("click", (event) => {
      if (event.target.closest && event.target.closest("#video-input button[aria-label='Capture from camera']"))
        show("Webcam: the browser offers cameras to secure pages only (https:// or localhost); "
          + "upload a video instead.");
    }, true);
    return;
  }
  const open = media.getUserMedia.bind(media);
  media.getUserMedia = async (constraints) => {
    try {
      const stream = await open(constraints);
      show("");
      return stream;
    } catch (err) {
      show(explain(err));
      throw err;
    }
  };
}
"""


def build_app(models: Models, limits: Limits, results: ResultFolders, note: str = "") -> gr.Blocks:
    """The Blocks app; ``note`` is shown under the title (e.g. which model is loaded)."""
    with _Blocks(title="LoRAT tracker", delete_cache=(CACHE_LIFETIME_S // 2, CACHE_LIFETIME_S)) as demo:
        gr.Markdown("# LoRAT visual object tracker\nUpload a video (or pick the example), click two opposite "
                    "corners of the target on the first frame, press **Track**." + (f"\n\n{note}" if note else ""))
        state = gr.State(_empty_state())
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Video (upload or record with the webcam)", sources=["upload", "webcam"],
                                 elem_id="video-input")
                # filled by WEBCAM_NOTE_JS when the camera fails
                gr.HTML('<p id="webcam-note-text" role="alert"></p>', elem_id="webcam-note")
                if EXAMPLE.is_file():
                    gr.Examples([[str(EXAMPLE)]], inputs=[video], label="Example (OpenCV's box.mp4, box included)")
                start = gr.Slider(0, 1, value=0, step=1, label="Start frame (move it to start, or re-initialise, "
                                  "on a later frame)", elem_id="start-frame")
                first = gr.Image(label="Start frame: click two corners per target", interactive=False,
                                 elem_id="first-frame")
                with gr.Row():
                    typed = gr.Textbox(label="or type a box x,y,w,h", scale=3, elem_id="typed-box")
                    add = gr.Button("Add box", scale=1, elem_id="add-box")
                    clear = gr.Button("Clear boxes", scale=1)
                with gr.Row():
                    model = gr.Dropdown(models.names, value=models.names[0], label="Model")
                    threshold = gr.Slider(0, 1, value=0.3, step=0.05, label="Lost-target threshold")
                with gr.Row():
                    run = gr.Button("Track", variant="primary", elem_id="track", scale=3)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
                status = gr.Markdown(elem_id="status")
            with gr.Column():
                result = gr.Video(label="Tracked video", elem_id="result-video")
                plot = gr.Plot(label="Score over time")
                downloads = gr.File(label="Downloads (boxes: pytracking text and CSV; video)", file_count="multiple",
                                    elem_id="downloads")
        video.change(make_load_fn(limits), video, [first, state, status, start], api_name="load_first_frame")
        start.input(make_start_fn(limits), [start, video, state], [first, state, status], api_name="start_frame",
                    trigger_mode="always_last")  # the user's moves only (not the reset on upload), the latest wins
        first.select(click, state, [first, state, status], api_name="click",
                     api_visibility="private")  # clicks on the image only; the API adds boxes with /add_typed_box
        add.click(add_typed_box, [typed, state], [first, state, status], api_name="add_typed_box")
        clear.click(clear_boxes, state, [first, state, status], api_name="clear_boxes")
        run.click(make_track_fn(models, limits, results), [video, state, model, threshold],
                  [result, plot, downloads, status], concurrency_limit=1, api_name="track")
        stop.click(stop_tracking, None, status, api_name="stop", queue=False)
        demo.load(None, js=WEBCAM_NOTE_JS, api_visibility="private")
    return demo


# ---- settings and start-up -----------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return value


# setting: (environment variables, first found wins; conversion; default). A flag beats all of them.
_ENVIRONMENT: dict[str, tuple[tuple[str, ...], Callable[[str], object], object]] = {
    "host": (("LORAT_HOST", "GRADIO_SERVER_NAME"), str, "127.0.0.1"),
    "port": (("LORAT_PORT", "GRADIO_SERVER_PORT"), _port, 7860),
    "weights": (("LORAT_WEIGHTS",), lambda text: [w for w in text.split(",") if w], []),
    "device": (("LORAT_DEVICE",), str, "auto"),
    "max_frames": (("LORAT_MAX_FRAMES",), _positive_int, 3000),
    "max_side": (("LORAT_MAX_SIDE",), _positive_int, 1920),
    "max_upload_mb": (("LORAT_MAX_UPLOAD_MB",), _positive_int, 200),
}


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Settings from flags, else the environment (``_ENVIRONMENT``), else defaults; a bad value exits 2."""
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(description="LoRAT web demo (settings: flag > environment > default)")
    p.add_argument("--host", help="address to serve on (LORAT_HOST, GRADIO_SERVER_NAME; 127.0.0.1)")
    p.add_argument("--port", type=_port, help="port (LORAT_PORT, GRADIO_SERVER_PORT; 7860)")
    add_model_arguments(p, ("weights", "device", "dtype", "threads"), weights={
        "nargs": "+", "help": "weight files, several give a model menu (LORAT_WEIGHTS, comma-separated; the bundled "
                              "demo model)"}, device={"default": None})
    p.add_argument("--max-frames", type=_positive_int,
                   help="frames tracked per request; a longer video is trimmed to this many frames from the "
                        "start frame, not refused (LORAT_MAX_FRAMES; 3000)")
    p.add_argument("--max-side", type=_positive_int,
                   help="videos with a longer frame side are refused (LORAT_MAX_SIDE; 1920)")
    p.add_argument("--max-upload-mb", type=_positive_int, help="upload size limit (LORAT_MAX_UPLOAD_MB; 200)")
    args = p.parse_args(argv)
    for name, (variables, convert, default) in _ENVIRONMENT.items():
        if getattr(args, name) is None:
            setattr(args, name, _from_environment(p, env, variables, convert, default))
    return args


def _from_environment(parser: argparse.ArgumentParser, env: Mapping[str, str], variables: Sequence[str],
                      convert: Callable[[str], object], default: object) -> object:
    for variable in variables:
        if env.get(variable):
            try:
                return convert(env[variable])
            except argparse.ArgumentTypeError as err:
                parser.error(f"{variable}: {err}")
    return default


def _log_to_stderr() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s lorat.app: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _stop_on_sigterm() -> None:
    """SIGTERM (docker stop, kill) stops the server like Ctrl-C, so the clean-up in ``main`` runs."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _log_to_stderr()
    note = ""
    try:
        if not args.weights:
            args.weights = [str(default_weights())]
            print(default_weights_notice(Path(args.weights[0])))
            note = (f"Model: the bundled demo model `{Path(args.weights[0]).name}`, a small CPU model trained "
                    f"for this demo, not the paper's (see the README for the official weights).")
        models = Models(args.weights, ModelOptions.from_args(args, weights=None))
    except lorat.LoratError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = ResultFolders()
    try:
        demo = build_app(models, Limits(args.max_frames, args.max_side), results, note)
        demo.queue(max_size=32, default_concurrency_limit=1)
        _stop_on_sigterm()
        demo.launch(server_name=args.host, server_port=args.port, max_file_size=f"{args.max_upload_mb}mb",
                    show_error=False)
    finally:
        results.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
