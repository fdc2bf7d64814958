"""Frame sources, video writing and drawing, shared by the CLI and the app.

Sources stream one frame at a time (a video is never held in memory): a video file, a folder of
images (sorted by name), a webcam index (``"0"``) or a stream URL (``rtsp://...``). Frames come
out as HWC uint8 **RGB** arrays; an unreadable image in a folder, or a frame of a video file that
cannot be decoded, comes out as ``None`` so the caller can report it and keep going (frame k stays
index k).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lorat.errors import LoratError
from lorat.files import IMAGE_EXTENSIONS

__all__ = ["FrameSource", "open_source", "read_rgb", "VideoWriter", "draw_targets", "IMAGE_EXTENSIONS",
           "has_display", "prefetched"]

# Consecutive undecodable frames of a video file skipped before the stream counts as ended. A
# failed read at the end of a file costs microseconds, so the bound can be generous: 10 s at 30 fps.
MAX_SKIPPED_FRAMES = 300
_END = object()
_COLOURS = [(0, 200, 0), (255, 128, 0), (0, 128, 255), (255, 0, 255), (0, 220, 220), (128, 0, 255)]


def has_display() -> bool:
    """Whether OpenCV windows can open (an X/Wayland display on Linux; assumed elsewhere)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def prefetched(items: Iterable, depth: int = 2) -> Iterator:
    """``items`` produced by a background thread up to ``depth`` ahead: decoding the next frame
    (OpenCV releases the GIL) overlaps with tracking this one. The order is kept; an exception
    raised by ``items`` is raised here, where the item would have come; leaving the loop early
    stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as err:  # handed to the consumer, raised there
            put((_END, err))

    thread = threading.Thread(target=produce, name="lorat-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err = ready.get()
            if item is _END:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        thread.join()


def read_rgb(path: str | os.PathLike) -> np.ndarray | None:
    """An image file as an HxWx3 uint8 RGB array, or None if it cannot be read."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclass
class FrameSource:
    """An opened source. Iterate it for ``(index, frame_or_None)``; call :meth:`close` after.

    Attributes:
        name: the source as given.
        width, height: frame size in px.
        fps: frames per second (30 when the source does not say).
        frame_count: number of frames if known (files, folders), else None (streams).
        path: the video file or image folder read; None for cameras and streams.
        warnings: messages about unreadable or missing frames, appended while iterating.
    """

    name: str
    width: int
    height: int
    fps: float
    frame_count: int | None
    path: Path | None = None
    _capture: cv2.VideoCapture | None = None
    _files: Sequence[Path] = ()
    _first: np.ndarray | None = None
    warnings: list[str] | None = None

    def __iter__(self) -> Iterator[tuple[int, np.ndarray | None]]:
        self.warnings = self.warnings if self.warnings is not None else []
        return self._images() if self._capture is None else self._decoded()

    def _images(self) -> Iterator[tuple[int, np.ndarray | None]]:
        for i, path in enumerate(self._files):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                self.warnings.append(f"frame {i + 1} ({path.name}) is unreadable")
                yield i, None
                continue
            if image.shape[:2] != (self.height, self.width):
                self.warnings.append(f"frame {i + 1} ({path.name}) is {image.shape[1]}x{image.shape[0]}, "
                                     f"not {self.width}x{self.height}; resized")
                image = cv2.resize(image, (self.width, self.height))
            yield i, cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def _decoded(self) -> Iterator[tuple[int, np.ndarray | None]]:
        """Decode the capture. A video file whose frame count is known is read past frames that
        fail to decode (up to :data:`MAX_SKIPPED_FRAMES` in a row): they come out as ``None`` once a
        later frame decodes, so index k stays frame k; failures at the end are just the end.

        This counts one failed read per lost frame, which is what OpenCV's FFmpeg backend does when
        a frame's data is damaged. When the container itself is damaged (an AVI chunk header, an
        MP4 sample table), the demuxer may drop frames without a failed read, and the numbering
        after that point can shift. H.264/HEVC decoders usually conceal damage instead of failing:
        the frames come out, disfigured until the next keyframe."""
        index = 0
        if self._first is not None:
            yield 0, self._first
            self._first = None
            index = 1
        failed = 0  # frames that failed to decode since the last good one
        while True:
            ok, image = self._capture.read()
            if ok and image is not None:
                for missing in range(index, index + failed):
                    self.warnings.append(f"{self.name}: frame {missing + 1} cannot be decoded (damaged video?)")
                    yield missing, None
                index, failed = index + failed, 0
                yield index, cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
                index += 1
            elif self._may_follow(index + failed) and failed < MAX_SKIPPED_FRAMES:
                failed += 1
            else:
                self._check_complete(index)
                return

    def _may_follow(self, position: int) -> bool:
        """Whether the file may hold frames after the one at ``position`` that just failed to decode."""
        return self.path is not None and self.frame_count is not None and position + 1 < self.frame_count

    def _check_complete(self, decoded: int) -> None:
        """Warn when a file ended with frames missing. OpenCV's frame count comes from the container
        (its header, or duration x fps) and is often one more than the frames that decode (the
        original ``assets/box.mp4`` said 456 and decoded 455), so a shortfall of one frame is
        not reported: only a real loss is."""
        if self.frame_count and decoded < self.frame_count - 1:
            self.warnings.append(f"{self.name}: stream ended at frame {decoded} of {self.frame_count} "
                                 f"(truncated or corrupt video)")

    def would_overwrite(self, output: str | os.PathLike) -> bool:
        """Whether writing ``output`` would destroy this source's input: its video file, or an image
        in its folder (an existing frame, or a new image that would become one)."""
        if self.path is None:
            return False
        output = Path(output)
        if self._capture is None:
            return output.resolve().parent == self.path.resolve() and output.suffix.lower() in IMAGE_EXTENSIONS
        return _same_file(output, self.path)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (symbolic and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def open_source(source: str | int | os.PathLike) -> FrameSource:
    """Open a video file, image folder, webcam index or stream URL.

    Raises:
        LoratError: missing path, empty folder, or a source OpenCV cannot decode.
    """
    text = str(source)
    if text.isdigit() or "://" in text:
        capture = cv2.VideoCapture(int(text) if text.isdigit() else text)
        return _from_capture(capture, text, live=True)
    path = Path(text)
    if not path.exists():
        raise LoratError(f"source not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise LoratError(f"{path}: folder contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        first = next((img for p in files if (img := cv2.imread(str(p), cv2.IMREAD_COLOR)) is not None), None)
        if first is None:
            raise LoratError(f"{path}: none of the {len(files)} images can be read")
        h, w = first.shape[:2]
        return FrameSource(text, w, h, 30.0, len(files), path=path, _files=files)
    capture = cv2.VideoCapture(str(path))
    return _from_capture(capture, text, live=False, path=path)


def _from_capture(capture: cv2.VideoCapture, name: str, live: bool, path: Path | None = None) -> FrameSource:
    if not capture.isOpened():
        kind = "camera/stream" if live else "video"
        raise LoratError(f"cannot open {kind} {name} (not a video OpenCV can decode, or unreachable)")
    ok, first = capture.read()
    if not ok or first is None:
        capture.release()
        raise LoratError(f"{name}: no frame could be decoded (empty or corrupt video)")
    h, w = first.shape[:2]
    fps = capture.get(cv2.CAP_PROP_FPS)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if not live else 0
    return FrameSource(name, w, h, fps if 0 < fps < 1000 else 30.0, count if count > 0 else None, path=path,
                       _capture=capture, _first=cv2.cvtColor(first, cv2.COLOR_BGR2RGB))


class VideoWriter:
    """Writes RGB frames to a video file one at a time.

    ``.mp4`` is H.264 through the ffmpeg binary of ``imageio-ffmpeg`` (plays in browsers); without
    it, or for ``.avi``, OpenCV writes mp4v / MJPG.
    """

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int]):
        self.path = Path(path)
        if self.path.is_dir():
            raise LoratError(f"cannot write video {self.path}: it is a folder")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LoratError(f"cannot write video {self.path}: {_reason(err)}") from None
        self.frames = 0
        self.size = size
        self._ffmpeg = None
        self._writer = None
        if self.path.suffix.lower() == ".mp4":
            try:
                import imageio_ffmpeg

                # H.264 / yuv420p needs even sizes: odd frames get one padding column / row (never rescaled).
                self._even = (size[0] + size[0] % 2, size[1] + size[1] % 2)
                self._ffmpeg = imageio_ffmpeg.write_frames(str(self.path), self._even, fps=fps, codec="libx264",
                                                           macro_block_size=1, quality=7, ffmpeg_log_level="error")
                self._ffmpeg.send(None)  # start ffmpeg
                return
            except (ImportError, OSError, RuntimeError):
                self._ffmpeg = None
        fourcc = cv2.VideoWriter_fourcc(*("MJPG" if self.path.suffix.lower() == ".avi" else "mp4v"))
        self._writer = cv2.VideoWriter(str(self.path), fourcc, fps, size)
        if not self._writer.isOpened():
            raise LoratError(f"cannot write video {self.path} (unsupported extension? use .mp4 or .avi)")

    def write(self, frame_rgb: np.ndarray) -> None:
        """Append one frame.

        Raises:
            LoratError: the file cannot be written (disk full, ffmpeg stopped); frames already
                written stay in the file once it is closed.
        """
        if frame_rgb.shape[1::-1] != tuple(self.size):  # a stray frame of another size: fit it
            frame_rgb = cv2.resize(frame_rgb, tuple(self.size))
        try:
            self._encode(frame_rgb)
        except OSError as err:
            raise LoratError(f"cannot write video {self.path}: {_reason(err)}") from None
        self.frames += 1

    def _encode(self, frame_rgb: np.ndarray) -> None:
        if self._ffmpeg is not None:
            h, w = frame_rgb.shape[:2]
            if (w, h) != self._even:
                frame_rgb = cv2.copyMakeBorder(frame_rgb, 0, self._even[1] - h, 0, self._even[0] - w,
                                               cv2.BORDER_REPLICATE)
            self._ffmpeg.send(np.ascontiguousarray(frame_rgb))
        else:
            self._writer.write(cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        """Finish the file (idempotent)."""
        ffmpeg, writer = self._ffmpeg, self._writer
        self._ffmpeg = self._writer = None
        try:
            if ffmpeg is not None:
                ffmpeg.close()
            if writer is not None:
                writer.release()
        except OSError as err:
            raise LoratError(f"cannot finish video {self.path}: {_reason(err)}") from None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(err: OSError) -> str:
    """The first line of an OS error (imageio-ffmpeg appends the whole ffmpeg command to its own)."""
    return err.strerror or str(err).strip().split("\n")[0] or type(err).__name__


def draw_targets(frame_rgb: np.ndarray, boxes: Sequence[Sequence[float]], scores: Sequence[float],
                 lost_threshold: float = 0.3, ids: Sequence[int] | None = None) -> np.ndarray:
    """Draw xywh boxes with id and score on a copy of an RGB frame; lost targets get a red mark."""
    out = frame_rgb.copy()
    thickness = max(2, round(max(out.shape[:2]) / 400))
    for k, (box, score) in enumerate(zip(boxes, scores, strict=True)):
        ident = ids[k] if ids is not None else k + 1
        colour = _COLOURS[(ident - 1) % len(_COLOURS)]
        x, y, w, h = (float(v) for v in box)
        lost = score < lost_threshold or w <= 0 or h <= 0
        p1, p2 = (round(x), round(y)), (round(x + w), round(y + h))
        cv2.rectangle(out, p1, p2, (255, 0, 0) if lost else colour, thickness, cv2.LINE_AA)
        label = f"#{ident} {score:.2f}" + (" LOST" if lost else "")
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        ty = max(p1[1], th + base + 2)
        cv2.rectangle(out, (p1[0], ty - th - base - 2), (p1[0] + tw + 4, ty), (255, 0, 0) if lost else colour, -1)
        cv2.putText(out, label, (p1[0] + 2, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                    cv2.LINE_AA)
        if lost:
            cx, cy = round(x + w / 2), round(y + h / 2)
            cv2.drawMarker(out, (cx, cy), (255, 0, 0), cv2.MARKER_TILTED_CROSS, 16, thickness)
    return out
