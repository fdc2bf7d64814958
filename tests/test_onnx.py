"""ONNX export and the onnxruntime backend (optional extra): same outputs, same trajectory."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorat.errors import run_cli
from lorat.export import main as export_main
from lorat.track import main as track_main
from lorat.tracking.tracker import Tracker

from .conftest import TINY

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MODEL = ["--config", str(TINY / "config.yaml"), "--weights", str(TINY / "lorat_trainable.safetensors"),
         "--backbone-weights", str(TINY / "dinov2_backbone.pth")]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert run_cli(export_main, [*MODEL, "--onnx", str(path)]) == 0
    return path


def test_onnxruntime_matches_the_official_forward(tiny_onnx):
    from lorat.checkpoint.onnx import load_onnx

    model, config = load_onnx(tiny_onnx)
    assert config.model.variant == "official-tiny"
    ref = load_file(TINY / "forward.safetensors")
    out = model(ref["z"], ref["x"], ref["z_feat_mask"])
    torch.testing.assert_close(out["score_map"], ref["score_map"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["boxes"], ref["boxes"], atol=1e-4, rtol=0)


def test_cli_with_onnxruntime_reproduces_the_official_trajectory(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "boxes.txt"
    assert run_cli(track_main, [str(TINY / "sequence"), "--weights", str(tiny_onnx), "--backend", "onnxruntime",
                                "--init", "76,77,40,38", "--save-txt", str(out)]) == 0
    np.testing.assert_allclose(np.loadtxt(out), np.loadtxt(TINY / "expected_boxes.txt"), atol=0.05, rtol=0)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "boxes_scores.txt"), np.loadtxt(TINY / "expected_confidence.txt"),
                               atol=1e-4, rtol=0)


def test_backend_errors_are_messages(tiny_onnx, tmp_path, capsys):
    sequence = str(TINY / "sequence")
    assert run_cli(track_main, [sequence, *MODEL, "--backend", "onnxruntime", "--init", "76,77,40,38"]) == 2
    assert "runs an .onnx file" in capsys.readouterr().err
    assert run_cli(track_main, [sequence, "--weights", str(tiny_onnx), "--backend", "torch",
                                "--init", "76,77,40,38"]) == 2
    assert "is an ONNX model" in capsys.readouterr().err
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(tiny_onnx.read_bytes()[:1000])
    assert run_cli(track_main, [sequence, "--weights", str(broken), "--init", "76,77,40,38"]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    with pytest.raises(Exception, match="CPU in float32"):
        Tracker.from_pretrained(tiny_onnx, device="cpu", dtype="bfloat16")
