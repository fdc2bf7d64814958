"""The Gradio demo: driven in headless Chromium (Playwright) and through gradio_client."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from lorat.checkpoint.loader import load_model, save_model
from lorat.files import bundled_weights
from lorat.tracking.tracker import Tracker
from lorat.video import VideoWriter

from .conftest import ROOT, TINY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
README = ROOT / "README.md"
pytest.importorskip("gradio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _folders_with_results(tmp: Path) -> list[Path]:
    """Folders holding the app's own result files (Gradio's cache, ``gradio/``, is not the app's)."""
    return sorted({p.parent for p in tmp.rglob("tracked.mp4") if "gradio" not in p.relative_to(tmp).parts})


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app serving the official-tiny model (the menu's first) and the bundled demo model (the README's
    API example names it), and a 16-frame clip.

    The app's temp dir (``TMPDIR``) is a fresh folder so its files can be counted; its output is
    collected in ``log`` (read all along, so a full pipe never blocks the app).
    """
    root = tmp_path_factory.mktemp("app")
    tmp = tmp_path_factory.mktemp("app_tmp")
    from lorat.config import load_config

    model, cfg = load_model(TINY / "lorat_trainable.safetensors", load_config(TINY / "config.yaml"),
                            TINY / "dinov2_backbone.pth")
    weights = save_model(model, cfg, root / "tiny.safetensors")
    clip = root / "clip.mp4"
    with VideoWriter(clip, 10, (320, 240)) as writer:
        for path in sorted((TINY / "sequence").glob("*.png")):
            writer.write(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
    proc, url, log, reader = _start_app(["--weights", str(weights), str(bundled_weights()), "--max-frames", "100"],
                                        tmp)
    yield {"url": url, "clip": clip, "weights": weights, "tmp": tmp, "log": log}
    proc.terminate()  # SIGTERM: the app removes its result folders on the way out
    proc.wait(timeout=30)
    reader.join(timeout=10)
    assert _folders_with_results(tmp) == [], "the app left result files behind after SIGTERM"


def _start_app(args: list[str], tmp: Path):
    """Start apps/gradio_app.py on a free port; return (process, url, output lines, reader thread)."""
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", TMPDIR=str(tmp))
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen([sys.executable, "apps/gradio_app.py", "--device", "cpu", "--port", str(port), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url, log, reader
        except OSError:
            if proc.poll() is not None:
                reader.join(timeout=10)
                raise RuntimeError("".join(log)) from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the app did not start")


def _expected_boxes(weights, clip, box):
    tracker = Tracker.from_pretrained(weights, device="cpu")
    capture = cv2.VideoCapture(str(clip))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    return np.array([r.targets[0].box for r in tracker.stream(frames, box)])


def _assert_video_plays(page, selector: str) -> None:
    """The ``<video>`` under ``selector`` decodes (no MediaError) and its time advances when played."""
    video = f"{selector} video"
    page.locator(video).wait_for(timeout=60_000)
    page.wait_for_function("s => { const v = document.querySelector(s); return v.error || v.readyState >= 2; }",
                           arg=video, timeout=60_000)
    error = page.evaluate("s => { const e = document.querySelector(s).error; return e && e.code; }", video)
    assert not error, f"the browser cannot play {video} (MediaError code {error})"
    page.evaluate("s => { const v = document.querySelector(s); v.muted = true; return v.play(); }", video)
    page.wait_for_function("s => document.querySelector(s).currentTime > 0", arg=video, timeout=30_000)
    assert page.locator(selector).get_by_text("Video not playable").count() == 0


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_browser_upload_draw_track_download(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app["url"])
        example = page.locator(".gallery-item")  # the bundled example (assets/box.mp4)
        example.first.click()
        page.get_by_text(re.compile(r"640x480, \d+ frames")).wait_for(timeout=60_000)
        _assert_video_plays(page, "#video-input")
        page.locator("#typed-box textarea, #typed-box input").first.fill("290,14,308,228")  # the example's box
        page.locator("#add-box").click()
        page.get_by_text(re.compile(r"same as target #1 \(IoU 1\.00")).first.wait_for(timeout=30_000)
        assert page.get_by_text("2 target(s)").count() == 0
        page.locator("#video-input button[aria-label='Clear']").first.click()
        page.locator("#video-input input[type=file]").set_input_files(str(app["clip"]))
        page.get_by_text("320x240").wait_for(timeout=60_000)
        image = page.locator("#first-frame img")
        image.wait_for(timeout=60_000)
        page.wait_for_function("() => document.querySelector('#first-frame img').naturalWidth > 0")
        natural = page.evaluate("() => document.querySelector('#first-frame img').naturalWidth")
        bbox = image.bounding_box()
        scale = bbox["width"] / natural
        for x, y in ((76, 77), (116, 115)):  # the fixture's init box, corner to corner
            image.click(position={"x": (x + 0.5) * scale, "y": (y + 0.5) * scale})
            page.wait_for_timeout(700)
        page.get_by_text("1 target(s)").wait_for(timeout=30_000)
        page.locator("#track").click()
        link = page.locator("#downloads a[download=\"boxes.txt\"]")
        link.first.wait_for(timeout=180_000)
        _assert_video_plays(page, "#result-video")
        text = page.request.get(link.first.get_attribute("href")).text()
        browser.close()
    boxes = np.loadtxt(text.splitlines())
    assert boxes.shape == (16, 4)
    np.testing.assert_allclose(boxes[0], [76, 77, 40, 38], atol=1.0)
    np.testing.assert_allclose(boxes, _expected_boxes(app["weights"], app["clip"], boxes[0]), atol=0.01)


def _session(url, clip, box):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    client.predict(handle_file(str(clip)), api_name="/load_first_frame")
    client.predict(box, api_name="/add_typed_box")
    return client


def test_two_requests_at_once(app):
    from gradio_client import handle_file

    boxes = {"a": "76,77,40,38", "b": "100,60,50,50"}
    results = {}

    def run(key):
        client = _session(app["url"], app["clip"], boxes[key])
        out = client.predict(handle_file(str(app["clip"])), "tiny", 0.3, api_name="/track")
        results[key] = out

    threads = [threading.Thread(target=run, args=(k,)) for k in boxes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(results) == {"a", "b"}
    for key, out in results.items():
        files = out[2]
        txt = next(Path(f) for f in files if Path(f).name == "boxes.txt")
        got = np.loadtxt(txt)
        init = [float(v) for v in boxes[key].split(",")]
        np.testing.assert_allclose(got, _expected_boxes(app["weights"], app["clip"], init), atol=0.01)


def test_bad_inputs_show_errors_and_the_app_keeps_serving(app, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(app["url"], verbose=False)
    fake = tmp_path / "not_a_video.mp4"
    fake.write_text("hello")
    with pytest.raises(AppError, match="Cannot read this video") as error:
        client.predict(handle_file(str(fake)), api_name="/load_first_frame")
    assert "not_a_video.mp4" in str(error.value)
    assert str(app["tmp"]) not in str(error.value) and "gradio" not in str(error.value)  # no server paths
    for box in ("900,900,10,10", "nan,10,20,20", "10,10,inf,20"):
        with pytest.raises(AppError, match="outside the 320x240 frame|finite"):
            _session(app["url"], app["clip"], box)
    client = Client(app["url"], verbose=False)
    with pytest.raises(AppError, match="Select at least one target"):
        client.predict(handle_file(str(app["clip"])), "tiny", 0.3, api_name="/track")
    with pytest.raises(AppError, match="x,y,w,h"):
        _session(app["url"], app["clip"], "1,2,3")
    ok = _session(app["url"], app["clip"], "76,77,40,38")  # still serving
    assert ok.predict(handle_file(str(app["clip"])), "tiny", 0.3, api_name="/track")[3].startswith("Tracked 1")
    deadline = time.time() + 10  # the fixture's reader thread may be a moment behind
    while not any("refused: Cannot read this video" in line for line in app["log"]) and time.time() < deadline:
        time.sleep(0.2)
    refused = [line for line in app["log"] if "refused: Cannot read this video" in line]
    assert len(refused) == 1 and "not_a_video.mp4" in refused[0]
    assert not any("Traceback" in line for line in app["log"])  # expected errors: one line each in the log


def test_a_video_with_huge_frames_is_refused_at_upload(app, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    wide = tmp_path / "wide.mp4"
    with VideoWriter(wide, 10, (2000, 16)) as writer:
        writer.write(np.zeros((16, 2000, 3), np.uint8))
    with pytest.raises(AppError, match=r"2000x16.*1920"):
        Client(app["url"], verbose=False).predict(handle_file(str(wide)), api_name="/load_first_frame")


@pytest.mark.slow
def test_result_folders_stay_bounded(app, tmp_path):
    from gradio_client import handle_file

    short = tmp_path / "short.mp4"
    with VideoWriter(short, 10, (320, 240)) as writer:
        for path in sorted((TINY / "sequence").glob("*.png"))[:3]:
            writer.write(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
    client = _session(app["url"], short, "76,77,40,38")
    for _ in range(7):
        out = client.predict(handle_file(str(short)), "tiny", 0.3, api_name="/track")
        assert out[3].startswith("Tracked 1") and Path(out[0]).is_file()
    assert 1 <= len(_folders_with_results(app["tmp"])) <= 4


def test_reinitialise_on_a_later_frame(app):
    """The start-frame slider: track from frame 11 with a box drawn there (frames numbered as in the video)."""
    from gradio_client import Client, handle_file

    client = Client(app["url"], verbose=False)
    client.predict(handle_file(str(app["clip"])), api_name="/load_first_frame")
    client.predict(10, api_name="/start_frame")  # on the session's video
    client.predict("70,70,40,38", api_name="/add_typed_box")
    video, _, files, message = client.predict(handle_file(str(app["clip"])), "tiny", 0.3, api_name="/track")
    assert "over 6 frames (11-16)" in message
    got = np.loadtxt(next(Path(f) for f in files if Path(f).name == "boxes.txt"))
    capture, frames = cv2.VideoCapture(str(app["clip"])), []
    while (read := capture.read())[0]:
        frames.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
    tracker = Tracker.from_pretrained(app["weights"], device="cpu")
    expected = np.array([r.targets[0].box for r in tracker.stream(frames[10:], (70, 70, 40, 38))])
    np.testing.assert_allclose(got, expected, atol=0.01)


def test_stop_keeps_the_frames_tracked_so_far(app, tmp_path):
    from gradio_client import handle_file

    long = tmp_path / "long.mp4"  # 160 frames, over the app's --max-frames 100: trimmed when not stopped
    paths = sorted((TINY / "sequence").glob("*.png"))
    with VideoWriter(long, 10, (320, 240)) as writer:
        for i in range(160):
            writer.write(cv2.cvtColor(cv2.imread(str(paths[i % len(paths)])), cv2.COLOR_BGR2RGB))
    client = _session(app["url"], long, "76,77,40,38")
    out = client.predict(handle_file(str(long)), "tiny", 0.3, api_name="/track")
    assert "over 100 frames (1-100)" in out[3] and "Trimmed" in out[3]
    job = client.submit(handle_file(str(long)), "tiny", 0.3, api_name="/track")
    deadline = time.time() + 60
    while not job.status().progress_data and not job.done() and time.time() < deadline:
        time.sleep(0.05)  # until the first frames are reported
    client.predict(api_name="/stop")
    message = job.result(timeout=120)[3]
    stopped = int(re.search(r"Stopped at frame (\d+)", message).group(1))
    assert 1 <= stopped < 100
    assert len(np.loadtxt(next(Path(f) for f in job.result()[2] if Path(f).name == "boxes.txt"))) == stopped


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
@pytest.mark.slow
def test_readme_screenshots_bundled_model_example_and_webcam(tmp_path):
    """The real app (bundled demo model) on the bundled example with its pre-filled box; the webcam
    source streams Chromium's fake camera. LORAT_SCREENSHOTS=apps/ writes the README pictures."""
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("LORAT_SCREENSHOTS") or tmp_path)
    proc, url, log, reader = _start_app([], tmp_path)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream", "--no-first-run", "--disable-background-networking"])
            context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                          permissions=["camera", "microphone"])
            page = context.new_page()
            page.goto(url)
            page.locator(".gallery-item").first.click()
            page.get_by_text("The example's box is selected").wait_for(timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots / "screenshot_before.png"), full_page=True)
            page.locator("#track").click()
            page.locator('#downloads a[download="boxes.txt"]').first.wait_for(timeout=300_000)
            _assert_video_plays(page, "#result-video")
            page.wait_for_timeout(1500)
            page.screenshot(path=str(shots / "screenshot_after.png"), full_page=True)
            # the webcam source: Chromium's fake camera streams into the input's <video>
            page.goto(url)  # a fresh page: the input empty, its sources shown
            page.locator("#video-input button[aria-label='Capture from camera']").first.click()
            page.locator("#video-input").get_by_text("Click to Access Webcam").first.click()
            page.wait_for_function("() => Array.from(document.querySelectorAll('#video-input video'))"
                                   ".some(v => v.srcObject && v.readyState >= 2 && v.videoWidth > 0)", timeout=60_000)
            assert not page.locator("#webcam-note").is_visible()  # a camera: no note
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        reader.join(timeout=10)
    assert (shots / "screenshot_after.png").stat().st_size > 10_000


def _add_typed_box(page, box: str) -> None:
    """Type one box into the page and add it (the only target)."""
    page.locator("#typed-box textarea, #typed-box input").first.fill(box)
    page.locator("#add-box").click()
    page.get_by_text("1 target(s)").wait_for(timeout=30_000)


@pytest.mark.slow  # a second browser session: the default suite keeps one
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_browser_stop_trim_and_reinitialise(app, tmp_path):
    """In the page: a 160-frame upload is trimmed to the app's 100 frames; Stop ends a second run early;
    the start-frame field moves tracking to frame 151 with a box drawn there."""
    from playwright.sync_api import sync_playwright

    long = tmp_path / "long.mp4"
    paths = sorted((TINY / "sequence").glob("*.png"))
    with VideoWriter(long, 10, (320, 240)) as writer:
        for i in range(160):
            writer.write(cv2.cvtColor(cv2.imread(str(paths[i % len(paths)])), cv2.COLOR_BGR2RGB))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app["url"])
        page.locator("#video-input input[type=file]").set_input_files(str(long))
        page.get_by_text("it will be trimmed").wait_for(timeout=60_000)
        _add_typed_box(page, "76,77,40,38")
        page.locator("#track").click()
        page.get_by_text(re.compile(r"over 100 frames \(1-100\).*Trimmed")).wait_for(timeout=180_000)
        page.locator("#track").click()
        page.get_by_text(re.compile(r"frame \d+")).first.wait_for(timeout=60_000)  # the progress bar is up
        page.locator("#stop").click()
        page.get_by_text(re.compile(r"Stopped at frame \d+ by the user")).wait_for(timeout=180_000)
        number = page.locator("#start-frame input[type=number]")
        number.fill("150")
        number.press("Enter")
        page.get_by_text("Start frame 151").wait_for(timeout=60_000)
        _add_typed_box(page, "70,70,40,38")
        page.locator("#track").click()
        page.get_by_text(re.compile(r"over 10 frames \(151-160\)")).wait_for(timeout=180_000)
        browser.close()


def _python_block_after(heading: str) -> str:
    """The first ```python block after the line ``heading`` in the README."""
    text = README.read_text()
    match = re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S)
    assert match, f"no python example after {heading!r}"
    return match.group(1)


def _new_log_lines(app, since: int, pattern: str, at_least: int = 1, wait_s: float = 10) -> list[str]:
    """The app's log lines after line ``since`` that contain ``pattern`` (waiting for the reader thread)."""
    deadline = time.time() + wait_s
    while True:
        found = [line for line in app["log"][since:] if pattern in line]
        if len(found) >= at_least or time.time() > deadline:
            return found
        time.sleep(0.2)


def test_the_readme_api_example_runs(app, monkeypatch):
    """The README's gradio_client example, as written (the address swapped for the test app's): the
    example's box is selected on load, /start_frame(0) clears it, /add_typed_box adds it back once."""
    code = _python_block_after("Use via API")
    assert '"http://127.0.0.1:7860/"' in code
    monkeypatch.chdir(ROOT)  # the example's assets/box.mp4
    since = len(app["log"])
    namespace: dict = {}
    exec(compile(code.replace('"http://127.0.0.1:7860/"', repr(app["url"])), str(README), "exec"), namespace)  # noqa: S102
    message, files = namespace["message"], namespace["files"]
    assert message.startswith("Tracked 1 target(s) over 100 frames (1-100)") and "Trimmed" in message
    boxes = np.loadtxt(next(Path(f) for f in files if Path(f).name == "boxes.txt"))
    assert boxes.shape == (100, 4) and list(boxes[0]) == [290, 14, 308, 228]
    assert Path(namespace["video"]).stat().st_size > 10_000
    assert not any("Traceback" in line or "refused" in line for line in app["log"][since:])


def test_a_bad_api_call_is_one_refused_line(app):
    """A call with wrong arguments (the start frame's old order, a number for a file, text for a number,
    a model not in the menu) or a box already selected: a message naming the endpoint's inputs, one
    ``refused:`` line each in the log, no traceback; the session still works."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(app["url"], verbose=False)
    example = handle_file(str(ROOT / "assets" / "box.mp4"))
    assert client.predict(example, api_name="/load_first_frame")[1].endswith(
        "The example's box is selected: press Track, or clear it and click your own.")
    since = len(app["log"])
    calls = [((example, 0), "/start_frame", r"Bad call of /start_frame\(start, video=None\): Expected a `float`"),
             ((0,), "/load_first_frame", r"Bad call of /load_first_frame\(video\): 0 is not a file .*handle_file"),
             (("abc",), "/start_frame", r"Expected a `float`.*'abc'"),
             ((5000,), "/start_frame", r"5000.* is greater than maximum value 454"),
             ((example, "nope", 0.3), "/track", r"Bad call of /track\(video, model_name, threshold\): .*nope"),
             ((None,), "/add_typed_box", r"x,y,w,h"),
             (("290,14,308,228",), "/add_typed_box", r"same as target #1 \(IoU 1\.00")]
    for args, api, expected in calls:
        with pytest.raises(AppError, match=expected):
            client.predict(*args, api_name=api)
    refused = _new_log_lines(app, since, "refused:", at_least=len(calls))
    assert len(refused) == len(calls)
    assert not any("Traceback" in line for line in app["log"])
    assert client.predict(3, api_name="/start_frame")[1].startswith("Start frame 4")  # still serving the session


def _long_clip(path: Path, frames: int = 160) -> Path:
    paths = sorted((TINY / "sequence").glob("*.png"))
    with VideoWriter(path, 10, (320, 240)) as writer:
        for i in range(frames):
            writer.write(cv2.cvtColor(cv2.imread(str(paths[i % len(paths)])), cv2.COLOR_BGR2RGB))
    return path


LEAVING_CLIENT = """
import sys, time
from gradio_client import Client, handle_file
url, video = sys.argv[1:]
client = Client(url, verbose=False)
client.predict(handle_file(video), api_name="/load_first_frame")
client.predict("76,77,40,38", api_name="/add_typed_box")
job = client.submit(handle_file(video), "tiny", 0.3, api_name="/track")
while not job.status().progress_data:
    time.sleep(0.05)
print("tracking", flush=True)
time.sleep(600)
"""


def test_a_client_that_leaves_mid_track_frees_the_worker(app, tmp_path):
    """A gradio_client process is killed while its Track (100 frames, about half a minute here) runs: the
    job stops within a few frames, as Stop would, so the next user's short request is not kept waiting."""
    from gradio_client import handle_file

    long = _long_clip(tmp_path / "long.mp4")
    short = _long_clip(tmp_path / "short.mp4", frames=3)
    nxt = _session(app["url"], short, "76,77,40,38")  # the next user, ready to press Track
    since = len(app["log"])
    leaving = subprocess.Popen([sys.executable, "-c", LEAVING_CLIENT, app["url"], str(long)], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert leaving.stdout.readline().strip() == "tracking"
    finally:
        leaving.kill()  # the client goes away mid-track, its connections closed by the OS
        leaving.wait(timeout=30)
    began = time.time()
    message = nxt.predict(handle_file(str(short)), "tiny", 0.3, api_name="/track")[3]
    waited = time.time() - began
    assert message.startswith("Tracked 1 target(s) over 3 frames")
    cancelled = _new_log_lines(app, since, "cancelled: the client left")
    assert len(cancelled) == 1, "".join(app["log"][since:])
    stopped = int(re.search(r"stopped at frame (\d+) \(of frames 1-100\)", cancelled[0]).group(1))
    assert stopped < 50, cancelled[0]
    assert waited < 20, f"the next request took {waited:.0f} s: the abandoned job kept the worker"
    assert not any("Traceback" in line for line in app["log"][since:])


@pytest.mark.slow  # a second browser session: the default suite keeps one
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_browser_webcam_without_a_camera_says_so(app):
    """Chromium without a (fake) camera: choosing the webcam source shows a note on the page, not only a
    console error."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app["url"])
        note = page.locator("#webcam-note-text")
        note.wait_for(state="attached", timeout=60_000)
        page.locator("#webcam-note").wait_for(state="hidden", timeout=30_000)  # the page's script: nothing to say yet
        page.locator("#video-input button[aria-label='Capture from camera']").first.click()
        page.locator("#video-input").get_by_text("Click to Access Webcam").first.click()
        page.get_by_text(re.compile(r"Webcam: (no camera was found|access to the camera was denied)")).wait_for(
            timeout=30_000)
        assert page.locator("#webcam-note").is_visible() and "upload a video instead" in note.inner_text()
        browser.close()
