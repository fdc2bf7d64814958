"""End-to-end evaluation: synthetic LaSOT -> tracked results -> score, resume, repeats, submissions."""

import json
import shutil
import zipfile

import numpy as np
import pytest
import torch

from lorat.checkpoint import build_lorat, save_model
from lorat.config import load_config
from lorat.data.sequences import DatasetError
from lorat.data.synthetic import write_dataset
from lorat.errors import run_cli
from lorat.evaluate import main
from lorat.tracker import Tracker

from .conftest import ROOT


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "lasot"
    write_dataset(data, sequences=3, frames=12, size=(160, 128), seed=5, progress=False)
    cfg = load_config(ROOT / "configs" / "debug.yaml")
    torch.manual_seed(0)
    weights = save_model(build_lorat(cfg.model, lora=False).eval(), cfg, root / "debug.safetensors")
    return data, weights


def _evaluate(data, weights, out, *extra):
    return run_cli(main, ["--weights", str(weights), "--dataset", f"lasot={data}", "--output", str(out),
                          "--device", "cpu", "--batch", "2", *extra])


def test_run_then_score_gives_the_same_numbers(setup, tmp_path, capsys):
    data, weights = setup
    assert _evaluate(data, weights, tmp_path) == 0
    folder = tmp_path / "lasot" / "debug"
    names = sorted(p.stem for p in folder.glob("*.txt") if not p.stem.endswith("_time"))
    assert names == ["synthetic-1", "synthetic-2", "synthetic-3"]
    first = (folder / "synthetic-1.txt").read_text().splitlines()[0].split("\t")
    gt = (data / "synthetic" / "synthetic-1" / "groundtruth.txt").read_text().splitlines()[0].split(",")
    assert [float(v) for v in first] == [float(v) for v in gt]  # LaSOT files are 1-based, like the ground truth
    assert len((folder / "synthetic-1_time.txt").read_text().splitlines()) == 12
    run = json.loads((folder / "metrics.json").read_text())
    for png in ("success.png", "precision.png", "norm_precision.png"):
        assert (tmp_path / "lasot" / png).stat().st_size > 1000
    capsys.readouterr()
    assert run_cli(main, ["score", "--dataset", f"lasot={data}", "--results", str(folder), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    for key in ("success_auc", "precision", "norm_precision"):
        assert scored[key] == pytest.approx(run[key], abs=1e-9)
        assert 0 <= scored[key] <= 1


def test_batched_runner_equals_single_tracker(setup, tmp_path):
    data, weights = setup
    _evaluate(data, weights, tmp_path)
    tracker = Tracker.from_pretrained(weights, device="cpu")
    import cv2

    seq = data / "synthetic" / "synthetic-2"
    gt = np.loadtxt(seq / "groundtruth.txt", delimiter=",")
    frames = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted((seq / "img").glob("*.jpg"))]
    init = gt[0] - [1, 1, 0, 0]
    single = np.array([r.box for r in tracker.track_video(frames, init)]) + [1, 1, 0, 0]
    batched = np.loadtxt(tmp_path / "lasot" / "debug" / "synthetic-2.txt")
    np.testing.assert_allclose(batched, single, atol=2e-3)


def test_resume_and_repeats(setup, tmp_path, capsys):
    data, weights = setup
    assert _evaluate(data, weights, tmp_path, "--repeat", "2", "--name", "mine") == 0
    for run in ("mine_001", "mine_002"):
        assert (tmp_path / "lasot" / run / "synthetic-3.txt").is_file()
    summary = json.loads((tmp_path / "lasot" / "mine_metrics.json").read_text())
    assert summary["runs"] == 2
    (tmp_path / "lasot" / "mine_002" / "synthetic-2.txt").unlink()
    capsys.readouterr()
    assert _evaluate(data, weights, tmp_path, "--repeat", "2", "--name", "mine") == 0
    out = capsys.readouterr().out
    assert "3 finished sequences skipped" in out and "2 finished sequences skipped" in out
    assert (tmp_path / "lasot" / "mine_002" / "synthetic-2.txt").is_file()


def test_bad_result_folders(setup, tmp_path, capsys):
    data, weights = setup
    _evaluate(data, weights, tmp_path)
    folder = tmp_path / "lasot" / "debug"
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "synthetic-3.txt").unlink()
    with pytest.raises(DatasetError, match="no result file for 1 of 3 sequences: synthetic-3"):
        main(["score", "--dataset", f"lasot={data}", "--results", str(broken)])
    lines = (folder / "synthetic-3.txt").read_text().splitlines()
    (broken / "synthetic-3.txt").write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(DatasetError, match=r"synthetic-3.txt: 10 boxes for 12 frames"):
        main(["score", "--dataset", f"lasot={data}", "--results", str(broken)])
    (broken / "synthetic-3.txt").write_text("\n".join(lines[:-1] + ["nan\tnan\tnan\tnan"]) + "\n")
    with pytest.warns(UserWarning, match="synthetic-3: 1 NaN"):
        main(["score", "--dataset", f"lasot={data}", "--results", str(broken), str(folder),
              "--output", str(tmp_path / "cmp")])
    table = capsys.readouterr().out
    assert "broken" in table and "debug" in table  # two trackers compared
    assert (tmp_path / "cmp" / "success.png").is_file() and (tmp_path / "cmp" / "broken" / "sequences.csv").is_file()


def test_first_frame_is_the_init_box(setup, tmp_path, capsys):
    data, weights = setup
    _evaluate(data, weights, tmp_path)
    capsys.readouterr()
    folder = tmp_path / "lasot" / "debug"
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    for path in other.glob("synthetic-?.txt"):
        lines = path.read_text().splitlines()
        path.write_text("\n".join(["0\t0\t1\t1", *lines[1:]]) + "\n")  # a garbage first line
    scores = []
    for results in (folder, other):
        main(["score", "--dataset", f"lasot={data}", "--results", str(results), "--json"])
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["success_auc"] == scores[1]["success_auc"]  # frame 1 is scored as the ground truth


def _got10k_layout(src, root):
    """A GOT-10k test split built from the synthetic clips (first-frame box only)."""
    names = []
    for seq in sorted((src / "synthetic").iterdir()):
        d = root / "test" / seq.name
        shutil.copytree(seq / "img", d)
        x, y, w, h = (float(v) for v in (seq / "groundtruth.txt").read_text().splitlines()[0].split(","))
        (d / "groundtruth.txt").write_text(f"{x - 1},{y - 1},{w},{h}\n")
        names.append(seq.name)
    (root / "test" / "list.txt").write_text("\n".join(names) + "\n")


def test_got10k_and_trackingnet_submissions(setup, tmp_path):
    data, weights = setup
    _got10k_layout(data, tmp_path / "got")
    assert run_cli(main, ["--weights", str(weights), "--dataset", f"got10k={tmp_path / 'got'}", "--split", "test",
                          "--output", str(tmp_path / "out"), "--device", "cpu", "--repeat", "3"]) == 0
    with zipfile.ZipFile(tmp_path / "out" / "got10k" / "GOT10k-test.zip") as z:
        names = set(z.namelist())
        assert {"debug/synthetic-1/synthetic-1_001.txt", "debug/synthetic-1/synthetic-1_003.txt",
                "debug/synthetic-1/synthetic-1_time.txt"} <= names
        first = z.read("debug/synthetic-1/synthetic-1_001.txt").decode().splitlines()[0]
        assert first.count(",") == 3 and first.split(",")[0].endswith(".0000")  # rasterised, 4 decimals
    assert (tmp_path / "out" / "got10k" / "GOT10k-test002.zip").is_file()
    tn = tmp_path / "tn" / "TEST"
    for seq in sorted((data / "synthetic").iterdir()):
        (tn / "anno").mkdir(parents=True, exist_ok=True)
        shutil.copytree(seq / "img", tn / "frames" / seq.name)
        for i, p in enumerate(sorted((tn / "frames" / seq.name).glob("*.jpg"))):
            p.rename(p.with_name(f"{i}.jpg"))
        x, y, w, h = (float(v) for v in (seq / "groundtruth.txt").read_text().splitlines()[0].split(","))
        (tn / "anno" / f"{seq.name}.txt").write_text(f"{x - 1},{y - 1},{w},{h}\n")
    assert run_cli(main, ["--weights", str(weights), "--dataset", f"trackingnet={tmp_path / 'tn'}",
                          "--output", str(tmp_path / "out"), "--device", "cpu"]) == 0
    with zipfile.ZipFile(tmp_path / "out" / "trackingnet" / "TrackingNet-test.zip") as z:
        text = z.read("debug/synthetic-2/synthetic-2.txt").decode().splitlines()
        assert len(text) == 12 and text[0].split(",")[2].endswith(".00")


def test_cli_errors(setup, tmp_path, capsys):
    data, weights = setup
    assert run_cli(main, ["--weights", str(weights), "--dataset", "imagenet=/x", "--output", str(tmp_path)]) == 2
    assert "unknown evaluation dataset" in capsys.readouterr().err
    assert run_cli(main, ["--weights", str(weights), "--dataset", f"lasot={tmp_path / 'none'}",
                          "--output", str(tmp_path)]) == 2
    assert "folder not found" in capsys.readouterr().err


def test_torchrun_shards_sequences(setup, tmp_path):
    import os
    import subprocess
    import sys

    data, weights = setup
    _evaluate(data, weights, tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lorat.evaluate", "--weights", str(weights), "--dataset", f"lasot={data}",
                           "--output", str(tmp_path / "two"), "--device", "cpu"], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "lasot" / "debug_metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "lasot" / "debug_metrics.json").read_text())
    assert two["sequences"] == 3 and two["success_auc"] == pytest.approx(one["success_auc"], abs=1e-4)
