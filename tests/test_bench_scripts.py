"""The scripts behind the README's numbers (bench/): compare, contact sheet, start-up, busy threads, official step."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from lorat.checkpoint.loader import save_model
from lorat.data.sequences import read_dataset
from lorat.evaluation.metrics import sequence_curves, summarize_curves
from lorat.model.vit import LoRAT

from .conftest import ROOT
from .helpers import tiny_config


def _script(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
def test_compare_scores_the_static_box_like_the_metrics(synthetic, tmp_path):
    cfg = tiny_config()
    weights = save_model(LoRAT(cfg.model).eval(), cfg, tmp_path / "tiny.safetensors")
    run = _script("bench/compare.py", "--dataset", f"lasot={synthetic}", "--weights", weights, "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert set(result) == {"lorat", "static"} and result["lorat"]["sequences"] == 4
    curves = []
    for seq in read_dataset("lasot", synthetic, "all", for_training=False):
        gt = seq.tracks[0].xywh()
        curves.append(sequence_curves(np.repeat(gt[:1], len(gt), 0), gt, seq.tracks[0].present, "lasot"))
    expected = summarize_curves(curves)
    for key in ("success_auc", "precision", "norm_precision"):
        assert abs(result["static"][key] - expected[key]) < 1e-6
    bad = _script("bench/compare.py", "--video", tmp_path / "missing.mp4", "--gt", tmp_path / "gt.txt",
                  "--weights", weights)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_contact_sheet(tmp_path):
    out = tmp_path / "sheet.png"
    run = _script("bench/contact_sheet.py", ROOT / "assets" / "box.mp4", out, "--frames", "3", "--columns", "2",
                  "--tile-width", "64")
    assert run.returncode == 0, run.stderr
    sheet = cv2.imread(str(out))
    assert sheet.shape == (2 * 48, 2 * 64, 3)  # 640x480 tiles scaled to 64x48, one blank filler
    assert sheet[48:, 64:].max() == 0 and sheet[:48, :64].std() > 5
    bad = _script("bench/contact_sheet.py", tmp_path / "missing.mp4", out)
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_official_train_step_needs_a_checkout(tmp_path):
    run = _script("bench/official_train_step.py", "--official", tmp_path)
    assert run.returncode == 2 and "not a checkout of LitingLin/LoRAT" in run.stderr


@pytest.mark.slow
def test_startup_benchmark_prints_the_ratio_and_the_steps():
    run = _script("bench/startup.py", "--repeats", "1")
    assert run.returncode == 0, run.stderr
    assert "ratio" in run.stdout and "first tracked box" in run.stdout and "load the model (onnxruntime)" in run.stdout


@pytest.mark.slow
def test_busy_threads_benchmark_runs(tmp_path):
    run = _script("bench/busy_threads.py", "--loads", "0", "--repeats", "1", "--frames", "5", "--b224-frames", "0")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("| demo") == 2


def test_compare_set_changes_only_checked_tracking_settings():
    import importlib.util

    from lorat.errors import ConfigError

    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    cfg = tiny_config()
    changed = compare._with_tracking(cfg, ["tracking.window_penalty=0.3", "tracking.search_area_factor=4.5"])
    assert (changed.tracking.window_penalty, changed.tracking.search_area_factor) == (0.3, 4.5)
    assert changed.model == cfg.model
    for bad, message in (("model.depth=2", "only tracking"), ("tracking.window=0.3", "no tracking setting"),
                         ("tracking.window_penalty=1.5", "window_penalty")):
        with pytest.raises(ConfigError, match=message):
            compare._with_tracking(cfg, [bad])


def test_average_weights_interpolates_and_never_overwrites(tmp_path, capsys):
    import importlib.util

    import torch

    from lorat.checkpoint.loader import load_model
    from lorat.errors import run_cli

    spec = importlib.util.spec_from_file_location("average_weights", ROOT / "bench" / "average_weights.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = tiny_config()
    torch.manual_seed(0)
    a = save_model(LoRAT(cfg.model), cfg, tmp_path / "a.safetensors")
    b = save_model(LoRAT(cfg.model), cfg, tmp_path / "b.safetensors")
    out = tmp_path / "mid.safetensors"
    assert run_cli(script.main, [str(a), str(b), "--alpha", "0.25", "--out", str(out)]) == 0
    (ma, _), (mb, _), (mid, config) = load_model(a), load_model(b), load_model(out)
    assert config == cfg
    for key, value in mid.state_dict().items():
        torch.testing.assert_close(value, 0.75 * ma.state_dict()[key] + 0.25 * mb.state_dict()[key])
    written = out.read_bytes()
    assert run_cli(script.main, [str(a), str(b), "--alpha", "0.5", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == written
    other = tiny_config(depth=1)
    c = save_model(LoRAT(other.model), other, tmp_path / "c.safetensors")
    assert run_cli(script.main, [str(a), str(c), "--alpha", "0.5", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "different networks" in capsys.readouterr().err
    assert run_cli(script.main, [str(a), str(b), "--alpha", "2", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "[0, 1]" in capsys.readouterr().err
