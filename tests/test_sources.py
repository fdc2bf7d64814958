"""Frame sources and the video writer (lorat.video): folder order, sources over HTTP, frame timing."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from lorat.errors import LoratError
from lorat.files import natural_key, natural_sorted
from lorat.video import VideoWriter, open_source

from .conftest import TINY

# ----------------------------------------------------------------------------- image folders


def test_natural_order_of_unpadded_names(tmp_path):
    """``frame1 ... frame12`` are frames 1 to 12, not 1, 10, 11, 12, 2, ..."""
    fixture = sorted((TINY / "sequence").glob("*.png"))[:12]
    for k, path in enumerate(fixture, start=1):
        shutil.copy(path, tmp_path / f"frame{k}.png")
    source = open_source(str(tmp_path))
    frames = [frame for _, frame in source]
    assert len(frames) == 12
    for k, (frame, path) in enumerate(zip(frames, fixture, strict=True)):
        assert np.array_equal(frame, cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)), f"frame {k + 1}"


def test_natural_key():
    names = ["frame10.png", "frame2.png", "frame1.png", "a.png", "frame_3.png", "frame02b.png", "12.png", "9.png"]
    assert sorted(names, key=natural_key) == ["9.png", "12.png", "a.png", "frame1.png", "frame2.png", "frame02b.png",
                                              "frame10.png", "frame_3.png"]
    padded = [f"{k:08d}.png" for k in range(1, 30)]
    assert sorted(padded, key=natural_key) == sorted(padded)  # zero-padded names keep their order


def test_names_equal_in_natural_order_are_refused(tmp_path):
    image = cv2.imread(str(sorted((TINY / "sequence").glob("*.png"))[0]))
    for name in ("frame01.png", "frame1.png", "frame2.png"):
        cv2.imwrite(str(tmp_path / name), image)
    with pytest.raises(LoratError, match="frame01.png and frame1.png have the same number"):
        open_source(str(tmp_path))
    with pytest.raises(LoratError, match="frame01.png and frame1.png"):
        natural_sorted([tmp_path / "frame1.png", tmp_path / "frame01.png"])


# ----------------------------------------------------------------------------- sources over HTTP


class _NoRangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files of one folder whole, always: no range requests (``Range`` is ignored)."""

    folder: Path

    def do_GET(self):  # noqa: N802 (the http.server name)
        path = self.folder / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def no_range_server(tmp_path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder served) of a local HTTP server without range requests."""
    handler = type("Handler", (_NoRangeHandler,), {"folder": tmp_path})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", tmp_path
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _noise_mp4(path: Path, frames: int = 20) -> Path:
    """An mp4v .mp4 of noise (hundreds of kB, more than ffmpeg buffers) with its index (moov) at the
    end, as OpenCV writes it."""
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (160, 120))
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (120, 160, 3), np.uint8))
    writer.release()
    return path


def test_mp4_with_its_index_at_the_end_over_http_without_ranges(no_range_server):
    url, folder = no_range_server
    data = _noise_mp4(folder / "late.mp4").read_bytes()
    assert data.index(b"moov") > data.index(b"mdat") > 0 and len(data) > 100_000  # the index really is at the end
    with pytest.raises(LoratError) as refused:
        open_source(f"{url}/late.mp4")
    message = str(refused.value)
    assert "late.mp4" in message and "range requests" in message and "+faststart" in message
    # the advice works: the same video with its index first is read over the same server
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(folder / "late.mp4"), "-c", "copy",
                    "-movflags", "+faststart", str(folder / "early.mp4")], check=True)
    source = open_source(f"{url}/early.mp4")
    assert sum(1 for _, frame in source if frame is not None) == 20
    source.close()


def test_url_that_cannot_be_opened_names_the_likely_causes():
    """Unreachable here; a late index can also stop a URL from opening, depending on the FFmpeg build."""
    with pytest.raises(LoratError, match=r"cannot open camera/stream http://127.0.0.1:9/none.mp4 \(unreachable, not a "
                                         r"video OpenCV can decode, or, if it is an MP4/MOV file, .*range requests"):
        open_source("http://127.0.0.1:9/none.mp4")


# ----------------------------------------------------------------------------- frame timing


def _segment(path: Path, fps: int, frames: int, first: int) -> Path:
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(path), (128, 96), fps=fps, codec="libx264", macro_block_size=1,
                                         ffmpeg_log_level="error", output_params=["-video_track_timescale", "90000"])
    writer.send(None)
    for k in range(first, first + frames):
        frame = np.full((96, 128, 3), 40, np.uint8)
        frame[30:60, 10 + k % 80:40 + k % 80] = 230  # a square moving right
        writer.send(frame)
    writer.close()
    return path


def vfr_clip(folder: Path) -> Path:
    """A variable-frame-rate .mp4: 1 s at 30 fps, then 1 s at 10 fps (40 frames, 2 s; average 20 fps),
    joined by ffmpeg's concat demuxer without re-encoding."""
    import imageio_ffmpeg

    parts = [_segment(folder / "fast.mp4", 30, 30, 0), _segment(folder / "slow.mp4", 10, 10, 30)]
    (folder / "parts.txt").write_text("".join(f"file '{p.name}'\n" for p in parts))
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "concat", "-safe", "0", "-i",
                    str(folder / "parts.txt"), "-c", "copy", str(folder / "vfr.mp4")], check=True)
    return folder / "vfr.mp4"


def frame_times(path: Path) -> list[float]:
    """Each decoded frame's time in ms (OpenCV's CAP_PROP_POS_MSEC)."""
    capture = cv2.VideoCapture(str(path))
    times = []
    while capture.read()[0]:
        times.append(capture.get(cv2.CAP_PROP_POS_MSEC))
    capture.release()
    return times


def shown_for(times: list[float]) -> float:
    """How long a video is shown, ms: its last frame's time plus the interval before it."""
    return times[-1] + (times[-1] - times[-2])


def test_source_reports_the_frames_times(tmp_path):
    clip = vfr_clip(tmp_path)
    source = open_source(str(clip))
    assert source.timed
    times = [source.time_of(i) for i, _ in source]
    source.close()
    np.testing.assert_allclose(times, [k / 30 for k in range(30)] + [1 + k / 10 for k in range(10)], atol=1e-6)
    folder = open_source(str(TINY / "sequence"))
    assert not folder.timed and folder.time_of(0) is None


def test_timed_writer_keeps_a_variable_frame_rate(tmp_path):
    clip = vfr_clip(tmp_path)
    source = open_source(str(clip))
    with VideoWriter(tmp_path / "out.mp4", source.fps, (source.width, source.height), timed=True) as writer:
        for index, frame in source:
            writer.write(frame, source.time_of(index))
    source.close()
    before, after = frame_times(clip), frame_times(tmp_path / "out.mp4")
    assert len(after) == 40
    np.testing.assert_allclose(after, before, atol=0.5)
    assert shown_for(after) == pytest.approx(shown_for(before), rel=0.05)


def test_timed_writer_keeps_a_constant_rate_and_fills_missing_times(tmp_path):
    """A constant-rate source stays at its rate (29.97 fps on a 1/90000 s clock, exactly); a frame
    without a time, or with one that goes back, comes 1 / fps after the previous one."""
    size, fps = (66, 50), 30000 / 1001
    times = [k / fps for k in range(12)] + [None, 0.1, 14 / fps]
    with VideoWriter(tmp_path / "out.mp4", fps, size, timed=True) as writer:
        for k, t in enumerate(times):
            writer.write(np.full((50, 66, 3), 10 * k, np.uint8), None if t is None else t + 5.0)  # starts at 5 s
    got = frame_times(tmp_path / "out.mp4")
    np.testing.assert_allclose(got, [1000 * k / fps for k in range(15)], atol=0.05)
    capture = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(fps, abs=1e-3)
    assert capture.get(cv2.CAP_PROP_FRAME_WIDTH) == 66
    capture.release()


def test_timed_writer_reports_ffmpeg_errors(tmp_path, monkeypatch):
    """ffmpeg that cannot write its file: one clear LoratError, at the latest when the video is closed."""
    writer = VideoWriter(tmp_path / "missing" / "x" / "out.mp4", 10, (32, 32), timed=True)
    (tmp_path / "missing" / "x").rmdir()  # ffmpeg opens its output only once frames come
    with pytest.raises(LoratError, match="cannot (write|finish) video"):
        for k in range(50):
            writer.write(np.zeros((32, 32, 3), np.uint8), k / 10)
        writer.close()
