"""The web demo's request handlers and settings, called in-process (no server, no browser)."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from lorat.video import VideoWriter

from .conftest import ROOT

gr = pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def app():
    """apps/gradio_app.py imported as a module (``apps`` is not a package)."""
    spec = importlib.util.spec_from_file_location("lorat_gradio_app", ROOT / "apps" / "gradio_app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _state(width: int = 64, height: int = 48) -> dict:
    return {"boxes": [], "pending": None, "frame": np.zeros((height, width, 3), np.uint8)}


def _clip(path: Path, size: tuple[int, int], frames: int = 2) -> Path:
    with VideoWriter(path, 10, size) as writer:
        for k in range(frames):
            writer.write(np.full((size[1], size[0], 3), 40 * k, np.uint8))
    return path


@pytest.mark.parametrize("text", ["nan,10,20,20", "10,inf,20,20", "0,0,inf,10", "0,0,10,-inf", "1e309,0,10,10",
                                  "-inf,0,10,10", "900,900,10,10", "-30,0,20,20", "0,0,0,10", "1,2,3", "a,b,c,d"])
def test_a_bad_typed_box_is_refused_and_never_stored(app, text):
    state = _state()
    with pytest.raises(gr.Error):
        app.add_typed_box(text, state)
    assert state["boxes"] == []
    image, state, message = app.add_typed_box("10,10,20,20", state)  # the session still works
    assert image.shape == (48, 64, 3) and state["boxes"] == [[10.0, 10.0, 20.0, 20.0]]


def test_a_typed_box_partly_outside_is_clipped_to_the_frame(app):
    image, state, message = app.add_typed_box("-1e300,40,2e300,1e300", _state())
    assert state["boxes"] == [[0.0, 40.0, 64.0, 8.0]]
    assert "clipped" in message
    app.clear_boxes(state)
    assert app.add_typed_box("50,30,20,20", state)[1]["boxes"] == [[50.0, 30.0, 14.0, 18.0]]


def test_host_and_port_come_from_flags_then_lorat_then_gradio_variables(app):
    def resolve(argv=(), **env):
        args = app.parse_args(list(argv), env)
        return args.host, args.port

    assert resolve() == ("127.0.0.1", 7860)
    assert resolve(GRADIO_SERVER_NAME="0.0.0.0", GRADIO_SERVER_PORT="8080") == ("0.0.0.0", 8080)
    assert resolve(LORAT_HOST="10.0.0.1", LORAT_PORT="9000", GRADIO_SERVER_NAME="0.0.0.0",
                   GRADIO_SERVER_PORT="8080") == ("10.0.0.1", 9000)
    assert resolve(["--host", "::1", "--port", "7000"], LORAT_HOST="10.0.0.1", LORAT_PORT="9000",
                   GRADIO_SERVER_NAME="0.0.0.0", GRADIO_SERVER_PORT="8080") == ("::1", 7000)


@pytest.mark.parametrize("env", [{"GRADIO_SERVER_PORT": "http"}, {"LORAT_PORT": "-1"}, {"LORAT_MAX_SIDE": "0"},
                                 {"LORAT_MAX_FRAMES": "many"}])
def test_a_bad_setting_is_one_usage_error(app, env, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args([], env)
    assert exit_info.value.code == 2
    assert next(iter(env)) in capsys.readouterr().err


def test_the_frame_size_limit_is_checked_at_upload_and_in_track(app, tmp_path):
    wide = _clip(tmp_path / "wide.mp4", (200, 100))
    limits = app.Limits(max_frames=100, max_side=150)
    with pytest.raises(gr.Error, match=r"200x100.*150"):
        app.make_load_fn(limits)(str(wide))

    class NoModels:  # the size must be refused before any model is used
        names = ["tiny"]

        def get(self, name):
            raise AssertionError("a model was used for a video that is too large")

    state = _state(200, 100)
    state["boxes"] = [[10.0, 10.0, 20.0, 20.0]]
    track = app.make_track_fn(NoModels(), limits, app.ResultFolders(tmp_path / "results"))
    with pytest.raises(gr.Error, match=r"200x100.*150"):
        track(str(wide), state, "tiny", 0.3)
    frame, state, info, _ = app.make_load_fn(app.Limits(max_frames=100, max_side=200))(str(wide))
    assert frame.shape == (100, 200, 3) and info.startswith("200x100")


def test_error_messages_hide_server_paths(app, tmp_path):
    fake = tmp_path / "some dir" / "not a video.mp4"
    fake.parent.mkdir()
    fake.write_text("hello")
    with pytest.raises(gr.Error) as error:
        app.make_load_fn(app.Limits())(str(fake))
    assert "not a video.mp4" in error.value.message
    assert str(tmp_path) not in error.value.message and "some dir" not in error.value.message
    assert app.hide_paths("cannot open /srv/x/y/clip.mp4 (camera/stream)") == "cannot open clip.mp4 (camera/stream)"


def test_expected_errors_are_logged_as_one_line_without_a_traceback(app, tmp_path, caplog):
    with pytest.raises(gr.Error) as error:
        app.add_typed_box("nan,1,2,3", _state())
    assert error.value.print_exception is False
    assert [r.getMessage().count("\n") for r in caplog.records if r.name == "lorat.app"] == [0]


def test_result_folders_keep_only_the_newest_and_vanish_on_close(app, tmp_path):
    results = app.ResultFolders(tmp_path, keep=2)
    made = [results.new() for _ in range(5)]
    for folder in made:
        assert folder.parent == results.root
    assert sorted(results.root.iterdir()) == made[-2:]
    results.close()
    assert not results.root.exists()


def test_folders_of_dead_apps_are_removed_at_start_up(app, tmp_path):
    dead = tmp_path / "lorat_app_999999999_abc"  # above Linux's pid_max: never a live process
    alive = tmp_path / f"lorat_app_{os.getpid()}_abc"
    other = tmp_path / "lorat_other"
    for folder in (dead, alive, other):
        (folder / "1").mkdir(parents=True)
    results = app.ResultFolders(tmp_path)
    assert not dead.exists() and alive.exists() and other.exists() and results.root.exists()
    results.close()


def test_the_app_deletes_gradios_cached_files(app, tmp_path):
    class OneModel:
        names = ["tiny"]

    demo = app.build_app(OneModel(), app.Limits(), app.ResultFolders(tmp_path), "")
    assert demo.delete_cache is not None


def test_an_undecodable_frame_keeps_line_k_for_frame_k(app):
    """A video frame that cannot be decoded repeats the previous boxes with score 0 and the last picture."""
    import lorat
    from lorat.runtime import DEFAULT_WEIGHTS

    from .helpers import textured_clip

    frames, boxes = textured_clip(4, (160, 128))
    source = type("Source", (), {"frame_count": 4, "__iter__": lambda self: iter(
        [(0, frames[0]), (1, frames[1]), (2, None), (3, frames[3])])})()

    class Writer:
        frames: list = []

        def write(self, frame):
            self.frames.append(frame)

    writer = Writer()
    tracker = lorat.Tracker.from_pretrained(DEFAULT_WEIGHTS, device="cpu")
    rows, scores = app._track_frames(tracker, source, [list(boxes[0])], writer, 0.3, 0, 100, threading.Event(),
                                     lambda *a, **k: None)
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert rows[2][2:6] == rows[1][2:6] and rows[2][6] == 0.0 and rows[1][6] > 0
    assert rows[3][6] > 0 and scores[0] == [1.0]
    assert len(writer.frames) == 4 and writer.frames[2] is writer.frames[1]
    expected = [r for r in lorat.Tracker.from_pretrained(DEFAULT_WEIGHTS, device="cpu").stream(
        [frames[0], frames[1], None, frames[3]], boxes[0])]
    assert [tuple(r[2:6]) for r in rows] == [tuple(r.targets[0].box) for r in expected]


def test_each_request_keeps_the_dtype_the_model_was_loaded_with(app, monkeypatch):
    """The app must run float16 on CUDA as the CLI does: its per-request trackers keep the loaded dtype."""
    import torch

    import lorat.checkpoint.loader
    from lorat.options import ModelOptions
    from lorat.runtime import DEFAULT_WEIGHTS

    calls = []
    real = lorat.checkpoint.loader.load
    monkeypatch.setattr(app, "load", lambda options, say: calls.append(options) or real(options, say))
    models = app.Models([str(DEFAULT_WEIGHTS)], ModelOptions(device="cpu", dtype="bfloat16"))
    first, second = models.tracker(models.names[0]), models.tracker(models.names[0])
    assert first.dtype == second.dtype == torch.bfloat16 and len(calls) == 1
    assert first is not second and first.model is second.model


def test_start_frame_trimming_and_stop(app):
    """Tracking starts on the chosen frame (numbered as in the video), takes at most ``count`` frames,
    and a Stop ends it after the current frame with the rows so far."""
    import lorat
    from lorat.runtime import DEFAULT_WEIGHTS

    from .helpers import textured_clip

    frames, boxes = textured_clip(6, (320, 240))
    source = type("Source", (), {"__iter__": lambda self: iter(enumerate(frames))})()
    writer = type("Writer", (), {"write": lambda self, frame: None})()
    tracker = lorat.Tracker.from_pretrained(DEFAULT_WEIGHTS, device="cpu")
    rows, scores = app._track_frames(tracker, source, [list(boxes[2])], writer, 0.3, 2, 3, threading.Event(),
                                     lambda *a, **k: None)
    assert [r[0] for r in rows] == [3, 4, 5] and len(scores) == 3  # frames 3-5 of 6: trimmed to 3
    expected = [r.targets[0].box for r in tracker.stream(frames[2:5], boxes[2])]
    assert [tuple(r[2:6]) for r in rows] == expected
    stop = threading.Event()
    rows, _ = app._track_frames(tracker, source, [list(boxes[0])], writer, 0.3, 0, 6, stop,
                                lambda *a, **k: stop.set())  # Stop pressed while the first frame is shown
    assert [r[0] for r in rows] == [1]


def test_the_example_comes_with_its_box(app, tmp_path):
    if not app.EXAMPLE.is_file():
        pytest.skip("the example clip is not in this install")
    import shutil

    copy = tmp_path / "cache" / app.EXAMPLE.name  # Gradio serves the example from its cache
    copy.parent.mkdir()
    shutil.copy(app.EXAMPLE, copy)
    frame, state, message, slider = app.make_load_fn(app.Limits())(str(copy))
    assert state["boxes"] == [app.EXAMPLE_BOX] and "press Track" in message
    assert slider["maximum"] > 100 and state["start"] == 0
    other = tmp_path / "other.mp4"
    shutil.copy(app.EXAMPLE, other)
    assert app.make_load_fn(app.Limits())(str(other))[1]["boxes"] == []


def test_the_start_frame_endpoint_takes_the_start_and_uses_the_sessions_video(app, tmp_path):
    """The README's API call ``client.predict(0, api_name="/start_frame")``: the start comes first and the
    video is optional (the one ``/load_first_frame`` loaded); a video given is used instead."""
    class OneModel:
        names = ["tiny"]

    demo = app.build_app(OneModel(), app.Limits(), app.ResultFolders(tmp_path / "results"), "")
    parameters = demo.get_api_info()["named_endpoints"]["/start_frame"]["parameters"]
    assert [(p["parameter_name"], p["parameter_has_default"]) for p in parameters] == [("start", True),
                                                                                       ("video", True)]
    clip = _clip(tmp_path / "clip.mp4", (64, 48), frames=4)
    _, state, _, _ = app.make_load_fn(app.Limits())(str(clip))
    state["boxes"] = [[1.0, 1.0, 10.0, 10.0]]
    start = app.make_start_fn(app.Limits())
    frame, state, message = start(2, None, state)
    assert message.startswith("Start frame 3") and state["start"] == 2 and state["boxes"] == []
    assert abs(int(frame[0, 0, 0]) - 80) <= 3 and state["video"] == str(clip)  # frame 3 of the clip is grey 80
    other = _clip(tmp_path / "other.mp4", (80, 60), frames=4)
    frame, state, _ = start(1, str(other), state)
    assert state["video"] == str(other) and frame.shape == (60, 80, 3) and abs(int(frame[0, 0, 0]) - 40) <= 3
    with pytest.raises(gr.Error, match="Load a video first"):
        start(0, None, app._empty_state())


def test_a_box_already_selected_is_refused(app):
    """The example comes with its box: typing that box again (or nearly: IoU above 0.9) is refused, so the
    same target is never tracked twice; a different box is added."""
    if not app.EXAMPLE.is_file():
        pytest.skip("the example clip is not in this install")
    _, state, _, _ = app.make_load_fn(app.Limits())(str(app.EXAMPLE))
    assert state["boxes"] == [app.EXAMPLE_BOX]
    for text in ("290,14,308,228", "292,15,305,227", "285,10,318,236"):  # the same, then IoU 0.97 and 0.94
        with pytest.raises(gr.Error, match=r"same as target #1 \(IoU 0\.9\d|same as target #1 \(IoU 1\.00"):
            app.add_typed_box(text, state)
        assert state["boxes"] == [app.EXAMPLE_BOX]
    _, state, message = app.add_typed_box("290,14,250,228", state)  # IoU 0.81: another target
    assert len(state["boxes"]) == 2 and message.startswith("2 target(s)")
    clicks = [(290, 14), (598, 242)]  # the example's box again, by two clicks
    for x, y in clicks[:1]:
        app.click(state, type("Select", (), {"index": [x, y]})())
    with pytest.raises(gr.Error, match="same as target #1"):
        app.click(state, type("Select", (), {"index": list(clicks[1])})())
    assert len(state["boxes"]) == 2 and state["pending"] is None


def test_a_click_without_a_position_is_refused(app):
    with pytest.raises(gr.Error, match="/add_typed_box"):
        app.click(_state(), None)


def test_a_track_whose_client_left_stops_after_the_current_frame(app):
    """Gradio marks a running event not alive when its client's stream closes, and drops a cancelled one
    from the running jobs; the Track checks that after every frame, as it checks Stop."""
    from types import SimpleNamespace

    from gradio.context import LocalContext

    import lorat
    from lorat.runtime import DEFAULT_WEIGHTS

    from .helpers import textured_clip

    assert app._client_gone()() is False  # outside Gradio's queue: never gone
    event = SimpleNamespace(_id="event-1", alive=True)
    queue = SimpleNamespace(active_jobs=[None, [SimpleNamespace(_id="other", alive=False), event]])
    tokens = LocalContext.blocks.set(SimpleNamespace(_queue=queue)), LocalContext.event_id.set("event-1")
    try:
        gone = app._client_gone()
    finally:
        LocalContext.blocks.reset(tokens[0])
        LocalContext.event_id.reset(tokens[1])
    assert gone() is False
    event.alive = False  # the client's event stream closed
    assert gone() is True
    event.alive, queue.active_jobs[1] = True, None  # cancelled: no longer running
    assert gone() is True

    frames, boxes = textured_clip(6, (320, 240))
    source = type("Source", (), {"__iter__": lambda self: iter(enumerate(frames))})()
    writer = type("Writer", (), {"write": lambda self, frame: None})()
    tracker = lorat.Tracker.from_pretrained(DEFAULT_WEIGHTS, device="cpu")
    left = threading.Event()
    rows, _ = app._track_frames(tracker, source, [list(boxes[0])], writer, 0.3, 0, 6, threading.Event(),
                                lambda *a, **k: left.set(), left.is_set)  # the client leaves during frame 1
    assert [r[0] for r in rows] == [1]


def test_the_docs_say_long_videos_are_trimmed_not_refused(app, capsys):
    line = next(text for text in app.__doc__.splitlines() if "--max-frames" in text)
    assert "trimmed" in line and "refused" not in line
    with pytest.raises(SystemExit):
        app.parse_args(["--help"], {})
    usage = " ".join(capsys.readouterr().out.split())
    assert "a longer video is trimmed to this many frames from the start frame, not refused" in usage


def test_the_page_has_a_webcam_note_filled_in_the_browser(app, tmp_path):
    """The camera fails in the browser only: a page-load script fills the note under the video input
    (tests/test_app.py checks it in Chromium without a camera)."""
    class OneModel:
        names = ["tiny"]

    demo = app.build_app(OneModel(), app.Limits(), app.ResultFolders(tmp_path / "results"), "")
    config = demo.get_config_file()
    notes = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "webcam-note"]
    assert len(notes) == 1 and 'id="webcam-note-text"' in notes[0]["props"]["value"]
    assert any("getUserMedia" in str(d.get("js")) for d in config["dependencies"])
    for name in ("NotFoundError", "NotAllowedError", "no camera was found", "denied"):
        assert name in app.WEBCAM_NOTE_JS


def test_a_loratv2_model_tracks_in_the_app_as_the_official_loop(app, tmp_path):
    """The menu's models load through the one loader whatever their family: the official LoRATv2
    phase-2 trajectory (tests/fixtures/official-v2-tiny, KV cache and reference updates) through the
    app's model menu and tracking loop."""
    from lorat.checkpoint.loader import save_model
    from lorat.options import ModelOptions

    from .test_model_v2 import FIXTURES, _tracker

    reference = _tracker("phase2")
    weights = save_model(reference.model, reference.config, tmp_path / "v2.safetensors")
    models = app.Models([str(weights)], ModelOptions(device="cpu"))
    tracker = models.tracker(models.names[0])
    frames = np.load(FIXTURES / "phase2" / "frames.npz")["frames"]
    expected = np.loadtxt(FIXTURES / "phase2" / "trajectory.txt", delimiter=",")
    source = type("Source", (), {"__iter__": lambda self: iter(enumerate(frames))})()
    writer = type("Writer", (), {"write": lambda self, frame: None})()
    rows, _ = app._track_frames(tracker, source, [list(expected[0, :4])], writer, 0.3, 0, len(frames),
                                threading.Event(), lambda *a, **k: None)
    np.testing.assert_allclose(np.array([r[2:6] for r in rows]), expected[:, :4], atol=0.05, rtol=0)
