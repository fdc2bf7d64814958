"""The Gradio demo: driven in headless Chromium (Playwright) and through gradio_client."""

from __future__ import annotations

import os
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

from lorat.checkpoint import load_model, save_model
from lorat.tracker import Tracker
from lorat.video import VideoWriter

from .conftest import ROOT, TINY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytest.importorskip("gradio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app serving the official-tiny model, and a 16-frame clip."""
    root = tmp_path_factory.mktemp("app")
    from lorat.config import load_config

    model, cfg = load_model(TINY / "lorat_trainable.safetensors", load_config(TINY / "config.yaml"),
                            TINY / "dinov2_backbone.pth")
    weights = save_model(model, cfg, root / "tiny.safetensors")
    clip = root / "clip.mp4"
    with VideoWriter(clip, 10, (320, 240)) as writer:
        for path in sorted((TINY / "sequence").glob("*.png")):
            writer.write(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "apps/gradio_app.py", "--weights", str(weights), "--device", "cpu",
                             "--port", str(port), "--max-frames", "100"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read()) from None
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("the app did not start")
    yield {"url": url, "clip": clip, "weights": weights}
    proc.terminate()
    proc.wait(timeout=30)


def _expected_boxes(weights, clip, box):
    tracker = Tracker.from_pretrained(weights, device="cpu")
    capture = cv2.VideoCapture(str(clip))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    return np.array([r.box for r in tracker.track_video(frames, box)])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_browser_upload_draw_track_download(app):
    from playwright.sync_api import sync_playwright

    shots = os.environ.get("LORAT_SCREENSHOTS")  # set to apps/ to refresh the README screenshots
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app["url"])
        example = page.locator(".gallery-item")  # the bundled example (assets/box.mp4)
        example.first.click()
        page.get_by_text("640x480, 456 frames").wait_for(timeout=60_000)
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
        if shots:
            page.screenshot(path=str(Path(shots) / "screenshot_before.png"), full_page=True)
        page.locator("#track").click()
        link = page.locator("#downloads a[download=\"boxes.txt\"]")
        link.first.wait_for(timeout=180_000)
        page.locator("#result-video video").wait_for(timeout=60_000)
        assert page.locator("#result-video video").get_attribute("src")
        text = page.request.get(link.first.get_attribute("href")).text()
        if shots:
            page.wait_for_timeout(1500)
            page.screenshot(path=str(Path(shots) / "screenshot_after.png"), full_page=True)
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
    with pytest.raises(AppError, match="Cannot read this video"):
        client.predict(handle_file(str(fake)), api_name="/load_first_frame")
    client = _session(app["url"], app["clip"], "900,900,10,10")
    with pytest.raises(AppError, match="outside the 320x240 frame"):
        client.predict(handle_file(str(app["clip"])), "tiny", 0.3, api_name="/track")
    client = Client(app["url"], verbose=False)
    with pytest.raises(AppError, match="Select at least one target"):
        client.predict(handle_file(str(app["clip"])), "tiny", 0.3, api_name="/track")
    with pytest.raises(AppError, match="x,y,w,h"):
        _session(app["url"], app["clip"], "1,2,3")
    ok = _session(app["url"], app["clip"], "76,77,40,38")  # still serving
    assert ok.predict(handle_file(str(app["clip"])), "tiny", 0.3, api_name="/track")[3].startswith("Tracked 1")
