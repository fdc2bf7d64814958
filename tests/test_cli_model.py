"""The model CLIs as a user runs them: ``python -m lorat.info`` and ``python -m lorat.export``."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lorat.checkpoint.loader import load_model
from lorat.errors import run_cli
from lorat.export import main as export_main
from lorat.info import main as info_main

from .conftest import ROOT


def test_info_b224(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert run_cli(info_main, ["configs/b224.yaml"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["trainable"] == 12_985_349
    assert info["tokens"] == {"template": 64, "search": 256, "total": 320,
                              "template_grid": [8, 8], "search_grid": [16, 16]}


def test_info_with_weights(capsys, tiny_files, tiny_dir):
    info_main([str(tiny_dir / "config.yaml"), "--weights", str(tiny_files["trainable"]),
               "--backbone-weights", str(tiny_files["backbone"])])
    info = json.loads(capsys.readouterr().out)
    assert [f["format"] for f in info["loaded"]["files"]] == ["official-trainable", "dinov2"]
    assert info["loaded"]["parameters"] == info["parameters"]["inference"]


def test_export_cli_roundtrip(tmp_path, tiny_files, tiny_dir, capsys):
    out = tmp_path / "tiny.safetensors"
    export_main(["--config", str(tiny_dir / "config.yaml"), "--weights", str(tiny_files["trainable"]),
                 "--backbone-weights", str(tiny_files["backbone"]), "--output", str(out)])
    assert "wrote" in capsys.readouterr().out
    model, _ = load_model(out)
    ref = load_file(tiny_files["forward"])
    with torch.no_grad():
        score = model(ref["z"], ref["x"], ref["z_feat_mask"])["score_map"]
    torch.testing.assert_close(score, ref["score_map"], atol=1e-4, rtol=0)
    info_main(["--weights", str(out)])  # the single file needs no config
    assert json.loads(capsys.readouterr().out)["variant"] == "official-tiny"


@pytest.mark.parametrize("args, message", [
    (["configs/b224.yaml", "--weights", "missing.safetensors"], "weight file not found: missing.safetensors"),
    (["configs/nope.yaml"], "config file not found"),
    (["tests/fixtures/official-tiny/config.yaml", "--weights",
      "tests/fixtures/official-tiny/lorat_trainable.safetensors"],
     "(the backbone weights); pass --backbone-weights FILE"),
])
def test_cli_errors_are_messages(args, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert run_cli(info_main, args) == 2
    assert message in capsys.readouterr().err
