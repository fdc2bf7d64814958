"""``python -m lorat.track`` as users run it, on the official fixture and on bad inputs."""

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import lorat.track
from lorat.errors import run_cli
from lorat.track import main
from lorat.video import VideoWriter, open_source

from .conftest import ROOT, TINY

MODEL_ARGS = ["--config", str(TINY / "config.yaml"), "--weights", str(TINY / "lorat_trainable.safetensors"),
              "--backbone-weights", str(TINY / "dinov2_backbone.pth"), "--device", "cpu"]


def _run(*args):
    """Run the CLI in a subprocess (what a user sees): (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "lorat.track", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    return proc.returncode, proc.stdout, proc.stderr


def test_fixture_reproduced_by_cli(tmp_path, capsys):
    out = tmp_path / "out.txt"
    code = run_cli(main, [str(TINY / "sequence"), *MODEL_ARGS, "--init", "76,77,40,38", "--save-txt", str(out),
                          "--output", str(tmp_path / "out.mp4")])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    np.testing.assert_allclose(np.loadtxt(out), np.loadtxt(TINY / "expected_boxes.txt"), atol=0.05, rtol=0)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "out_scores.txt"), np.loadtxt(TINY / "expected_confidence.txt"),
                               atol=1e-4, rtol=0)
    assert "\t" in out.read_text().splitlines()[0]
    video = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 16
    assert "tracking" in stderr and "16 frames" in stdout  # progress bar and summary
    # --no-cuda-graph (a no-op off CUDA) is accepted and changes nothing
    again = tmp_path / "again.txt"
    assert run_cli(main, [str(TINY / "sequence"), *MODEL_ARGS, "--init", "76,77,40,38", "--save-txt", str(again),
                          "--no-cuda-graph"]) == 0
    assert again.read_text() == out.read_text()


def test_several_targets_one_file_each(tmp_path):
    main([str(TINY / "sequence"), *MODEL_ARGS, "--init", "76,77,40,38", "--init", "150 100 30 30",
          "--save-txt", str(tmp_path / "run.txt"), "--max-frames", "5"])
    for k in (1, 2):
        assert len((tmp_path / f"run_{k}.txt").read_text().splitlines()) == 5
        assert len((tmp_path / f"run_{k}_scores.txt").read_text().splitlines()) == 5
    assert (tmp_path / "run_2.txt").read_text().startswith("150.000\t100.000\t30.000\t30.000")


def test_corrupt_frame_in_the_middle_keeps_every_line(tmp_path, capsys):
    seq = tmp_path / "seq"
    shutil.copytree(TINY / "sequence", seq)
    (seq / "00000008.png").write_bytes(b"\x89PNG garbage")
    code = run_cli(main, [str(seq), *MODEL_ARGS, "--init", "76,77,40,38", "--save-txt", str(tmp_path / "o.txt")])
    stdout, stderr = capsys.readouterr()
    assert code == 0
    lines = (tmp_path / "o.txt").read_text().splitlines()
    assert len(lines) == 16 and lines[7] == lines[6]  # previous box repeated for the bad frame
    assert "frame 8" in stderr + stdout and "unreadable" in stderr + stdout
    scores = np.loadtxt(tmp_path / "o_scores.txt")
    assert scores[7] == 0.0 and scores[8] > 0


def test_truncated_video_keeps_results(tmp_path, capsys):
    frames = sorted((TINY / "sequence").glob("*.png"))
    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (256, 256))
    for path in frames * 2:
        image = cv2.imread(str(path))
        writer.write(cv2.resize(image, (256, 256)) if image.shape[:2] != (256, 256) else image)
    writer.release()
    data = (tmp_path / "clip.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    code = run_cli(main, [str(tmp_path / "cut.avi"), *MODEL_ARGS, "--init", "76,77,40,38", "--save-txt",
                          str(tmp_path / "cut.txt")])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    capture = cv2.VideoCapture(str(tmp_path / "cut.avi"))
    decodable = 0
    while capture.read()[0]:
        decodable += 1
    capture.release()
    assert 0 < decodable < 32  # the file really is cut
    assert len((tmp_path / "cut.txt").read_text().splitlines()) == decodable  # one line per frame it holds
    assert "wrote" in stdout


@pytest.mark.parametrize("args, message", [
    (["missing.mp4", "--init", "1,1,5,5"], "source not found: missing.mp4"),
    ([TINY / "meta.json", "--init", "1,1,5,5"], "cannot open video"),
    ([TINY / "sequence", "--init", "76,77,0,38"], "positive width and height"),
    ([TINY / "sequence", "--init", "900,77,40,38"], "outside the"),
    ([TINY / "sequence", "--init", "76,77,40"], "--init expects x,y,w,h"),
    ([TINY / "sequence"], "no --init box given and no display"),
    ([TINY / "sequence", "--init", "76,77,40,38", "--device", "cpu", "--dtype", "float16"], "float16 autocast"),
    ([TINY / "sequence", "--init", "76,77,40,38", "--init", "76,77,40,38"],
     "init box 1 (76, 77, 40, 38) and init box 2 (76, 77, 40, 38) overlap (IoU 1.00 > 0.9)"),
    ([TINY / "sequence", "--init", "76,77,40,38", "--init", "150,100,30,30", "--init", "77,77,40,38"],
     "init box 1 (76, 77, 40, 38) and init box 3 (77, 77, 40, 38) overlap (IoU 0.95 > 0.9)"),
])
def test_bad_inputs_give_one_clear_line(args, message, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    code = run_cli(main, [*map(str, args), *MODEL_ARGS])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert message in stderr and stderr.count("\n") == 1


def test_errors_in_a_subprocess_have_no_traceback():
    code, _, stderr = _run("missing.mp4", *MODEL_ARGS, "--init", "1,1,5,5")
    assert code == 2 and stderr.strip() == "error: source not found: missing.mp4"


def test_empty_folder_and_missing_default_weights(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert run_cli(main, [str(tmp_path / "empty"), *MODEL_ARGS, "--init", "1,1,5,5"]) == 2
    assert "contains no images" in capsys.readouterr().err
    monkeypatch.setenv("LORAT_WEIGHTS", str(tmp_path / "none.safetensors"))
    assert run_cli(main, [str(TINY / "sequence"), "--init", "1,1,5,5"]) == 2
    err = capsys.readouterr().err
    assert "none.safetensors is missing" in err and err.rstrip().endswith("pass --weights FILE")


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    assert "--save-txt" in stdout and "--lost-threshold" in stdout


def test_bench_prints_json(capsys):
    import json

    from lorat.bench import main as bench_main

    bench_main([str(TINY / "config.yaml"), "--device", "cpu", "--frames", "6", "--iters", "2"])
    result = json.loads(capsys.readouterr().out)
    assert result["frames"] == 6 and result["model_fps"] > 0 and result["tracking_fps"] > 0
    assert result["max_abs_diff_vs_float32"] == 0.0 and result["cuda_graph"] is False
    bench_main([str(TINY / "config.yaml"), "--device", "cpu", "--frames", "4", "--iters", "2", "--no-cuda-graph"])
    assert json.loads(capsys.readouterr().out)["frames"] == 4
    assert set(result["split_ms"]) == {"decode", "crop", "model", "postprocess"}
    assert result["peak_memory_mb"]["process_rss"] > 0


# ----------------------------------------------------------------------------- output matrix

SHORT = 6  # frames in the short sources of the matrix


def _write_avi(path: Path, frames: list[Path]) -> Path:
    """An MJPG .avi of the given image files (a video OpenCV writes and reads everywhere)."""
    first = cv2.imread(str(frames[0]))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, first.shape[1::-1])
    for frame in frames:
        writer.write(cv2.imread(str(frame)))
    writer.release()
    return path


@pytest.fixture(scope="module")
def short_sources(tmp_path_factory) -> dict[str, Path]:
    """The first SHORT fixture frames as an image folder and as a video file."""
    root = tmp_path_factory.mktemp("short")
    frames = sorted((TINY / "sequence").glob("*.png"))[:SHORT]
    (root / "frames").mkdir()
    for frame in frames:
        shutil.copy(frame, root / "frames" / frame.name)
    return {"folder": root / "frames", "video": _write_avi(root / "clip.avi", frames)}


def _video_frames(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


TWO = ["--init", "76,77,40,38", "--init", "150,100,30,30"]
ONE = TWO[:2]


@pytest.mark.parametrize("source, boxes, outputs", [
    ("folder", ONE, []),
    ("folder", ONE, ["--output", "out.mp4"]),
    ("folder", ONE, ["--save-txt", "out.txt"]),
    ("folder", ONE, ["--output", "out.mp4", "--save-txt", "out.txt"]),
    ("folder", ONE, ["--show"]),
    ("folder", TWO, ["--output", "out.mp4"]),
    ("folder", TWO, ["--output", "out.avi", "--save-txt", "out.txt"]),
    ("video", ONE, ["--output", "out.avi"]),
    ("video", ONE, []),
    ("video", TWO, ["--save-txt", "out.txt", "--show"]),
], ids=lambda v: ",".join(v) if isinstance(v, list) else v)
def test_output_matrix(source, boxes, outputs, short_sources, tmp_path, capsys, monkeypatch):
    """Every combination of outputs runs to the end and writes one line / one video frame per frame."""
    monkeypatch.setattr(lorat.track, "has_display", lambda: True)  # --show without a screen: no window
    monkeypatch.setattr(lorat.track, "_show", lambda frame: None)
    monkeypatch.setattr(cv2, "destroyAllWindows", lambda: None)
    args = [str(tmp_path / a) if a.startswith("out.") else a for a in outputs]
    code = run_cli(main, [str(short_sources[source]), *MODEL_ARGS, *boxes, *args])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert f"over {SHORT} frames" in stdout and "Traceback" not in stderr
    targets = len(boxes) // 2
    written = sorted(p.name for p in tmp_path.iterdir())
    expected = []
    if "--save-txt" in outputs:
        stems = ["out"] if targets == 1 else [f"out_{k + 1}" for k in range(targets)]
        expected += [f"{s}.txt" for s in stems] + [f"{s}_scores.txt" for s in stems]
        for name in expected:
            assert len((tmp_path / name).read_text().splitlines()) == SHORT, name
            assert f"wrote {tmp_path / name}" in stdout
    video = next((a for a in outputs if a.startswith("out.")
                  and a.endswith((".mp4", ".avi"))), None)
    if video:
        expected.append(video)
        assert _video_frames(tmp_path / video) == SHORT
        assert f"wrote {tmp_path / video}" in stdout
    assert written == sorted(expected)


def test_output_only_as_a_user_runs_it(short_sources, tmp_path):
    """The quick-start shape without --save-txt, in a subprocess: exit 0, a playable video, no traceback."""
    code, stdout, stderr = _run(short_sources["video"], *MODEL_ARGS, *ONE, "--output", tmp_path / "out.mp4")
    assert code == 0, stderr
    assert "Traceback" not in stderr and "warning" not in stdout + stderr
    assert _video_frames(tmp_path / "out.mp4") == SHORT
    assert f"wrote {tmp_path / 'out.mp4'}" in stdout


# ----------------------------------------------------------------------------- outputs that must be refused


def _bad_output_cases(tmp: Path, sources: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """Case name -> (source and options, expected message)."""
    video, folder = sources["video"], sources["folder"]
    alias = Path(video.parent.name, video.name)
    return {
        "output under /proc": ([str(folder), "--output", "/proc/out.mp4"], "cannot write /proc/out.mp4"),
        "save-txt under /proc": ([str(folder), "--save-txt", "/proc/lorat/boxes.txt"],
                                 "cannot write /proc/lorat/boxes.txt"),
        "output is a folder": ([str(folder), "--output", str(tmp / "adir")], f"{tmp / 'adir'} is a folder"),
        "save-txt is a folder": ([str(folder), "--save-txt", str(tmp / "adir")], f"{tmp / 'adir'} is a folder"),
        "save-txt ends in /": ([str(folder), "--save-txt", str(tmp / "new") + "/"], "names a folder"),
        "output is the source": ([str(video), "--output", str(video)], "would overwrite the source"),
        "save-txt is the source": ([str(video), "--save-txt", str(video)], "would overwrite the source"),
        "save-txt is the source by another path": ([str(video), "--save-txt", str(video.parent / ".." / alias)],
                                                   "would overwrite the source"),
        "save-txt is a frame": ([str(folder), "--save-txt", str(folder / "00000001.png")],
                                "would overwrite or add a frame to the source"),
        "save-txt is a new image in the folder": ([str(folder), "--save-txt", str(folder / "boxes.jpg")],
                                                  "would overwrite or add a frame to the source"),
        "outputs collide": ([str(folder), "--output", str(tmp / "o.avi"), "--save-txt", str(tmp / "o.avi")],
                            "more than once"),
        "bad device": ([str(folder), "--device", "banana"], "unknown device 'banana'"),
        "nan box": ([str(folder), "--init", "nan,77,40,38"], "finite"),
    }


BAD_OUTPUTS = list(_bad_output_cases(Path("/t"), {"video": Path("/v/clip.avi"), "folder": Path("/f")}))


@pytest.mark.parametrize("case", BAD_OUTPUTS)
def test_bad_outputs_give_one_clear_line(case, short_sources, tmp_path, capsys):
    """Refused before the model loads: one error line, exit 2, the source and the folder untouched."""
    (tmp_path / "adir").mkdir()
    argv, message = _bad_output_cases(tmp_path, short_sources)[case]
    before = {p: p.read_bytes() for p in [short_sources["video"], *short_sources["folder"].iterdir()]}
    listing = sorted(tmp_path.iterdir())
    code = run_cli(main, [*argv[:1], *MODEL_ARGS, *ONE, *argv[1:]])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert message in stderr and stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(tmp_path.iterdir()) == listing
    assert not Path("/proc/lorat").exists()


def test_mps_device_when_absent(capsys):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert run_cli(main, [str(TINY / "sequence"), *MODEL_ARGS, *ONE, "--device", "mps"]) == 2
    stderr = capsys.readouterr().err
    assert "MPS is not available" in stderr and stderr.count("\n") == 1


def test_negative_init_coordinates_are_accepted(tmp_path, short_sources):
    out = tmp_path / "o.txt"
    assert main([str(short_sources["folder"]), *MODEL_ARGS, "--init", "-5,10,50,50", "--init", "-8 20 40 40",
                 "--save-txt", str(out), "--max-frames", "2"]) == 0
    assert (tmp_path / "o_1.txt").read_text().startswith("0.000\t10.000\t45.000\t50.000")
    assert (tmp_path / "o_2.txt").read_text().startswith("0.000\t20.000\t32.000\t40.000")


def test_save_txt_writes_exactly_the_path_given(tmp_path, short_sources):
    main([str(short_sources["folder"]), *MODEL_ARGS, *ONE, "--save-txt", str(tmp_path / "boxes"), "--max-frames", "3"])
    main([str(short_sources["folder"]), *MODEL_ARGS, *TWO, "--save-txt", str(tmp_path / "run.csv"),
          "--max-frames", "3"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "boxes", "boxes_scores.txt", "run_1.csv", "run_1_scores.txt", "run_2.csv", "run_2_scores.txt"]
    assert len((tmp_path / "boxes").read_text().splitlines()) == 3


@pytest.mark.parametrize("failure", [
    ["--init", "900,77,40,38"],                      # box outside the frame: fails in tracker.init
    [*ONE, "--weights", str(TINY / "meta.json")],    # not weights: fails while loading the model
    [*ONE, "--output", "/proc/out.mp4"],             # an output that cannot be written
])
def test_failed_start_leaves_existing_outputs_alone(failure, tmp_path, short_sources, capsys):
    (tmp_path / "o.txt").write_text("keep me\n")
    (tmp_path / "o_scores.txt").write_text("keep me too\n")
    (tmp_path / "o.mp4").write_bytes(b"an old video")
    output = [] if "--output" in failure else ["--output", str(tmp_path / "o.mp4")]
    code = run_cli(main, [str(short_sources["folder"]), *MODEL_ARGS, *failure, "--save-txt", str(tmp_path / "o.txt"),
                          *output])
    assert code == 2 and capsys.readouterr().err.count("\n") == 1
    assert (tmp_path / "o.txt").read_text() == "keep me\n"
    assert (tmp_path / "o_scores.txt").read_text() == "keep me too\n"
    assert (tmp_path / "o.mp4").read_bytes() == b"an old video"


# ----------------------------------------------------------------------------- faults during the run


def test_video_write_error_mid_run_keeps_the_lines(tmp_path, short_sources, capsys, monkeypatch):
    original = VideoWriter._encode

    def encode(self, frame, *args):
        if self.frames == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, frame, *args)

    monkeypatch.setattr(VideoWriter, "_encode", encode)
    code = run_cli(main, [str(short_sources["folder"]), *MODEL_ARGS, *ONE, "--save-txt", str(tmp_path / "o.txt"),
                          "--output", str(tmp_path / "o.mp4")])
    stderr = capsys.readouterr().err
    assert code == 2
    assert f"error: cannot write video {tmp_path / 'o.mp4'}: No space left on device" in stderr
    assert "Traceback" not in stderr
    assert len((tmp_path / "o.txt").read_text().splitlines()) == 4
    assert _video_frames(tmp_path / "o.mp4") == 3  # the frames before the failure stay playable


def test_text_write_error_mid_run(tmp_path, short_sources, capsys, monkeypatch):
    """A full disk (``/dev/full``) under the score file: a clear error, the box lines kept."""
    import builtins

    def fake_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("_scores.txt") and "w" in mode:
            return builtins.open("/dev/full", mode, *args, **kwargs)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(lorat.track, "open", fake_open, raising=False)
    code = run_cli(main, [str(short_sources["folder"]), *MODEL_ARGS, *ONE, "--save-txt", str(tmp_path / "o.txt")])
    stderr = capsys.readouterr().err
    assert code == 2 and "No space left on device" in stderr and "Traceback" not in stderr
    assert len((tmp_path / "o.txt").read_text().splitlines()) == 1


def test_non_finite_model_outputs_stop_with_the_lines_kept(tmp_path, short_sources, capsys, monkeypatch):
    import lorat.tracking.step

    original, calls = lorat.tracking.step.run_model, []

    def run_model(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        return {k: torch.full_like(v, float("nan")) if len(calls) >= 3 else v for k, v in out.items()}

    monkeypatch.setattr(lorat.tracking.step, "run_model", run_model)
    code = run_cli(main, [str(short_sources["folder"]), *MODEL_ARGS, *ONE, "--save-txt", str(tmp_path / "o.txt")])
    stdout, stderr = capsys.readouterr()
    assert code == 2 and "non-finite" in stderr and "Traceback" not in stderr
    lines = (tmp_path / "o.txt").read_text().splitlines()
    assert len(lines) == 3 and "nan" not in "".join(lines)
    assert "kept 3 frame(s)" in stdout


# ----------------------------------------------------------------------------- damaged videos


def _avi_chunks(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the frame payloads of an AVI file, in order (the 'movi' list)."""
    pos, end = data.index(b"movi") + 4, data.index(b"idx1")
    chunks = []
    while pos + 8 <= end:
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        if data[pos + 2:pos + 4] in (b"dc", b"db"):
            chunks.append((pos + 8, size))
        pos += 8 + size + size % 2
    return chunks


def test_video_damaged_in_the_middle_is_tracked_to_the_end(tmp_path, capsys):
    """Frame 9's JPEG data is destroyed (the AVI structure is intact): OpenCV cannot decode it, the
    frames after it decode again, and line k stays frame k."""
    frames = sorted((TINY / "sequence").glob("*.png"))
    data = bytearray(_write_avi(tmp_path / "clip.avi", frames).read_bytes())
    offset, size = _avi_chunks(bytes(data))[8]
    data[offset:offset + size] = bytes(size)
    (tmp_path / "damaged.avi").write_bytes(data)
    code = run_cli(main, [str(tmp_path / "damaged.avi"), *MODEL_ARGS, *ONE, "--save-txt", str(tmp_path / "o.txt")])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    lines = (tmp_path / "o.txt").read_text().splitlines()
    assert len(lines) == 16 and lines[8] == lines[7]
    scores = np.loadtxt(tmp_path / "o_scores.txt")
    assert scores[8] == 0 and scores[9] > 0
    assert "frame 9" in stdout + stderr and "stream ended" not in stdout + stderr
    intact, damaged = open_source(str(tmp_path / "clip.avi")), open_source(str(tmp_path / "damaged.avi"))
    for (i, good), (j, frame) in zip(intact, damaged, strict=True):  # same frames at the same indices
        assert i == j and (frame is None if i == 8 else np.array_equal(frame, good)), i
    intact.close()
    damaged.close()


def test_frame_count_off_by_one_is_not_a_warning(tmp_path):
    """Containers often count one frame more than they decode; only a real shortfall is reported."""
    clip = _write_avi(tmp_path / "clip.avi", sorted((TINY / "sequence").glob("*.png"))[:4])
    for claimed, warned in ((4, False), (5, False), (7, True)):
        source = open_source(str(clip))
        source.frame_count = claimed
        assert len(list(source)) == 4
        source.close()
        assert bool(source.warnings) == warned, (claimed, source.warnings)


def test_threads_option(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert run_cli(main, [str(TINY / "sequence"), *MODEL_ARGS, "--init", "76,77,40,38", "--max-frames", "2",
                              "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert run_cli(main, [str(TINY / "sequence"), *MODEL_ARGS, "--init", "76,77,40,38", "--threads", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_bench_table_forwards_the_options_but_its_own():
    from lorat.bench import _without

    argv = ["cfg.yaml", "--dtype", "bfloat16", "--frames", "6", "--backend=torch", "--compile", "--iters", "2"]
    assert _without(argv, ("--dtype", "--backend"), ("--compile",)) == ["cfg.yaml", "--frames", "6", "--iters", "2"]


@pytest.mark.slow
def test_bench_table_runs_every_variant(capsys):
    from lorat.bench import main as bench_main

    bench_main([str(TINY / "config.yaml"), "--device", "cpu", "--frames", "4", "--iters", "2", "--table"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert rows[0].startswith("| torch | float32 |") and rows[0].endswith("| 0.0e+00 |")
    assert any(r.startswith("| torch compiled | float32 |") for r in rows)
    assert all("failed" not in r for r in rows)


# ----------------------------------------------------------------------------- sources: order, timing, targets


def test_unpadded_frame_names_are_tracked_in_natural_order(tmp_path, capsys):
    """``frame1.png ... frame16.png`` give the fixture's boxes (read as 1, 10, 11, ..., 2, they would not)."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for k, path in enumerate(sorted((TINY / "sequence").glob("*.png")), start=1):
        shutil.copy(path, frames / f"frame{k}.png")
    out = tmp_path / "o.txt"
    assert run_cli(main, [str(frames), *MODEL_ARGS, *ONE, "--save-txt", str(out)]) == 0
    np.testing.assert_allclose(np.loadtxt(out), np.loadtxt(TINY / "expected_boxes.txt"), atol=0.05, rtol=0)
    shutil.copy(frames / "frame3.png", frames / "frame03.png")  # two names for frame 3: refused, not guessed
    capsys.readouterr()
    assert run_cli(main, [str(frames), *MODEL_ARGS, *ONE]) == 2
    stderr = capsys.readouterr().err
    assert "frame03.png and frame3.png have the same number" in stderr and stderr.count("\n") == 1


def test_variable_frame_rate_video_keeps_its_timing(tmp_path, capsys):
    """A video of 1 s at 30 fps then 1 s at 10 fps: the annotated .mp4 shows every frame at its own
    time (not 40 frames evenly spread at the average rate), so it lasts as long as the source."""
    from .test_sources import frame_times, shown_for, vfr_clip

    clip = vfr_clip(tmp_path)
    code = run_cli(main, [str(clip), *MODEL_ARGS, "--init", "10,30,30,30", "--output", str(tmp_path / "out.mp4"),
                          "--save-txt", str(tmp_path / "out.txt")])
    assert code == 0, capsys.readouterr().err
    before, after = frame_times(clip), frame_times(tmp_path / "out.mp4")
    assert len(before) == len(after) == len((tmp_path / "out.txt").read_text().splitlines()) == 40
    assert shown_for(after) == pytest.approx(shown_for(before), rel=0.05)
    np.testing.assert_allclose(after, before, atol=0.5)  # frame 31 at 1 s, not at 1.5 s


def test_reselecting_two_boxes_on_one_object_is_ignored(tmp_path, short_sources, capsys, monkeypatch):
    """``r`` in the window, then two boxes drawn on one object: refused, the targets go on as they were."""
    keys = iter([None, "r"])
    monkeypatch.setattr(lorat.track, "has_display", lambda: True)
    monkeypatch.setattr(lorat.track, "_show", lambda frame: next(keys, None))
    monkeypatch.setattr(lorat.track, "_select_boxes", lambda frame: [(76.0, 77.0, 40.0, 38.0)] * 2)
    monkeypatch.setattr(cv2, "destroyAllWindows", lambda: None)
    out = tmp_path / "o.txt"
    code = run_cli(main, [str(short_sources["folder"]), *MODEL_ARGS, *TWO, "--show", "--save-txt", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "re-selection ignored: init box 1 (76, 77, 40, 38) and init box 2" in stdout + stderr
    alone = tmp_path / "alone.txt"
    assert run_cli(main, [str(short_sources["folder"]), *MODEL_ARGS, *TWO, "--save-txt", str(alone)]) == 0
    for k in (1, 2):
        assert (tmp_path / f"o_{k}.txt").read_text() == (tmp_path / f"alone_{k}.txt").read_text()


# ----------------------------------------------------------------------------- the window, under Xvfb


def _xdotool(*args: str, display: str, timeout: float = 30) -> str:
    proc = subprocess.run([shutil.which("xdotool"), *args], capture_output=True, text=True, timeout=timeout,
                          env={"DISPLAY": display}, check=True)
    return proc.stdout


def _start_xvfb() -> tuple[subprocess.Popen, str]:
    """A virtual screen; Xvfb picks a free display number and writes it to a pipe."""
    import os

    read, write = os.pipe()
    server = subprocess.Popen([shutil.which("Xvfb"), "-displayfd", str(write), "-screen", "0", "1024x768x24",
                               "-nolisten", "tcp"], pass_fds=(write,), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    if not number:
        server.kill()
        pytest.fail("Xvfb did not start")
    return server, f":{number}"


def _wait_for_lines(path: Path, lines: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {lines} lines (exit status {proc.poll()})")


def test_show_and_drawing_the_box_with_the_mouse_under_xvfb(tmp_path):
    """``--show`` without ``--init`` on a virtual screen: drag a box in the window, Enter, Esc; the
    tracking starts on it and ``q`` stops it. Needs Xvfb and xdotool (``.ci/run`` installs them)."""
    import os
    import time

    if not shutil.which("Xvfb") or not shutil.which("xdotool"):
        pytest.skip("needs Xvfb and xdotool on PATH")
    frames = tmp_path / "frames"
    frames.mkdir()
    fixture = sorted((TINY / "sequence").glob("*.png"))
    for k in range(2000):  # long enough that q comes before the end
        os.symlink(fixture[k % len(fixture)], frames / f"{k:05d}.png")
    server, display = _start_xvfb()
    out = tmp_path / "o.txt"
    proc = subprocess.Popen([sys.executable, "-m", "lorat.track", str(frames), *MODEL_ARGS, "--show", "--save-txt",
                             str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DISPLAY": display})
    try:
        window = _xdotool("search", "--sync", "--onlyvisible", "--name", "^lorat$", display=display,
                          timeout=120).split()[0]
        geometry = dict(line.split("=") for line in _xdotool("getwindowgeometry", "--shell", window,
                                                             display=display).split())
        x, y, w, h = (int(geometry[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))
        start, end = (x + w * 35 // 100, y + h * 40 // 100), (x + w * 55 // 100, y + h * 60 // 100)
        _xdotool("windowfocus", window, display=display)
        _xdotool("mousemove", str(start[0]), str(start[1]), "mousedown", "1", "mousemove", str(start[0] + 5),
                 str(start[1] + 5), "mousemove", str(end[0]), str(end[1]), "mouseup", "1", display=display)
        time.sleep(0.5)
        _xdotool("key", "Return", display=display)
        time.sleep(0.5)
        _xdotool("key", "Escape", display=display)
        _wait_for_lines(out, 3, proc)
        _xdotool("windowfocus", window, display=display)
        _xdotool("key", "q", display=display)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        server.terminate()
        server.wait()
    assert proc.returncode == 0, stderr
    assert "Draw a box" in stdout and "stopped by the user" in stdout, stdout
    boxes = np.loadtxt(out, ndmin=2)
    assert 3 <= len(boxes) < 2000
    assert boxes[0, 2] > 5 and boxes[0, 3] > 5  # the box drawn with the mouse
