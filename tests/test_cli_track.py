"""``python -m lorat.track`` as users run it, on the official fixture and on bad inputs."""

import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from lorat.errors import run_cli
from lorat.track import main

from .conftest import ROOT, TINY

MODEL_ARGS = ["--config", str(TINY / "config.yaml"), "--weights", str(TINY / "lorat_trainable.safetensors"),
              "--backbone-weights", str(TINY / "dinov2_backbone.pth"), "--device", "cpu"]


def _run(*args):
    """Run the CLI in a subprocess (what a user sees): (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "lorat.track", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    return proc.returncode, proc.stdout, proc.stderr


def test_fixture_reproduced_by_cli(tmp_path):
    out = tmp_path / "out.txt"
    code, stdout, stderr = _run(TINY / "sequence", *MODEL_ARGS, "--init", "76,77,40,38", "--save-txt", out,
                                "--output", tmp_path / "out.mp4")
    assert code == 0, stderr
    np.testing.assert_allclose(np.loadtxt(out), np.loadtxt(TINY / "expected_boxes.txt"), atol=0.05, rtol=0)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "out_scores.txt"), np.loadtxt(TINY / "expected_confidence.txt"),
                               atol=1e-4, rtol=0)
    assert "\t" in out.read_text().splitlines()[0]
    video = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 16
    assert "tracking" in stderr and "16 frames" in stdout  # progress bar and summary


def test_several_targets_one_file_each(tmp_path):
    main([str(TINY / "sequence"), *MODEL_ARGS, "--init", "76,77,40,38", "--init", "150 100 30 30",
          "--save-txt", str(tmp_path / "run.txt"), "--max-frames", "5"])
    for k in (1, 2):
        assert len((tmp_path / f"run_{k}.txt").read_text().splitlines()) == 5
        assert len((tmp_path / f"run_{k}_scores.txt").read_text().splitlines()) == 5
    assert (tmp_path / "run_2.txt").read_text().startswith("150.0000\t100.0000\t30.0000\t30.0000")


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
    n = len((tmp_path / "cut.txt").read_text().splitlines())
    assert 1 <= n <= 32
    assert "wrote" in stdout


@pytest.mark.parametrize("args, message", [
    (["missing.mp4", "--init", "1,1,5,5"], "source not found: missing.mp4"),
    ([TINY / "meta.json", "--init", "1,1,5,5"], "cannot open video"),
    ([TINY / "sequence", "--init", "76,77,0,38"], "positive width and height"),
    ([TINY / "sequence", "--init", "900,77,40,38"], "outside the"),
    ([TINY / "sequence", "--init", "76,77,40"], "--init expects x,y,w,h"),
    ([TINY / "sequence"], "no --init box given and no display"),
    ([TINY / "sequence", "--init", "76,77,40,38", "--device", "cpu", "--dtype", "float16"], "float16 autocast"),
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
    assert "none.safetensors is missing" in capsys.readouterr().err


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
    assert set(result["split_ms"]) == {"decode", "crop", "model", "postprocess"}
    assert result["peak_memory_mb"]["process_rss"] > 0
