"""Two trainings into one run folder: the second is refused at once, the first goes on untouched.

The fast test starts the second training from inside a step of the first (the same process: the
lock is on an open file, so a second lock in one process is refused like one in another); the slow
ones start real processes, one of them a two-process torchrun job whose rank 0 finds the folder
held (the other rank must not wait for it forever).
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import filelock
import pytest

import lorat.training.step as training_step
from lorat.errors import LoratError, run_cli
from lorat.train import main
from lorat.training.run_folder import hold_run_folder

from .conftest import ROOT

DEBUG = str(ROOT / "configs" / "debug.yaml")


def _recipe(synthetic: Path, run: Path, *extra: str) -> list[str]:
    return [DEBUG, "--data", f"lasot={synthetic}", "--val-data", f"lasot={synthetic}",
            "--set", "train.samples_per_epoch=4", "--set", "train.batch_size=2", "--set", "train.epochs=2",
            "--set", "train.val_samples=2", "--set", "train.checkpoint_every=1",
            "--set", "model.template_size=[56,56]", "--set", "model.search_size=[112,112]",
            "--log-every", "1", "--output", str(run), *extra]


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def test_a_second_training_into_a_busy_folder_is_refused(synthetic, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = _recipe(synthetic, run)
    second: dict[str, object] = {}
    loss, steps = training_step.lorat_loss, []

    def start_another_during_step_2(*args, **kwargs):
        if training_step.torch.is_grad_enabled():
            steps.append(1)
            if len(steps) == 2:
                capsys.readouterr()
                started = time.perf_counter()
                second["new"] = run_cli(main, argv)  # the same command
                second["resume"] = run_cli(main, ["--resume", str(run)])
                second["seconds"] = time.perf_counter() - started
                second["err"] = capsys.readouterr().err
        return loss(*args, **kwargs)

    monkeypatch.setattr(training_step, "lorat_loss", start_another_during_step_2)
    assert run_cli(main, argv) == 0
    assert second["new"] == 2 and second["resume"] == 2
    errors = _errors(str(second["err"]))
    assert len(errors) == 2, second["err"]
    for line in errors:
        assert f"{run} is in use by another training" in line and f"pid {os.getpid()}" in line, line
        assert socket.gethostname() in line
    assert float(second["seconds"]) < 30  # refused before reading the data or building a model
    # the first run is whole: one header, each step and epoch once, one TensorBoard file
    with open(run / "metrics.csv", newline="") as f:
        assert [row[0] for row in csv.reader(f)] == ["step", "1", "2", "3", "4"]
    assert [line.split(",")[0] for line in (run / "val.csv").read_text().splitlines()] == ["epoch", "1", "2"]
    assert len(list((run / "tensorboard").glob("events.*"))) == 1
    assert not (run / ".lock.owner").exists()  # the folder is free again
    assert run_cli(main, ["--resume", str(run)]) == 0


def test_a_held_folder_is_refused_before_anything_is_written(synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    with hold_run_folder(run):
        assert run_cli(main, _recipe(synthetic, run)) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and "\n" not in line and str(run) in line and f"pid {os.getpid()}" in line
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    assert run_cli(main, ["--resume", str(tmp_path / "nothing-here")]) == 2  # no folder made for a typo
    assert not (tmp_path / "nothing-here").exists()


def test_the_typed_entry_holds_the_folder_too(tmp_path):
    """``run_training(TrainingRun, env)`` without the command line holds the folder as well."""
    from lorat.config import load_config
    from lorat.runtime import Distributed
    from lorat.training.trainer import TrainingRun, run_training

    spec = TrainingRun(load_config(DEBUG), (("lasot", str(tmp_path / "no-data"), None),), tmp_path / "run")
    spec.out.mkdir()
    with filelock.FileLock(spec.out / ".lock", timeout=0), Distributed("cpu") as env:  # another holder
        with pytest.raises(LoratError, match="is in use by another training"):
            run_training(spec, env)
    with Distributed("cpu") as env, pytest.raises(LoratError, match="folder not found"):  # free: on to the data
        run_training(spec, env)
    assert not (spec.out / ".lock.owner").exists()


def _long_run(synthetic: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "lorat.train", *_recipe(synthetic, run), "--set", "train.samples_per_epoch=4000",
            "--set", "train.val_samples=0", "--device", "cpu"]


@pytest.mark.slow
def test_two_processes_into_one_folder(synthetic, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(_long_run(synthetic, run), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "metrics.csv").is_file()
                                              and len((run / "metrics.csv").read_text().splitlines()) > 2):
            time.sleep(0.2)
        second = subprocess.run(_long_run(synthetic, run), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        errors = _errors(second.stderr)
        assert len(errors) == 1 and str(run) in errors[0] and f"pid {first.pid} on {socket.gethostname()}" in errors[0]
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows.count(rows[0]) == 1 and len(list((run / "tensorboard").glob("events.*"))) == 1


@pytest.mark.slow
def test_torchrun_into_a_held_folder_stops_every_rank(synthetic, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lorat.train", *_recipe(synthetic, run), "--device", "cpu"]
    with hold_run_folder(run):
        job = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert job.returncode != 0
    assert "is in use by another training" in job.stderr and "could not lock it" in job.stderr, job.stderr[-3000:]
    assert not (run / "metrics.csv").exists()
