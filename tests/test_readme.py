"""The README's Python examples run as written (the named model swapped for the bundled demo model)."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from lorat.errors import run_cli
from lorat.files import bundled_weights

from .helpers import textured_clip

README = Path(__file__).resolve().parent.parent / "README.md"


def _block_after(heading: str) -> str:
    """The first ```python block after the line ``heading``."""
    text = README.read_text()
    start = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python example after {heading!r}"
    return match.group(1)


def _namespace(tmp_path: Path) -> dict:
    frames, boxes = textured_clip(6)
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, frames[0].shape[1::-1])
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    x, y, w, h = boxes[0]
    return {"first_frame_rgb": frames[0], "frames": frames[1:], "frame": frames[1], "x": x, "y": y, "w": w, "h": h,
            "box_a": boxes[0], "box_b": (10, 10, 40, 30), "box_c": (200, 150, 30, 30), "clip": clip}


def _run(code: str, namespace: dict) -> dict:
    code = code.replace('"LoRAT-B-224"', repr(str(bundled_weights())))
    code = code.replace('"clip.mp4"', repr(str(namespace["clip"])))
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (the README's own example)
    return namespace


def test_python_api_example(tmp_path):
    namespace = _run(_block_after("## Python API"), _namespace(tmp_path))
    tracker, step = namespace["tracker"], namespace["step"]
    assert tracker.num_targets == 1 and step.index == len(namespace["frames"]) - 1
    assert len(namespace["results"]) == 2 and 0.0 <= namespace["result"].score <= 1.0


def test_streaming_example(tmp_path, capsys):
    namespace = _namespace(tmp_path)
    _run(_block_after("## Python API"), namespace)
    _run(_block_after("Streaming a video file"), namespace)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[0].startswith("0 (")


# ----------------------------------------------------------------------------- shell examples

# The README's commands that run here, offline, with what keeps them short (appended to the command).
RUNNABLE = {
    "python -m lorat.track assets/box.mp4 --init 290,14,308,228 --output box_tracked.mp4 --save-txt box_tracked.txt":
        ["--max-frames", "8"],
    "python -m lorat.info configs/b224.yaml": [],
    "python -m lorat.export --weights weights/lorat_demo.safetensors --onnx demo.onnx": [],
    "python -m lorat.track assets/box.mp4 --weights demo.onnx --init 290,14,308,228 --save-txt box.txt":
        ["--max-frames", "8"],
    "python -m lorat.data.synthetic data/synthetic --sequences 1000 --frames 100 --seed 0":
        ["--sequences", "2", "--frames", "4"],
    "python -m lorat.data.synthetic data/syn-val --sequences 20 --frames 100 --seed 1000":
        ["--sequences", "2", "--frames", "4"],
    "python -m lorat.vot.workspace vot-ws": [],
    "python -m lorat.vot --ini LoRAT --weights LoRAT-B-224 --device cuda >> trackers.ini": [],
}
SLOW = {  # minutes on two cores: run with -m slow
    "python -m lorat.bench configs/b224.yaml --device cpu": ["--frames", "4", "--iters", "2"],
    "python bench/compare.py --video assets/box.mp4 --gt assets/box_pseudo_gt.txt "
    "--weights weights/lorat_demo.safetensors --mil": [],
}
# What cannot run here, and why (a prefix of the command).
NEEDS = {
    "pip install": "installs packages (CI runs the test command itself)",
    "python -m lorat.track assets/box.mp4 --weights LoRAT-B-224": "the official checkpoint (not redistributable)",
    "python -m lorat.track video.mp4": "a video of the user's",
    "python -m lorat.info configs/b224.yaml --weights weights/LoRAT-B-224": "the official checkpoint",
    "python -m lorat.export --config configs/b224.yaml": "the official checkpoint",
    "python -m lorat.export --weights weights/lorat_b224.safetensors": "the file the previous command writes",
    "python apps/gradio_app.py": "a server (tests/test_app.py runs the app)",
    "python -m lorat.train": "datasets or a run folder of the user's (tests/test_train.py trains)",
    "tensorboard": "a server",
    "torchrun": "several processes on several GPUs (the slow tests run torchrun on the CPU)",
    "MNV2=": "a package from PyPI",
    "python bench/compare.py --dataset": "the demo model's training run",
    "python -m lorat.evaluate": "benchmark datasets (tests/test_evaluate.py evaluates generated ones)",
    "python -m lorat.vot --ini LoRAT_SAM": "a SAM checkpoint",
    "vot ": "the VOT toolkit's datasets (tests/test_vot.py runs vot test / evaluate / analysis offline)",
    "bash bench/report_demo.sh": "the reporting clips and an hour",
}


def readme_commands() -> list[str]:
    """Every command in the README's bash blocks (continuations joined, comments and shown output dropped)."""
    commands = []
    for kind, block in re.findall(r"```(bash|console)\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#") or (kind == "console" and not line.startswith("$ ")):
                continue
            line = re.sub(r"\s+#\s.*$", "", line.removeprefix("$ "))
            commands.append(re.sub(r"\s+", " ", line).strip())
    return commands


def test_every_readme_command_is_run_or_says_why_not():
    unclassified = [c for c in readme_commands()
                    if c not in RUNNABLE and c not in SLOW and not c.startswith(tuple(NEEDS))
                    and not c.startswith("python -c ")]
    assert unclassified == [], "add each to RUNNABLE, SLOW or NEEDS in tests/test_readme.py"


def _run_in_order(commands: dict[str, list[str]], folder: Path, capsys) -> None:
    """Run README commands one after the other in ``folder``, which gets the checkout's assets, configs,
    weights and bench. ``python -m lorat.X`` runs in this process (as its console script would: the
    module's ``main`` under ``run_cli``), everything else in a subprocess."""
    root = README.parent
    for name in ("assets", "configs", "weights", "bench"):
        (folder / name).symlink_to(root / name)
    for command, extra in commands.items():
        line, _, redirect = command.partition(" >> ")
        argv = shlex.split(line)[1:] + extra
        if argv[0] == "-m" and argv[1].startswith("lorat."):
            module = importlib.import_module(argv[1] + (".server" if argv[1] == "lorat.vot" else ""))
            capsys.readouterr()
            code = run_cli(module.main, argv[2:])
            out, err = capsys.readouterr()
        else:
            run = subprocess.run([sys.executable, *argv], cwd=folder, capture_output=True, text=True, timeout=900)
            code, out, err = run.returncode, run.stdout, run.stderr
        assert code == 0, f"{command}\n{err[-2000:]}"
        if redirect:
            with open(folder / redirect, "a") as f:
                f.write(out)


def test_readme_commands_run(tmp_path, monkeypatch, capsys):
    """The offline commands, in README order in one folder (the ONNX file is used after it is written)."""
    order = [c for c in readme_commands() if c in RUNNABLE]
    assert sorted(order) == sorted(RUNNABLE), "a RUNNABLE command is no longer in the README"
    monkeypatch.chdir(tmp_path)
    _run_in_order({c: RUNNABLE[c] for c in order}, tmp_path, capsys)
    assert len((tmp_path / "box_tracked.txt").read_text().splitlines()) == 8
    assert (tmp_path / "vot-ws" / "trackers.ini").is_file() and "[LoRAT]" in (tmp_path / "trackers.ini").read_text()


@pytest.mark.slow
def test_readme_commands_that_take_minutes(tmp_path, monkeypatch, capsys):
    assert all(c in readme_commands() for c in SLOW), "a SLOW command is no longer in the README"
    monkeypatch.chdir(tmp_path)
    _run_in_order(SLOW, tmp_path, capsys)
