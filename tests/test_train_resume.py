"""Resume after a stop or a kill at any point is bit-exact; bad resumes fail with one error line.

Every run here is the same tiny recipe (2 epochs of 2 steps, drop-path on, validation and a
checkpoint every epoch, a metrics row every step). A kill -9 is simulated in-process by raising
:class:`_Killed` at a chosen point: like a real kill it skips every save that would have come
next, and leaves on disk exactly what had been written (flushed) until then.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lorat.training.step as training_step
import lorat.training.trainer as trainer
from lorat.config import TrainConfig, load_config
from lorat.data.pairs import PairDataset, Source, UnusableDataError
from lorat.data.sequences import read_dataset
from lorat.errors import ConfigError, run_cli
from lorat.train import main

from .conftest import ROOT

DEBUG = str(ROOT / "configs" / "debug.yaml")


class _Killed(BaseException):
    """A simulated kill -9: not an Exception, so nothing in the trainer handles it."""


def _recipe(synthetic: Path, *extra: str) -> list[str]:
    return [DEBUG, "--data", f"lasot={synthetic}", "--val-data", f"lasot={synthetic}",
            "--set", "train.samples_per_epoch=4", "--set", "train.batch_size=2", "--set", "train.epochs=2",
            "--set", "train.val_samples=2", "--set", "train.checkpoint_every=1",
            "--set", "model.backbone.drop_path=0.1",  # as in l224.yaml: draws from the global torch RNG
            "--set", "model.template_size=[56,56]", "--set", "model.search_size=[112,112]",
            "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def reference(synthetic, tmp_path_factory) -> Path:
    """The uninterrupted run every other run must reproduce exactly."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(main, _recipe(synthetic, "--output", str(run))) == 0
    return run


def _same(a, b, where: str) -> None:
    """Recursive exact equality of (nested) state: tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        equal = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        assert equal, f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _rows(path: Path, drop: str | None = None) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.pop(drop, None)
    return rows


def _checkpoint_tensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def assert_same_run(expected: Path, got: Path) -> None:
    """Weights, AdamW, GradScaler, RNG states, step, logs and checkpoints all equal."""
    a = torch.load(expected / "state.pt", weights_only=True)
    b = torch.load(got / "state.pt", weights_only=True)
    _same(a, b, "state.pt")
    assert _rows(expected / "metrics.csv", "samples_per_s") == _rows(got / "metrics.csv", "samples_per_s")
    assert (expected / "val.csv").read_text() == (got / "val.csv").read_text()
    epochs = sorted(p.name for p in (expected / "checkpoint").iterdir())
    assert sorted(p.name for p in (got / "checkpoint").iterdir()) == epochs
    for epoch in epochs:
        files = sorted(p.name for p in (expected / "checkpoint" / epoch).iterdir())
        assert sorted(p.name for p in (got / "checkpoint" / epoch).iterdir()) == files
        for name in files:
            _same(_checkpoint_tensors(expected / "checkpoint" / epoch / name),
                  _checkpoint_tensors(got / "checkpoint" / epoch / name), f"{epoch}/{name}")


def _train_calls(monkeypatch, action) -> None:
    """Run ``action(n)`` inside the loss of the n-th training step (1-based; validation not counted)."""
    calls = {"n": 0}
    loss = training_step.lorat_loss

    def wrapped(*args, **kwargs):
        if torch.is_grad_enabled():
            calls["n"] += 1
            action(calls["n"])
        return loss(*args, **kwargs)

    monkeypatch.setattr(training_step, "lorat_loss", wrapped)


# ----------------------------------------------------------------------------- stops and kills


@pytest.mark.parametrize("stops", [[1, 3], [2]], ids=["mid-epochs", "epoch-end"])
def test_stop_after_then_resume_is_bit_exact(synthetic, reference, tmp_path, stops):
    run = tmp_path / "run"
    assert run_cli(main, _recipe(synthetic, "--output", str(run), "--stop-after", str(stops[0]))) == 0
    assert run_cli(main, ["--resume", str(run), "--stop-after", str(stops[0])]) == 0  # already there: no step
    assert torch.load(run / "state.pt", weights_only=True)["step"] == stops[0]
    for stop in stops[1:]:
        assert run_cli(main, ["--resume", str(run), "--stop-after", str(stop)]) == 0
    assert run_cli(main, ["--resume", str(run)]) == 0
    assert_same_run(reference, run)


@pytest.mark.parametrize("at", [2, 3], ids=["epoch-end", "mid-epoch"])
def test_sigint_then_resume_is_bit_exact(synthetic, reference, tmp_path, monkeypatch, at):
    """Ctrl-C during step ``at``: that step finishes, the state is saved (validation skipped)."""
    run = tmp_path / "run"

    def ctrl_c(n: int) -> None:
        if n == at:
            signal.raise_signal(signal.SIGINT)

    _train_calls(monkeypatch, ctrl_c)
    assert run_cli(main, _recipe(synthetic, "--output", str(run))) == 130
    assert torch.load(run / "state.pt", weights_only=True)["step"] == at
    monkeypatch.undo()
    assert run_cli(main, ["--resume", str(run)]) == 0
    assert_same_run(reference, run)  # torch_rng included


def test_kill_after_the_final_step_before_its_checkpoint(synthetic, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    save = trainer.save_checkpoint

    def killed_at_the_end(out, epoch, *args, **kwargs):
        if epoch == 2:
            raise _Killed
        return save(out, epoch, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", killed_at_the_end)
    with pytest.raises(_Killed):
        run_cli(main, _recipe(synthetic, "--output", str(run)))
    monkeypatch.undo()
    assert run_cli(main, ["--resume", str(run)]) == 0
    assert (run / "checkpoint" / "epoch_002" / "lorat.safetensors").is_file()
    assert_same_run(reference, run)


def test_kill_mid_epoch_drops_the_rows_logged_after_the_state(synthetic, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def kill(n: int) -> None:
        if n == 4:  # step 3's row is in metrics.csv, the state is at step 2
            raise _Killed

    _train_calls(monkeypatch, kill)
    with pytest.raises(_Killed):
        run_cli(main, _recipe(synthetic, "--output", str(run)))
    monkeypatch.undo()
    assert [r["step"] for r in _rows(run / "metrics.csv")] == ["1", "2", "3"]
    with open(run / "metrics.csv", "a") as f:
        f.write("4,1,1.0e-0")  # a row cut short by the kill
    with open(run / "val.csv", "a") as f:
        f.write("2,1.0,1.0,1.0\n")  # what an older version, validating before saving the state, could leave
    assert run_cli(main, ["--resume", str(run)]) == 0
    assert [r["step"] for r in _rows(run / "metrics.csv")] == ["1", "2", "3", "4"]
    assert_same_run(reference, run)


def test_a_fresh_run_after_a_kill_before_the_first_state_starts_clean(synthetic, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def kill(n: int) -> None:
        if n == 2:
            raise _Killed

    _train_calls(monkeypatch, kill)
    with pytest.raises(_Killed):
        run_cli(main, _recipe(synthetic, "--output", str(run)))
    monkeypatch.undo()
    assert not (run / "state.pt").exists() and len(_rows(run / "metrics.csv")) == 1
    assert run_cli(main, _recipe(synthetic, "--output", str(run))) == 0  # the same command again
    assert_same_run(reference, run)


def test_skipped_image_count_survives_a_resume(synthetic, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(synthetic, root)
    for path in sorted(root.rglob("*.jpg"))[::3]:
        path.write_bytes(b"not a jpeg")
    recipe = [DEBUG, "--data", f"lasot={root}", "--set", "train.val_samples=0",
              "--set", "train.samples_per_epoch=8", "--set", "train.batch_size=2", "--set", "train.epochs=1",
              "--set", "model.template_size=[56,56]", "--set", "model.search_size=[112,112]", "--log-every", "1"]
    assert run_cli(main, [*recipe, "--output", str(tmp_path / "straight")]) == 0
    assert run_cli(main, [*recipe, "--output", str(tmp_path / "split"), "--stop-after", "2"]) == 0
    assert run_cli(main, ["--resume", str(tmp_path / "split")]) == 0
    straight = _rows(tmp_path / "straight" / "metrics.csv", "samples_per_s")
    assert int(straight[-1]["skipped_images"]) > int(straight[1]["skipped_images"]) > 0
    assert _rows(tmp_path / "split" / "metrics.csv", "samples_per_s") == straight


def test_resume_writes_a_missing_final_checkpoint_and_validation(reference, tmp_path, capsys):
    """What a kill between state.pt and the last checkpoint (or a deleted folder) leaves."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoint" / "epoch_002")
    lines = (run / "val.csv").read_text().splitlines(keepends=True)
    (run / "val.csv").write_text("".join(lines[:-1]))
    assert run_cli(main, ["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "epoch_002" in out and "finished at step 4/4" in out
    assert_same_run(reference, run)


def test_resume_override_persists_and_extends_the_run(synthetic, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert run_cli(main, ["--resume", str(run), "--set", "train.epochs=3", "--stop-after", "5"]) == 0
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 5
    # the next resume keeps 3 epochs: config.yaml holds what the run is now
    assert run_cli(main, ["--resume", str(run)]) == 0
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["step"] == 6 and json.loads(state["config"])["train"]["epochs"] == 3
    assert (run / "checkpoint" / "epoch_003" / "lorat.safetensors").is_file()


class _FastClock:
    """The trainer's ``time`` module with a ``monotonic`` clock ten minutes further at every reading:
    ``train.save_state_every_minutes`` (10) has passed at every step."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 600.0
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.mark.parametrize(("at", "saved"), [(2, 1), (4, 3)], ids=["first-epoch", "second-epoch"])
def test_periodic_state_then_kill_then_resume_is_bit_exact(synthetic, reference, tmp_path, monkeypatch, at, saved):
    """state.pt is written within epochs too, every ``train.save_state_every_minutes``: a kill -9 during
    step ``at`` loses only that step, even in the first epoch (before any epoch-end state)."""
    run = tmp_path / "run"

    def kill(n: int) -> None:
        if n == at:
            raise _Killed

    _train_calls(monkeypatch, kill)
    monkeypatch.setattr(trainer, "time", _FastClock())
    with pytest.raises(_Killed):
        run_cli(main, _recipe(synthetic, "--output", str(run)))
    monkeypatch.undo()
    assert torch.load(run / "state.pt", weights_only=True)["step"] == saved
    assert [r["step"] for r in _rows(run / "metrics.csv")] == [str(step) for step in range(1, at)]
    assert not list(run.glob(".state.pt.*.tmp"))
    assert run_cli(main, ["--resume", str(run)]) == 0
    assert_same_run(reference, run)


def test_save_state_every_minutes_zero_saves_at_epoch_ends_only(synthetic, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def kill(n: int) -> None:
        if n == 4:
            raise _Killed

    _train_calls(monkeypatch, kill)
    monkeypatch.setattr(trainer, "time", _FastClock())
    with pytest.raises(_Killed):
        run_cli(main, _recipe(synthetic, "--output", str(run), "--set", "train.save_state_every_minutes=0"))
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 2


def test_save_state_every_minutes_is_checked():
    with pytest.raises(ConfigError, match="save_state_every_minutes"):
        load_config(DEBUG, ["train.save_state_every_minutes=-1"])
    assert load_config(DEBUG).train.save_state_every_minutes == 10  # old configs keep working


def test_resume_after_a_kill_before_the_first_state_says_what_to_run(synthetic, reference, tmp_path, monkeypatch,
                                                                    capsys):
    """Killed between epoch 1's checkpoint and its state.pt (no state saved before): --resume names the
    command that starts the same run again, and that command reproduces it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"

    def killed(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(trainer, "save_state", killed)
    with pytest.raises(_Killed):
        run_cli(main, _recipe(synthetic, "--output", str(run)))
    monkeypatch.undo()
    assert (run / "checkpoint" / "epoch_001" / "lorat.safetensors").is_file() and not (run / "state.pt").exists()
    capsys.readouterr()
    line = _error(capsys, ["--resume", str(run)])
    assert "nothing to resume" in line and "epoch_001" in line and "optimiser state" in line, line
    command = shlex.split(line.split(" with: ", 1)[1])
    assert command[:3] == ["python", "-m", "lorat.train"] and command[-2:] == ["--output", str(run)]
    assert run_cli(main, command[3:]) == 0
    assert_same_run(reference, run)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]  # the killed start's events dropped


def test_stale_temporary_files_go_at_the_next_start(reference, tmp_path):
    """A kill mid-write leaves ``.NAME.PID.tmp``: the next start or resume removes those of processes
    that no longer exist, and only those."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    stale = [run / f".state.pt.{ended.pid}.tmp",
             run / "checkpoint" / "epoch_002" / f".lorat.safetensors.{ended.pid}.tmp"]
    alive = run / f".metrics.csv.{os.getppid()}.tmp"  # another process's, still running
    for path in [*stale, alive]:
        path.write_bytes(b"half a file")
    assert run_cli(main, ["--resume", str(run)]) == 0
    assert [path.exists() for path in stale] == [False, False] and alive.exists()
    assert_same_run(reference, run)


@pytest.mark.parametrize("change", ["fewer", "renamed"])
def test_resume_on_other_data_is_refused_unless_allowed(synthetic, tmp_path, capsys, change):
    """data.json keeps the data's fingerprint: a resume on other data (not the same data moved, see
    the test below) is refused, args.json and state.pt untouched, unless --allow-other-data, which
    says so and records it."""
    run = tmp_path / "run"
    assert run_cli(main, _recipe(synthetic, "--output", str(run), "--stop-after", "3")) == 0
    fingerprint = json.loads((run / "data.json").read_text())
    assert [(d["name"], d["split"], d["sequences"], d["frames"]) for d in fingerprint["train"]] == [
        ("lasot", "train", 4, 120)]
    assert fingerprint["val"][0]["split"] == "val" and fingerprint["changes"] == []
    other = tmp_path / "other"
    shutil.copytree(synthetic, other)
    if change == "fewer":
        shutil.rmtree(other / "synthetic" / "synthetic-4")
    else:
        (other / "synthetic" / "synthetic-4").rename(other / "synthetic" / "synthetic-5")
    before = {name: (run / name).read_bytes() for name in ("args.json", "state.pt", "data.json", "config.yaml")}
    capsys.readouterr()
    line = _error(capsys, ["--resume", str(run), "--data", f"lasot={other}"])
    assert str(run) in line and "--allow-other-data" in line and "lasot:train" in line, line
    assert ("3 sequences" in line and "4 sequences" in line) if change == "fewer" else "other sequences" in line
    if change == "fewer":
        assert "--val-data" in _error(capsys, ["--resume", str(run), "--val-data", f"lasot={other}"])
    assert {name: (run / name).read_bytes() for name in before} == before
    assert run_cli(main, ["--resume", str(run), "--data", f"lasot={other}", "--allow-other-data"]) == 0
    assert "no longer reproducible" in capsys.readouterr().out
    record = json.loads((run / "data.json").read_text())
    assert [c["step"] for c in record["changes"]] == [3] and "lasot:train" in record["changes"][0]["difference"]
    assert record["train"][0]["sequences"] == (3 if change == "fewer" else 4)
    assert json.loads((run / "args.json").read_text())["data"] == [f"lasot={other}"]


# ----------------------------------------------------------------------------- byte-stable outputs


def test_identical_runs_write_identical_bytes(synthetic, tmp_path):
    def run(name: str) -> Path:
        out = tmp_path / name
        args = [DEBUG, "--data", f"lasot={synthetic}", "--set", "train.finetune=lora",
                "--set", "train.samples_per_epoch=2", "--set", "train.batch_size=2", "--set", "train.epochs=1",
                "--set", "train.val_samples=0", "--set", "model.template_size=[56,56]",
                "--set", "model.search_size=[112,112]", "--output", str(out)]
        assert run_cli(main, args) == 0
        return out

    a, b = run("a"), run("b")
    assert (a / "state.pt").read_bytes() == (b / "state.pt").read_bytes()
    for name in ("model.safetensors", "lorat.safetensors"):
        path = Path("checkpoint") / "epoch_001" / name
        assert (a / path).read_bytes() == (b / path).read_bytes(), path


# ----------------------------------------------------------------------------- clear errors


def _error(capsys, argv: list[str]) -> str:
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err  # the progress bar may come first, on its own line
    assert err.endswith("\n") and err.count("error: ") == 1 and "Traceback" not in err, err
    line = err.splitlines()[-1]
    assert line.startswith("error: "), err
    return line


@pytest.mark.parametrize("content", [None, b"", b"\x8a\x17 random bytes \x00\xff" * 40], ids=["truncated", "empty",
                                                                                              "random"])
def test_resume_with_a_damaged_state_is_an_error(reference, tmp_path, capsys, content):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    data = (run / "state.pt").read_bytes()
    (run / "state.pt").write_bytes(data[: len(data) // 2] if content is None else content)
    assert "state.pt" in _error(capsys, ["--resume", str(run)])


@pytest.mark.parametrize("content", [None, "{not json", '["a list"]', '{"data": 5}'])
def test_resume_without_a_readable_args_json_is_an_error(reference, tmp_path, capsys, content):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    if content is None:
        (run / "args.json").unlink()
    else:
        (run / "args.json").write_text(content)
    assert "args.json" in _error(capsys, ["--resume", str(run)])


def test_resume_refuses_overrides_that_change_the_model(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = (run / "state.pt").read_bytes()
    for key, value in [("model.backbone.embed_dim", "32"), ("train.finetune", "lora"),
                       ("train.batch_size", "4")]:
        assert f"{key}" in _error(capsys, ["--resume", str(run), "--set", f"{key}={value}"])
    assert (run / "state.pt").read_bytes() == before
    assert "embed_dim: 64" in (run / "config.yaml").read_text()


def test_all_unreadable_images_stop_with_a_clear_error(synthetic, tmp_path, capsys):
    root = tmp_path / "broken"
    shutil.copytree(synthetic, root)
    for path in root.rglob("*.jpg"):
        path.write_bytes(b"not a jpeg")
    for workers in ("0", "2"):
        err = _error(capsys, [DEBUG, "--data", f"lasot={root}", "--set", "train.val_samples=0",
                              "--set", "train.samples_per_epoch=4", "--set", "train.batch_size=2",
                              "--set", f"train.num_workers={workers}", "--output", str(tmp_path / f"r{workers}")])
        assert "unreadable" in err and ".jpg" in err and "Traceback" not in err
        assert not (tmp_path / f"r{workers}" / "state.pt").exists()


@pytest.mark.parametrize("device", ["banana", "mps", "cuda:99" if torch.cuda.is_available() else "cuda"])
def test_bad_device_is_an_error(synthetic, tmp_path, capsys, device):
    err = _error(capsys, _recipe(synthetic, "--output", str(tmp_path / "run"), "--device", device))
    assert device in err


def test_pairs_that_cannot_be_made_raise_a_one_line_dataset_error(synthetic):
    cfg = load_config(ROOT / "configs" / "debug.yaml")
    impossible = TrainConfig(min_object_size=1000)  # no jittered crop keeps the target that large
    ds = PairDataset([Source("lasot", read_dataset("lasot", synthetic), 1.0)], cfg.model, cfg.tracking, impossible, 2,
                     seed=0)
    ds.set_epoch(0)
    with pytest.raises(UnusableDataError, match="could not make training pair 1 in 1000 attempts from lasot"):
        ds[1]
    # as a DataLoader worker hands it to the main process: only the original message is kept
    relayed = UnusableDataError("Caught UnusableDataError in DataLoader worker process 0.\nOriginal Traceback (most "
                                "recent call last):\n  File ...\nlorat.data.pairs.UnusableDataError: the message\n")
    assert str(relayed) == "the message"


def test_run_files_keep_the_args_json_that_resume_reads(tmp_path):
    """args.json holds the options as given (the keys and order of every earlier version), read back
    unchanged by --resume; config.yaml is the run's config."""
    from lorat.training.run_folder import read_args, write_run_files
    from lorat.training.trainer import TrainingRun

    config = load_config(DEBUG)
    run = TrainingRun(config, (("lasot", "/d/LaSOT", None), ("got10k", "/d/GOT=10k", "val")), tmp_path / "run",
                      val_data=(("got10k", "/d/GOT-10k", "val"),), backbone_weights="b.pth", log_every=3)
    write_run_files(run)
    expected = {"data": ["lasot=/d/LaSOT", "got10k:val=/d/GOT=10k"], "val_data": ["got10k:val=/d/GOT-10k"],
                "backbone_weights": "b.pth", "log_every": 3, "init_weights": None}
    assert (tmp_path / "run" / "args.json").read_text() == json.dumps(expected, indent=2)
    assert read_args(tmp_path / "run" / "args.json") == expected
    assert load_config(tmp_path / "run" / "config.yaml") == config


def test_resume_on_another_machine_with_the_data_elsewhere(synthetic, reference, tmp_path):
    """A run stopped here continues where its data lives at another path (a GPU machine): --data and
    --val-data given again replace the saved paths, args.json keeps the new ones, and the run is
    the same bit for bit."""
    here = tmp_path / "here"
    shutil.copytree(synthetic, here)
    run = tmp_path / "run"
    assert run_cli(main, [*_recipe(here, "--output", str(run), "--stop-after", "3")]) == 0
    there = tmp_path / "there"
    here.rename(there)
    assert run_cli(main, ["--resume", str(run)]) == 2  # the saved paths are gone
    assert run_cli(main, ["--resume", str(run), "--data", f"lasot={there}", "--val-data", f"lasot={there}"]) == 0
    assert json.loads((run / "args.json").read_text())["data"] == [f"lasot={there}"]
    assert_same_run(reference, run)


# ----------------------------------------------------------------------------- what a user sees


def test_summary_resume_line_tensorboard_and_options_kept(synthetic, reference, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert run_cli(main, _recipe(synthetic, "--output", str(run), "--stop-after", "3")) == 0
    out = capsys.readouterr().out
    assert "model      debug:" in out and "M trained" in out and "backbone randomly initialised" in out
    assert "data       lasot: " in out and "sequences" in out and "schedule   2 epochs x 2 steps of 2 pairs" in out
    assert "resuming" not in out
    assert run_cli(main, ["--resume", str(run)]) == 0  # --log-every 1 of the first command is kept
    out = capsys.readouterr().out
    assert "resuming from step 3 of 4 (epoch 2 of 2, 1 of its 2 steps done)" in out and "model      debug:" in out
    assert json.loads((run / "args.json").read_text())["log_every"] == 1
    assert [r["step"] for r in _rows(run / "metrics.csv")] == ["1", "2", "3", "4"]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]  # no step twice after the resume
    assert {"train/lr", "train/cls", "train/reg", "val/loss"} <= set(events.Tags()["scalars"])
    losses = [float(r["loss"]) for r in _rows(run / "metrics.csv")]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, abs=1e-6)
    assert_same_run(reference, run)
