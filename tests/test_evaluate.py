"""End-to-end evaluation: synthetic LaSOT -> tracked results -> score, resume, repeats, submissions."""

import json
import re
import shutil
import warnings
import zipfile

import numpy as np
import pytest
import torch

from lorat.checkpoint.build import build_lorat
from lorat.checkpoint.loader import save_model
from lorat.config import load_config
from lorat.data.sequences import DatasetError
from lorat.data.synthetic import write_dataset
from lorat.errors import run_cli
from lorat.evaluate import main
from lorat.runtime import DEFAULT_WEIGHTS
from lorat.tracking.tracker import Tracker

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


def test_several_trackers_in_one_output_are_compared(setup, tmp_path, capsys):
    data, weights = setup
    assert _evaluate(data, weights, tmp_path, "--name", "first") == 0
    assert _evaluate(data, weights, tmp_path, "--name", "second", "--batch", "1") == 0
    out = capsys.readouterr().out
    table = out[out.rindex("first") - 200:]
    assert "first" in table and "second" in table and "2 trackers compared" in out
    entries = json.loads((tmp_path / "lasot" / "metrics.json").read_text())
    assert set(entries) == {"first", "second"}
    assert entries["first"]["success_auc"] == pytest.approx(entries["second"]["success_auc"], abs=1e-9)
    assert len(entries["first"]["curves"]["success"]) == 21
    # per sequence, the time of the steps that advanced it: at batch 1 alone, at batch 2 shared with another
    one = np.loadtxt(tmp_path / "lasot" / "second" / "synthetic-1_time.txt")
    assert np.isfinite(one).all() and (one > 0).all()


def test_resume_and_repeats(setup, tmp_path, capsys):
    data, weights = setup
    assert _evaluate(data, weights, tmp_path, "--repeat", "2", "--name", "mine") == 0
    for run in ("mine_001", "mine_002"):
        assert (tmp_path / "lasot" / run / "synthetic-3.txt").is_file()
    summary = json.loads((tmp_path / "lasot" / "metrics.json").read_text())["mine"]
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


@pytest.mark.slow
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
    one = json.loads((tmp_path / "one" / "lasot" / "metrics.json").read_text())["debug"]
    two = json.loads((tmp_path / "two" / "lasot" / "metrics.json").read_text())["debug"]
    assert two["sequences"] == 3 and two["success_auc"] == pytest.approx(one["success_auc"], abs=1e-4)


def _error(err):
    """The ``error:`` line of a failed CLI run's stderr (checked to be the last line, no traceback)."""
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    return line


def _copy_data(data, dst):
    shutil.copytree(data, dst)
    return dst


def _flags(path, flags):
    path.write_text(",".join(str(f) for f in flags) + "\n")


def test_targets_absent_at_first_or_always(setup, tmp_path, capsys):
    data, weights = setup
    data = _copy_data(data, tmp_path / "data")
    seqs = data / "synthetic"
    _flags(seqs / "synthetic-2" / "full_occlusion.txt", [1, 1, 1] + [0] * 9)  # visible from frame 4 on
    _flags(seqs / "synthetic-3" / "out_of_view.txt", [1] * 12)  # never visible
    out = tmp_path / "out"
    capsys.readouterr()
    assert _evaluate(data, weights, out) == 0
    err = capsys.readouterr().err
    assert "synthetic-3" in err and "never visible" in err  # excluded from running and scoring, with a note
    folder = out / "lasot" / "debug"
    assert not (folder / "synthetic-3.txt").exists()
    lines = (folder / "synthetic-2.txt").read_text().splitlines()
    assert len(lines) == 12 and lines[:3] == ["nan\tnan\tnan\tnan"] * 3  # placeholders before the init frame
    gt = (seqs / "synthetic-2" / "groundtruth.txt").read_text().splitlines()
    assert [float(v) for v in lines[3].split("\t")] == [float(v) for v in gt[3].split(",")]  # init on frame 4
    times = (folder / "synthetic-2_time.txt").read_text().splitlines()
    assert len(times) == 12 and times[:3] == ["nan"] * 3
    run = json.loads((folder / "metrics.json").read_text())
    assert run["sequences"] == 2
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # placeholders are on frames without a visible target: no NaN warning
        assert run_cli(main, ["score", "--dataset", f"lasot={data}", "--results", str(folder), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["success_auc"] == pytest.approx(run["success_auc"], abs=1e-9) and scored["sequences"] == 2
    assert np.isfinite(scored["fps"])
    assert _evaluate(data, weights, out) == 0  # resume: nothing left to do
    assert "2 finished sequences skipped" in capsys.readouterr().out


def test_unreadable_init_frame_is_an_error(setup, tmp_path, capsys):
    data, weights = setup
    data = _copy_data(data, tmp_path / "data")
    (data / "synthetic" / "synthetic-2" / "img" / "00000001.jpg").write_bytes(b"not a jpeg")
    capsys.readouterr()
    assert _evaluate(data, weights, tmp_path / "out") == 2
    err = _error(capsys.readouterr().err)
    assert "synthetic-2" in err and "00000001.jpg" in err
    (data / "synthetic" / "synthetic-3" / "img" / "00000001.jpg").unlink()  # missing: found before tracking
    assert _evaluate(data, weights, tmp_path / "out") == 2
    err = _error(capsys.readouterr().err)
    assert "init frame missing" in err and "synthetic-3" in err
    assert not list((tmp_path / "out" / "lasot" / "debug").glob("synthetic-*.txt"))


def test_resume_checks_it_is_the_same_tracker(setup, tmp_path, capsys):
    import hashlib

    data, weights = setup
    out = tmp_path / "out"
    assert _evaluate(data, weights, out) == 0
    folder = out / "lasot" / "debug"
    manifest = json.loads((folder / "tracker.json").read_text())
    assert manifest["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["dtype"] == "float32" and "window_penalty" in manifest["tracking"]
    before = (folder / "synthetic-1.txt").read_text()
    (folder / "synthetic-1.txt").unlink()  # an interrupted run: one sequence left to do
    cfg = load_config(ROOT / "configs" / "debug.yaml")
    torch.manual_seed(1)
    other = save_model(build_lorat(cfg.model, lora=False).eval(), cfg, tmp_path / "other.safetensors")
    capsys.readouterr()
    assert _evaluate(data, other, out) == 2
    err = _error(capsys.readouterr().err)
    assert "weights" in err and "--output or --name" in err
    assert not (folder / "synthetic-1.txt").exists()  # nothing mixed in
    assert _evaluate(data, weights, out, "--dtype", "bfloat16") == 2
    assert "dtype" in capsys.readouterr().err
    assert _evaluate(data, weights, out) == 0  # the same tracker resumes
    assert (folder / "synthetic-1.txt").read_text() == before
    assert _evaluate(data, other, out, "--name", "other") == 0
    (folder / "tracker.json").unlink()  # results of unknown origin are not reused either
    capsys.readouterr()
    assert _evaluate(data, weights, out) == 2
    assert "tracker.json" in capsys.readouterr().err


def _result_lines(folder, name):
    return (folder / f"{name}.txt").read_text().splitlines()


def test_malformed_result_and_time_files(setup, tmp_path, capsys):
    data, weights = setup
    _evaluate(data, weights, tmp_path / "run")
    folder = tmp_path / "run" / "lasot" / "debug"
    broken = tmp_path / "broken"

    def score(*extra):
        capsys.readouterr()
        code = run_cli(main, ["score", "--dataset", f"lasot={data}", "--results", str(broken), *extra])
        return code, capsys.readouterr().err

    for bad, expected in (("10\t10\t-5\t20", r"synthetic-3.txt:5: .*negative"),
                          ("10\t10\tinf\t20", r"synthetic-3.txt:5: .*inf"),
                          ("-inf\t10\t5\t20", r"synthetic-3.txt:5: .*inf")):
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(folder, broken)
        lines = _result_lines(folder, "synthetic-3")
        lines[4] = bad
        (broken / "synthetic-3.txt").write_text("\n".join(lines) + "\n")
        code, err = score()
        assert code == 2 and re.search(expected, err), err
    shutil.rmtree(broken)
    shutil.copytree(folder, broken)
    (broken / "synthetic-1_time.txt").write_text("0.1\nslow\n")
    code, err = score()
    assert code == 2 and "synthetic-1_time.txt:2" in err, err
    (broken / "synthetic-1_time.txt").write_text("0.1\n-0.5\n")
    code, err = score()
    assert code == 2 and "synthetic-1_time.txt:2" in err, err
    code, err = run_cli(main, ["score", "--dataset", f"lasot={data}", "--results", str(tmp_path / "nope")]), \
        capsys.readouterr().err
    assert code == 2 and "results folder not found" in err


def test_score_labels_are_unique(setup, tmp_path, capsys):
    data, weights = setup
    _evaluate(data, weights, tmp_path / "a")
    folder = tmp_path / "a" / "lasot" / "debug"
    other = tmp_path / "b" / "debug"
    shutil.copytree(folder, other)
    for path in other.glob("synthetic-?.txt"):
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines[:1] + ["0\t0\t5\t5"] * (len(lines) - 1)) + "\n")  # a bad tracker
    capsys.readouterr()
    assert run_cli(main, ["score", "--dataset", f"lasot={data}", "--results", str(folder), str(other),
                          "--json", "--output", str(tmp_path / "cmp")]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2  # two folders called "debug" are two trackers, not one
    assert len({r["success_auc"] for r in results.values()}) == 2
    assert len(list((tmp_path / "cmp").rglob("sequences.csv"))) == 2


def test_run_and_score_input_errors(setup, tmp_path, capsys):
    data, weights = setup
    (tmp_path / "file").write_text("")
    for extra, expected in ((["--output", str(tmp_path / "file")], "cannot write"),
                            (["--output", str(tmp_path), "--batch", "0"], "--batch"),
                            (["--output", str(tmp_path), "--name", ".."], "--name")):
        capsys.readouterr()
        assert run_cli(main, ["--weights", str(weights), "--dataset", f"lasot={data}", "--device", "cpu",
                              *extra]) == 2
        assert expected in _error(capsys.readouterr().err)
    for dataset, expected in ((["--dataset", "lasot="], "needs a path"),
                              (["--dataset", f"lasot={data}", "--split", "val"], "no split 'val'")):
        assert run_cli(main, ["--weights", str(weights), "--device", "cpu", "--output", str(tmp_path), *dataset]) == 2
        assert expected in _error(capsys.readouterr().err)
    got = tmp_path / "got"
    _got10k_layout(data, got)
    assert run_cli(main, ["score", "--dataset", f"got10k={got}", "--split", "test", "--results", str(tmp_path)]) == 2
    assert "no public ground truth" in _error(capsys.readouterr().err)
    assert run_cli(main, ["score", "--dataset", f"lasot={data}", "--results", str(tmp_path / "file")]) == 2
    assert "must name a folder" in _error(capsys.readouterr().err)


def test_read_sequence_and_times(tmp_path):
    from lorat.evaluation.results import read_sequence, read_times

    path = tmp_path / "a.txt"
    path.write_text("1\t2\t3\t4\n\nnan\tnan\tnan\tnan\n5,6,0,0\n")
    boxes = read_sequence(path, 3, offset=1.0)
    assert boxes[0].tolist() == [0, 1, 3, 4] and np.isnan(boxes[1]).all() and boxes[2].tolist() == [4, 5, 0, 0]
    path.write_text("1\t2\t3\t4\n\n1\t2\t3\t-4\n")
    with pytest.raises(DatasetError, match=r"a.txt:3: .*negative"):
        read_sequence(path, 2)
    times = tmp_path / "a_time.txt"
    times.write_text("0.5\nnan\n0.25\n")
    assert read_times(times, 3)[[0, 2]].tolist() == [0.5, 0.25]
    with pytest.raises(DatasetError, match=r"a_time.txt: 3 times for 2 frames"):
        read_times(times, 2)
    times.write_text("0.5\ninf\n")
    with pytest.raises(DatasetError, match=r"a_time.txt:2: "):
        read_times(times)


def test_non_finite_model_outputs_stop_the_run(setup, tmp_path):
    """A model whose outputs are NaN (weights damaged in memory) stops with an error, never writes nan boxes."""
    from lorat.checkpoint.loader import load_model
    from lorat.data.sequences import read_dataset
    from lorat.errors import LoratError
    from lorat.evaluation.runner import track_sequences

    data, weights = setup
    model, config = load_model(weights)
    with torch.no_grad():
        model.head.reg_mlp.layers[0].weight.fill_(float("nan"))
    sequences = read_dataset("lasot", str(data), "test", for_training=False)
    with pytest.raises(LoratError, match="non-finite boxes or scores"):
        track_sequences(model, config, sequences, tmp_path / "run", 0.0, 2, None, progress=False)
    assert not list((tmp_path / "run").glob("*.txt"))


def test_border_boxes_give_the_same_boxes_as_the_track_cli(setup, tmp_path):
    """First boxes partly outside the frame are clipped the same way by every door: the evaluator at
    batch 1 and 2 and ``python -m lorat.track`` on the image folder agree within 0.01 px (and on a
    sequence that starts inside the frame, synthetic-3)."""
    from lorat.track import main as track_main

    source, _ = setup
    weights = DEFAULT_WEIGHTS  # a trained model: its boxes move with the target (a random one's fill the frame)
    data = tmp_path / "border"
    shutil.copytree(source, data)
    starts = {"synthetic-1": (-12.0, 5.0), "synthetic-2": (140.0, -9.5)}
    for name, (x, y) in starts.items():  # 0-based corner; LaSOT files are 1-based
        path = data / "synthetic" / name / "groundtruth.txt"
        lines = path.read_text().splitlines()
        w, h = (float(v) for v in lines[0].split(",")[2:])
        lines[0] = f"{x + 1},{y + 1},{max(w, 30)},{max(h, 30)}"
        path.write_text("\n".join(lines) + "\n")
    results = {}
    for batch in ("1", "2"):
        out = tmp_path / f"batch{batch}"
        assert run_cli(main, ["--weights", str(weights), "--dataset", f"lasot={data}", "--output", str(out),
                              "--device", "cpu", "--batch", batch]) == 0
        results[batch] = {n: np.loadtxt(out / "lasot" / "demo" / f"{n}.txt") - [1, 1, 0, 0]
                          for n in ("synthetic-1", "synthetic-2", "synthetic-3")}
    for name in results["1"]:
        gt = (data / "synthetic" / name / "groundtruth.txt").read_text()
        first = [float(v) for v in gt.split("\n")[0].split(",")]
        init = ",".join(str(v) for v in (first[0] - 1, first[1] - 1, first[2], first[3]))
        txt = tmp_path / f"{name}.txt"
        assert run_cli(track_main, [str(data / "synthetic" / name / "img"), "--weights", str(weights), "--device",
                                    "cpu", "--init", init, "--save-txt", str(txt)]) == 0
        cli = np.loadtxt(txt)
        assert cli[0, 0] >= 0 and cli[0, 1] >= 0 and cli[0, 0] + cli[0, 2] <= 160  # clipped to the frame
        np.testing.assert_allclose(results["1"][name], cli, atol=0.01)
        np.testing.assert_allclose(results["2"][name], cli, atol=0.01)
        assert len({tuple(np.round(b)) for b in cli}) > len(cli) // 2  # the boxes really move


def test_an_unreadable_later_frame_follows_the_trackers_one_policy(setup, tmp_path):
    """A damaged image in the middle of a sequence: the evaluator repeats the previous box and keeps
    the state, exactly as ``Tracker.stream`` does for an unreadable frame (and so the CLI and app)."""
    import cv2

    source, _ = setup
    weights = DEFAULT_WEIGHTS  # a trained model: a random one's boxes fill the frame whatever it sees
    data = tmp_path / "holed"
    shutil.copytree(source, data)
    seq = data / "synthetic" / "synthetic-1"
    images = sorted((seq / "img").glob("*.jpg"))
    frames = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in images]
    images[5].write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="frame 6 unreadable"):
        assert _evaluate(data, weights, tmp_path / "out") == 0
    got = np.loadtxt(tmp_path / "out" / "lasot" / "demo" / "synthetic-1.txt") - [1, 1, 0, 0]
    init = np.loadtxt(seq / "groundtruth.txt", delimiter=",")[0] - [1, 1, 0, 0]
    stream = Tracker.from_pretrained(weights, device="cpu").stream(frames[:5] + [None] + frames[6:], init)
    expected = np.array([r.targets[0].box for r in stream])
    np.testing.assert_allclose(got, expected, atol=2e-3)
    np.testing.assert_array_equal(got[5], got[4])
    full = np.array([r.targets[0].box for r in Tracker.from_pretrained(weights, device="cpu").stream(frames, init)])
    assert np.abs(full[5] - full[4]).max() > 0.5  # frame 6 would have moved the box: the hole was felt


@pytest.mark.slow
def test_two_evaluations_into_one_output_race(setup, tmp_path):
    """Two evaluations started together into one --output, three times over: the same tracker twice (both
    finish, the results are whole and those of one run alone) and two trackers (both kept in metrics.json)."""
    import subprocess
    import sys

    data, weights = setup
    alone = tmp_path / "alone"
    assert _evaluate(data, weights, alone) == 0
    expected = {p.name: p.read_text() for p in (alone / "lasot" / "debug").glob("synthetic-*.txt")
                if not p.stem.endswith("_time")}
    command = [sys.executable, "-m", "lorat.evaluate", "--weights", str(weights), "--dataset", f"lasot={data}",
               "--device", "cpu", "--batch", "2", "--threads", "1"]
    for race in range(3):
        out = tmp_path / f"race{race}"
        runs = [subprocess.Popen([*command, "--output", str(out), *extra], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for extra in ([], [], ["--name", "other"])]
        results = [run.communicate(timeout=300) + (run.returncode,) for run in runs]
        assert [code for _, _, code in results] == [0, 0, 0], [err for _, err, _ in results]
        got = {p.name: p.read_text() for p in (out / "lasot" / "debug").glob("synthetic-*.txt")
               if not p.stem.endswith("_time")}
        assert got == expected
        assert set(json.loads((out / "lasot" / "metrics.json").read_text())) == {"debug", "other"}


def test_custom_dataset_frames_in_natural_order(tmp_path):
    """A custom sequence whose images are named frame1 ... frame12 is read 1, 2, ..., 12 (not 1, 10, 11, 12, 2)."""
    from lorat.data.sequences import read_dataset

    seq = tmp_path / "custom" / "unpadded"
    seq.mkdir(parents=True)
    for i in range(1, 13):
        (seq / f"frame{i}.jpg").write_bytes(b"")
    (seq / "groundtruth.txt").write_text("1,1,5,5\n" * 12)
    [sequence] = read_dataset("custom", tmp_path / "custom", for_training=False)
    assert [p.name for p in sequence.frames] == [f"frame{i}.jpg" for i in range(1, 13)]
