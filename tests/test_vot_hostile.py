"""``python -m lorat.vot`` and ``lorat.vot.workspace`` against what a user or the toolkit may hand them:
folders that hold the user's files, paths that cannot be folders, tracker names and files that
would make a broken ``trackers.ini`` entry, ``--ini`` where a tracker command is written, and a new
object (VOTS) that cannot be tracked."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lorat.errors import LoratError, WeightsError
from lorat.runtime import DEFAULT_WEIGHTS
from lorat.tracking.tracker import Tracker
from lorat.vot.masks import filled_boxes
from lorat.vot.server import main as vot_main
from lorat.vot.server import trackers_ini
from lorat.vot.session import Refused, Start, VotSession, check_inside
from lorat.vot.workspace import write_sequence, write_workspace

from .helpers import textured_clip
from .test_vot import _env, _one_error_line, _toolkit

WORKSPACE_COMMANDS = ("lorat.vot.workspace", "lorat.vot_workspace")


@pytest.fixture(scope="module")
def demo() -> Tracker:
    return Tracker.from_pretrained(DEFAULT_WEIGHTS, device="cpu", dtype="float32")


def _workspace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=_env(), timeout=120)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the workspace folder


@pytest.mark.parametrize("module", WORKSPACE_COMMANDS)
def test_workspace_never_overwrites_the_users_files(tmp_path, module):
    folder = tmp_path / "ws"
    (folder / "sequences" / "lorat-boxes-1").mkdir(parents=True)
    for name in ("trackers.ini", "stack.yaml", "sequences/list.txt", "sequences/lorat-boxes-1/groundtruth.txt",
                 "notes.txt"):
        (folder / name).write_text(f"the user's {name}\n")
    before = _tree(folder)
    run = _workspace(module, str(folder), "--sequences", "1", "--frames", "2")
    _one_error_line(run, f"{folder} already holds stack.yaml, trackers.ini, sequences/list.txt, "
                         f"sequences/lorat-boxes-1; nothing is overwritten")
    assert _tree(folder) == before and not (folder / "config.yaml").exists()


@pytest.mark.parametrize("taken", ["config.yaml", "stack.yaml", "trackers.ini", "sequences/list.txt",
                                   "sequences/lorat-masks-2"])
def test_workspace_refuses_a_folder_holding_any_file_it_writes(tmp_path, taken):
    (tmp_path / taken).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / taken).write_text("mine\n")
    before = _tree(tmp_path)
    with pytest.raises(LoratError, match=f"already holds {taken}; nothing is overwritten"):
        write_workspace(tmp_path, sequences=2, frames=2, masks=True)
    assert _tree(tmp_path) == before


def test_workspace_in_an_empty_folder_or_beside_other_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_workspace(empty, sequences=1, frames=2)
    assert (empty / "config.yaml").is_file() and (empty / "sequences" / "lorat-boxes-1" / "sequence").is_file()
    other = tmp_path / "other"
    (other / "sequences" / "mine").mkdir(parents=True)
    (other / "README").write_text("mine\n")
    write_workspace(other, sequences=1, frames=2)
    assert (other / "README").read_text() == "mine\n" and (other / "sequences" / "mine").is_dir()
    assert (other / "sequences" / "list.txt").read_text() == "lorat-boxes-1\n"
    with pytest.raises(LoratError, match="lorat-boxes-1 already exists; it is not overwritten"):
        write_sequence(other / "sequences", "lorat-boxes-1", frames=2)


def test_workspace_folder_that_cannot_be_one_is_one_error_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    _one_error_line(_workspace("lorat.vot.workspace", str(afile)), f"{afile} is a file, not a folder")
    _one_error_line(_workspace("lorat.vot_workspace", str(afile / "ws")), f"cannot create the folder {afile / 'ws'}")
    _one_error_line(_workspace("lorat.vot.workspace", "/proc/lorat-ws"), "cannot create the folder /proc/lorat-ws")
    assert afile.read_text() == "mine\n"


# ----------------------------------------------------------------------------- --ini


def test_workspace_never_writes_a_tracker_command_that_prints_an_ini(tmp_path):
    for option in (["--ini", "X"], ["--ini=X"], ["--i", "X"]):
        run = _workspace("lorat.vot.workspace", str(tmp_path / "ws"), "--sequences", "1", "--frames", "2", *option)
        _one_error_line(run, "--ini prints a trackers.ini entry and exits")
        assert not (tmp_path / "ws").exists()
        with pytest.raises(LoratError, match="--ini prints a trackers.ini entry"):
            write_workspace(tmp_path / "api", ["--threads", "1", *option], sequences=1, frames=2)
        assert not (tmp_path / "api").exists()


def test_ini_entry_never_holds_ini_and_makes_abbreviated_file_options_absolute(tmp_path, monkeypatch, capsys):
    (tmp_path / "w.safetensors").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert vot_main(["--in=T", "--w", "w.safetensors", "--i", "U", "--threads", "1"]) == 0
    entry = capsys.readouterr().out
    assert entry.startswith("[U]\n")
    weights = (tmp_path / "w.safetensors").resolve()
    assert f"command = {shlex.join([sys.executable, '-m', 'lorat.vot'])} --w {weights} --threads 1\n" in entry


def test_ini_names_follow_the_toolkit_rule_and_never_start_with_a_dash():
    _one_error_line(subprocess.run([sys.executable, "-m", "lorat.vot", "--ini=-x"], capture_output=True, text=True),
                    "--ini '-x': a VOT tracker name is letters, digits, '_' and '-', not starting with '-'")
    from vot.tracker import is_valid_identifier

    for name in ("-x", "--x", "a b", "a.b", "ä"):
        with pytest.raises(LoratError, match="a VOT tracker name is"):
            vot_main([f"--ini={name}"])
    for name in ("LoRAT-B_224", "x-", "0"):
        assert is_valid_identifier(name) and trackers_ini(name, []).startswith(f"[{name}]\n")


@pytest.mark.parametrize("option", ["--weights", "--config", "--backbone-weights", "--sam-weights"])
def test_ini_entry_needs_the_files_it_names(tmp_path, option, capsys):
    with pytest.raises(LoratError, match=f"{option} {tmp_path / 'missing.pth'}: no such file"):
        vot_main(["--ini", "T", option, str(tmp_path / "missing.pth")])
    with pytest.raises(LoratError, match=f"{option} {tmp_path}: a folder, not a file"):
        vot_main(["--ini", "T", f"{option}={tmp_path}"])
    assert capsys.readouterr().out == ""
    (tmp_path / "there.pth").write_bytes(b"x")
    assert vot_main(["--ini", "T", option, str(tmp_path / "there.pth")]) == 0
    assert f"{option} {(tmp_path / 'there.pth').resolve()}" in capsys.readouterr().out


def test_ini_entry_takes_a_named_model_and_a_bundled_config(capsys):
    assert vot_main(["--ini", "T", "--weights", "LoRAT-B-224", "--config", "b224"]) == 0
    assert capsys.readouterr().out.split("\n")[3].endswith("-m lorat.vot --weights LoRAT-B-224 --config b224")


# ----------------------------------------------------------------------------- a new object refused alone


def test_session_refuses_a_new_object_alone_and_tracks_the_others(demo, monkeypatch):
    frames, boxes = textured_clip(6)
    notes = []
    session = VotSession(demo, filled_boxes, "auto", note=notes.append)
    session.initialize(frames[0], [Start(tuple(map(float, boxes[0])))])
    session.frame(frames[1])
    with pytest.raises(LoratError, match=r"object 2: the initial region .* lies outside the 320x240 frame"):
        check_inside(Start((400.0, 10.0, 30.0, 30.0)), (240, 320), 1)
    add = demo.add
    monkeypatch.setattr(demo, "add", lambda frame, box, **options: (_ for _ in ()).throw(LoratError("no room"))
                        if box[0][0] == 20.0 else add(frame, box))
    new = [Refused("object 2: outside", mask=True), Start((20.0, 150.0, 50.0, 40.0)), Start((200.0, 30.0, 40.0, 50.0))]
    answers = [session.frame(frames[2], new)] + [session.frame(f) for f in frames[3:]]
    assert notes == ["warning: object 2: outside; this object is not tracked (answered with an empty region, "
                     "confidence 0)",
                     "warning: object 3: no room; this object is not tracked (answered with an empty region, "
                     "confidence 0)"]
    assert all(len(a) == 4 for a in answers)
    for frame_answers in answers:
        refused_mask, refused_box = frame_answers[1], frame_answers[2]
        assert refused_mask.score == 0 and refused_mask.box == (0, 0, 0, 0) and not refused_mask.mask.any()
        assert refused_mask.mask.shape == frames[0].shape[:2]
        assert refused_box.score == 0 and refused_box.box == (0, 0, 0, 0) and refused_box.mask is None
    assert answers[0][3].box == (200.0, 30.0, 40.0, 50.0) and answers[0][3].score == 1.0
    assert all(a[0].score > 0 and a[3].score > 0 for a in answers[1:])
    again = session.frame(None)  # an unreadable frame keeps the refused objects empty
    assert len(again) == 4 and again[1].box == (0, 0, 0, 0) and all(a.score == 0 for a in again)


def test_trax_new_object_outside_the_frame_is_refused_alone(tmp_path, demo):
    """Through the toolkit's TraX client: a rectangle and a mask added on frame 3 outside the frame get
    empty regions with confidence 0 (one log line each), the objects around them are tracked as in
    process, and the session goes on."""
    _toolkit()
    from vot.dataset import load_sequence
    from vot.region import Mask, Rectangle
    from vot.tracker import ObjectStatus
    from vot.tracker.trax import TrackerProcess

    sequence = load_sequence(str(write_sequence(tmp_path / "sequences", "two", frames=6, objects=2)))
    objects = list(sequence.objects())
    outside_box, outside_mask = Rectangle(1000, 1000, 20, 20), Mask(np.ones((5, 5), dtype=np.uint8), (500, 500))
    log: list[str] = []
    command = shlex.join([sys.executable, "-m", "lorat.vot", "--dtype", "float32", "--threads", "1"])
    process = TrackerProcess(command, {"OMP_NUM_THREADS": "1"}, timeout=300, log=log.append)
    try:
        first = sequence.frame(0)
        received = [process.initialize(first, [ObjectStatus(first.object(objects[0]), {})])[0]]
        for i in range(1, len(sequence)):
            frame = sequence.frame(i)
            new = [outside_box, frame.object(objects[1]), outside_mask] if i == 2 else []
            received.append(process.update(frame, [ObjectStatus(r, {}) for r in new])[0])
    finally:
        process.terminate()
    text = "".join(log)
    assert "Traceback" not in text and "error:" not in text, text[-3000:]
    warnings = [line for line in text.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, text[-3000:]
    assert warnings[0].startswith("warning: object 2: the initial region (x, y, w, h) = (1000, 1000, 20, 20) lies "
                                  "outside the 320x240 frame; this object is not tracked")
    assert warnings[1].startswith("warning: object 4: the initial mask is empty")

    images = [cv2.cvtColor(cv2.imread(sequence.frame(i).filename()), cv2.COLOR_BGR2RGB) for i in range(len(sequence))]
    session = VotSession(demo, filled_boxes, "auto")
    expected = [session.initialize(images[0], [_start(first.object(objects[0]))])]
    for i in range(1, len(sequence)):
        new = [Refused("outside"), _start(sequence.frame(2).object(objects[1])), Refused("empty", mask=True)]
        expected.append(session.frame(images[i], new if i == 2 else []))
    assert [len(r) for r in received] == [1, 1, 4, 4, 4, 4]
    for got in received[2:]:
        assert isinstance(got[1].region, Rectangle) and got[1].region.is_empty()
        assert isinstance(got[3].region, Mask) and got[3].region.is_empty()
        assert float(got[1].properties["confidence"]) == 0 == float(got[3].properties["confidence"])
    for got, want in zip(received[1:], expected[1:], strict=True):
        for k in (0, 2) if len(want) == 4 else (0,):
            region = got[k].region
            np.testing.assert_allclose((region.x, region.y, region.width, region.height), want[k].box)
            assert float(got[k].properties["confidence"]) == pytest.approx(want[k].score, abs=1e-4)


def _start(rectangle) -> Start:
    return Start((float(rectangle.x), float(rectangle.y), float(rectangle.width), float(rectangle.height)))


# ----------------------------------------------------------------------------- SAM files


def test_sam_pickle_refusal_never_suggests_unsafe_loading(tmp_path):
    """A .pth holding Python objects is refused without torch's advice (weights_only=False runs the file)."""
    path = tmp_path / "sam_objects.pth"
    torch.save({"weight": torch.zeros(2), "args": argparse.Namespace(a=1)}, path)
    from lorat.vot.masks import SamMasker

    with pytest.raises(WeightsError) as raised:
        SamMasker.from_file(path)
    message = str(raised.value)
    assert "refusing to unpickle" in message and str(path) in message
    for advice in ("weights_only", "still be loaded", "trust", "add_safe_globals", "\x1b"):
        assert advice not in message, message


def test_objects_the_toolkit_gives_are_tracked_even_when_they_overlap(demo):
    """A person may not give two boxes on one object (Tracker.init refuses them), but the toolkit's objects are
    the benchmark's: two identical initial regions, and a new object on a tracked one, are tracked as given."""
    frames, boxes = textured_clip(4)
    with pytest.raises(LoratError, match="mark the same object"):
        Tracker(demo.model, demo.config).init(frames[0], [boxes[0], boxes[0]])
    session = VotSession(Tracker(demo.model, demo.config), filled_boxes, "box")
    assert len(session.initialize(frames[0], [Start(tuple(boxes[0])), Start(tuple(boxes[0]))])) == 2
    answers = session.frame(frames[1], [Start(tuple(boxes[1]))])
    assert len(answers) == 3 and all(a.score > 0 for a in answers)
