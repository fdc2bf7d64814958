"""Frame sources, video writing and drawing, shared by the CLI and the app.

Sources stream one frame at a time (a video is never held in memory): a video file, a folder of
images (in natural order of their names: ``frame2`` before ``frame10``), a webcam index (``"0"``)
or a stream URL (``rtsp://...``). Frames come out as HWC uint8 **RGB** arrays; an unreadable image
in a folder, or a frame of a video file that cannot be decoded, comes out as ``None`` so the caller
can report it and keep going (frame k stays index k). A video file's frames keep their timestamps
(:meth:`FrameSource.time_of`), which :class:`VideoWriter` can write back (variable frame rates).
"""

from __future__ import annotations

import os
import queue
import re
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from lorat.errors import LoratError
from lorat.files import IMAGE_EXTENSIONS, natural_sorted

__all__ = ["FrameSource", "open_source", "read_rgb", "VideoWriter", "draw_targets", "IMAGE_EXTENSIONS",
           "has_display", "prefetched"]

# Consecutive undecodable frames of a video file skipped before the stream counts as ended. A
# failed read at the end of a file costs microseconds, so the bound can be generous: 10 s at 30 fps.
MAX_SKIPPED_FRAMES = 300
_END = object()
# Timestamps kept per video frame, for the frames decoded last (the reader is at most a few frames behind).
_TIMES_KEPT = 256
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

    A video file's frames keep their timestamps (:meth:`time_of`): a variable-frame-rate video
    (a phone's) is not evenly spaced, and ``fps`` is then only its average rate.
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
    _times: dict[int, float] = field(default_factory=dict)  # frame index -> ms, the last frames decoded

    @property
    def timed(self) -> bool:
        """Whether the frames have their own timestamps (video files)."""
        return self._capture is not None and self.path is not None

    def time_of(self, index: int) -> float | None:
        """When frame ``index`` is shown, in seconds from the start of the video, for a video file's frame
        decoded lately (the last few hundred); None otherwise (folders, cameras, streams, lost frames)."""
        ms = self._times.get(index)
        return None if ms is None else ms / 1000

    def _note_time(self, index: int) -> None:
        if self.timed:
            self._times[index] = self._capture.get(cv2.CAP_PROP_POS_MSEC)
            self._times.pop(index - _TIMES_KEPT, None)

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
                self._note_time(index)
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
        files = natural_sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise LoratError(f"{path}: folder contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        first = next((img for p in files if (img := cv2.imread(str(p), cv2.IMREAD_COLOR)) is not None), None)
        if first is None:
            raise LoratError(f"{path}: none of the {len(files)} images can be read")
        h, w = first.shape[:2]
        return FrameSource(text, w, h, 30.0, len(files), path=path, _files=files)
    capture = cv2.VideoCapture(str(path))
    return _from_capture(capture, text, live=False, path=path)


_HTTP_HINT = ("if it is an MP4/MOV file, the likely cause is that its index (the moov atom) is at its end and the "
              "server does not support range requests, so it cannot be read from the start: rewrite it with "
              "'ffmpeg -i IN.mp4 -c copy -movflags +faststart OUT.mp4' (index first), or download it and track the "
              "file")


def _from_capture(capture: cv2.VideoCapture, name: str, live: bool, path: Path | None = None) -> FrameSource:
    http = name.lower().startswith(("http://", "https://"))
    if not capture.isOpened():
        kind = "camera/stream" if live else "video"
        why = f"unreachable, not a video OpenCV can decode, or, {_HTTP_HINT}" if http else \
            "not a video OpenCV can decode, or unreachable"
        raise LoratError(f"cannot open {kind} {name} ({why})")
    ok, first = capture.read()
    if not ok or first is None:
        capture.release()
        raise LoratError(f"{name}: no frame could be decoded; {_HTTP_HINT}" if http else
                         f"{name}: no frame could be decoded (empty or corrupt video)")
    h, w = first.shape[:2]
    fps = capture.get(cv2.CAP_PROP_FPS)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if not live else 0
    source = FrameSource(name, w, h, fps if 0 < fps < 1000 else 30.0, count if count > 0 else None, path=path,
                         _capture=capture, _first=cv2.cvtColor(first, cv2.COLOR_BGR2RGB))
    source._note_time(0)
    return source


_CRF = 15  # libx264 quality of the .mp4 output: imageio-ffmpeg's quality=7
_TIMEBASE = 90000  # ticks per second of a timed .mp4: the usual rates (24, 25, 30, 30000/1001, 60 fps) exactly


class VideoWriter:
    """Writes RGB frames to a video file one at a time.

    ``.mp4`` is H.264 through the ffmpeg binary of ``imageio-ffmpeg`` (plays in browsers); without
    it, or for ``.avi``, OpenCV writes mp4v / MJPG. Frames are shown ``1 / fps`` s each, unless the
    writer is ``timed`` and is given each frame's time (:meth:`write`): then a ``.mp4`` shows each
    frame at its own time (:class:`_TimedFfmpeg`), so a variable-frame-rate video keeps its timing
    (the ``.avi`` and OpenCV outputs stay at ``fps``).
    """

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int], timed: bool = False):
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
        # H.264 / yuv420p needs even sizes: odd frames get one padding column / row (never rescaled).
        self._even = (size[0] + size[0] % 2, size[1] + size[1] % 2)
        if self.path.suffix.lower() == ".mp4":
            try:
                import imageio_ffmpeg

                if timed:
                    self._ffmpeg = _TimedFfmpeg(imageio_ffmpeg.get_ffmpeg_exe(), self.path, self._even, fps)
                    return
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

    def write(self, frame_rgb: np.ndarray, time: float | None = None) -> None:
        """Append one frame; ``time``: when it is shown, in seconds (used by a timed .mp4; None: ``1 / fps``
        after the previous frame).

        Raises:
            LoratError: the file cannot be written (disk full, ffmpeg stopped); frames already
                written stay in the file once it is closed.
        """
        if frame_rgb.shape[1::-1] != tuple(self.size):  # a stray frame of another size: fit it
            frame_rgb = cv2.resize(frame_rgb, tuple(self.size))
        try:
            self._encode(frame_rgb, time)
        except OSError as err:
            raise LoratError(f"cannot write video {self.path}: {_reason(err)}") from None
        self.frames += 1

    def _encode(self, frame_rgb: np.ndarray, time: float | None = None) -> None:
        if self._ffmpeg is not None:
            h, w = frame_rgb.shape[:2]
            if (w, h) != self._even:
                frame_rgb = cv2.copyMakeBorder(frame_rgb, 0, self._even[1] - h, 0, self._even[0] - w,
                                               cv2.BORDER_REPLICATE)
            if isinstance(self._ffmpeg, _TimedFfmpeg):
                self._ffmpeg.send(frame_rgb, time)
            else:
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


def _ebml(ident: bytes, payload: bytes | int | str = b"", size: int | None = None) -> bytes:
    """One Matroska (EBML) element: its id, its size and, unless ``size`` is given (the payload
    follows), its payload (an unsigned integer or text is encoded)."""
    if isinstance(payload, int):
        payload = payload.to_bytes(max(1, (payload.bit_length() + 7) // 8), "big")
    elif isinstance(payload, str):
        payload = payload.encode()
    size = len(payload) if size is None else size
    length = 1
    while size >= (1 << (7 * length)) - 1:
        length += 1
    return ident + ((1 << (7 * length)) | size).to_bytes(length, "big") + payload


class _TimedFfmpeg:
    """H.264 .mp4 through ffmpeg, each frame shown at its own time (variable frame rate kept).

    ffmpeg reads the frames as a minimal Matroska stream written here: raw RGB frames, each in its
    own cluster with its time and its duration (up to the next frame's time, so a frame is sent
    once the next one arrives), in microseconds. ``-fps_mode passthrough`` keeps those times, on a
    1/90000 s clock. Times start at the first frame's; a missing or non-increasing time is
    ``1 / fps`` after the previous one.
    """

    def __init__(self, exe: str, path: Path, size: tuple[int, int], fps: float):
        self.path, self.size, self.interval = path, size, 1 / fps
        self._first: float | None = None  # source time of the first frame, s
        self._pending: tuple[bytes, float] | None = None  # the last frame and its time, waiting for its duration
        self._previous: float | None = None  # time of the frame before the pending one
        self._log = tempfile.TemporaryFile()
        command = [exe, "-y", "-v", "error", "-f", "matroska", "-i", "-", "-an", "-c:v", "libx264", "-pix_fmt",
                   "yuv420p", "-crf", str(_CRF), "-fps_mode", "passthrough", "-enc_time_base:v", f"1:{_TIMEBASE}",
                   str(path)]
        # In its own process group, as imageio-ffmpeg does: Ctrl-C stops the tracking, not the encoder,
        # which then finishes the file with the frames written so far.
        group = {"creationflags": 0x200} if sys.platform.startswith("win") else {"start_new_session": True}
        try:
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                             stderr=self._log, **group)
        except OSError:
            self._log.close()
            raise
        width, height = size
        video = _ebml(b"\xb0", width) + _ebml(b"\xba", height) + _ebml(b"\x2e\xb5\x24", b"RGB\x18")
        track = (_ebml(b"\xd7", 1) + _ebml(b"\x73\xc5", 1) + _ebml(b"\x83", 1) + _ebml(b"\x86", "V_UNCOMPRESSED")
                 + _ebml(b"\xe0", video))
        header = _ebml(b"\x1a\x45\xdf\xa3", _ebml(b"\x42\x86", 1) + _ebml(b"\x42\xf7", 1) + _ebml(b"\x42\xf2", 4)
                       + _ebml(b"\x42\xf3", 8) + _ebml(b"\x42\x82", "matroska") + _ebml(b"\x42\x87", 4)
                       + _ebml(b"\x42\x85", 2))
        segment = b"\x18\x53\x80\x67\x01\xff\xff\xff\xff\xff\xff\xff"  # unknown size: streamed
        info = _ebml(b"\x15\x49\xa9\x66", _ebml(b"\x2a\xd7\xb1", 1000) + _ebml(b"\x4d\x80", "lorat")
                     + _ebml(b"\x57\x41", "lorat"))  # time unit 1000 ns
        self._send(header + segment + info + _ebml(b"\x16\x54\xae\x6b", _ebml(b"\xae", track)))

    def _time(self, time: float | None) -> float:
        """The frame's time from the first frame's, s, increasing."""
        if self._pending is None:  # the first frame
            self._first = time
            return 0.0
        latest = self._pending[1]
        if time is None or self._first is None or time - self._first <= latest:
            return latest + self.interval
        return time - self._first

    def send(self, frame_rgb: np.ndarray, time: float | None) -> None:
        time = self._time(time)
        if self._pending is not None:
            self._cluster(*self._pending, time - self._pending[1])
            self._previous = self._pending[1]
        self._pending = (np.ascontiguousarray(frame_rgb).tobytes(), time)

    def _cluster(self, data: bytes, time: float, duration: float) -> None:
        """One frame: a cluster at its time holding a block group (the frame, its duration)."""
        stamp = _ebml(b"\xe7", round(time * 1e6))
        block = _ebml(b"\xa1", size=4 + len(data)) + b"\x81" + struct.pack(">hB", 0, 0)  # track 1, offset 0
        length = _ebml(b"\x9b", max(1, round(duration * 1e6)))
        group = _ebml(b"\xa0", size=len(block) + len(data) + len(length))
        cluster = _ebml(b"\x1f\x43\xb6\x75", size=len(stamp) + len(group) + len(block) + len(data) + len(length))
        self._send(cluster + stamp + group + block)
        self._send(data)
        self._send(length)

    def _send(self, data: bytes) -> None:
        try:
            self._process.stdin.write(data)
        except OSError as err:  # ffmpeg stopped: its own message says why
            raise OSError(self._message() or _reason(err)) from None

    def _message(self) -> str:
        """ffmpeg's first error line, once it has stopped."""
        with suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return re.sub(r"^(\[[^]]*\] *)+", "", lines[0]) if lines else ""  # without "[out#0/mp4 @ 0x...]"

    def close(self) -> None:
        """Send the last frame (shown as long as the one before it) and let ffmpeg finish the file."""
        try:
            if self._pending is not None:
                data, time = self._pending
                self._pending = None
                self._cluster(data, time, time - self._previous if self._previous is not None else self.interval)
            with suppress(OSError):
                self._process.stdin.close()
            if self._process.wait() != 0:
                raise OSError(self._message() or f"ffmpeg failed (exit status {self._process.returncode})")
        finally:
            if self._process.poll() is None:
                self._process.kill()
                self._process.wait()
            self._log.close()


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
