"""The README's Python examples run as written (the named model swapped for the bundled demo model)."""

from __future__ import annotations

import re
from pathlib import Path

import cv2

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
