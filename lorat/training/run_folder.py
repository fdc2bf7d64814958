"""A training run's folder: its logs, arguments, resumable state and checkpoints.

A :class:`TrainingRun` is what a run needs (config, data, weight files, resumable state);
:func:`write_run_files` puts its ``config.yaml`` and ``args.json`` in the folder, and ``--resume``
reads them back (:func:`read_args`, :func:`read_state`). The folder holds ``config.yaml``,
``args.json`` (data paths), ``metrics.csv`` / ``val.csv`` (logs), ``state.pt`` (weights, AdamW,
GradScaler, step, RNG) and ``checkpoint/epoch_NNN/`` (the official trainable-only
``model.safetensors`` for LoRA runs, and our ``lorat.safetensors``). Every write is
atomic (:func:`lorat.files.write_atomic`), so a kill at any point leaves a usable folder.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from lorat.checkpoint.keys import peft_to_official_keys
from lorat.checkpoint.loader import save_model
from lorat.config import Config, TrainConfig, config_to_dict
from lorat.errors import LoratError
from lorat.files import write_atomic
from lorat.model.vit import LoRAT

__all__ = ["TrainingRun", "write_run_files", "trim_log", "logged_epochs", "read_args", "read_state",
           "check_resume_config", "save_state", "restore_state", "checkpoint_due", "checkpoint_complete",
           "save_checkpoint"]


# a dataset as :func:`lorat.data.loading.parse_data` gives it: (name, path, split or None)
DataSource = tuple[str, str, str | None]


@dataclass(frozen=True)
class TrainingRun:
    """What one training run needs (``python -m lorat.train`` builds it from its options and gives
    it to :func:`lorat.training.trainer.run_training`).

    Attributes:
        config: the run's config, ``--set`` overrides applied.
        data: the training datasets, ``(name, path, split or None)``.
        out: the run folder (``config.yaml``, ``args.json``, logs, checkpoints, ``state.pt``).
        val_data: the validation datasets; empty: GOT-10k's val split when GOT-10k is trained on, else none.
        backbone_weights: the DINOv2 (or MobileNetV2) file the backbone starts from; None: random.
        init_weights: a single-file model the whole network starts from (fine-tuning); None: none.
        log_every: steps between ``metrics.csv`` rows.
        stop_after: stop, resumably, once this many steps are done in total; None: train to the end.
        state: the resumable state read from ``out/state.pt`` (:func:`read_state`) that the run
            continues from; None: a fresh start.
    """

    config: Config
    data: tuple[DataSource, ...]
    out: Path
    val_data: tuple[DataSource, ...] = ()
    backbone_weights: str | None = None
    init_weights: str | None = None
    log_every: int = 10
    stop_after: int | None = None
    state: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def full_state(self) -> bool:
        """Whether ``state.pt`` holds every weight: it does unless the frozen ones can be rebuilt
        from the backbone file alone."""
        return self.backbone_weights is None or bool(self.init_weights)


def trim_log(path: Path, last: int) -> None:
    """Keep the header and the complete rows of a CSV log whose first column (step or epoch) is <= ``last``.

    A kill leaves rows logged after the last saved state (a resumed run logs them again) and
    possibly one row cut short; both go. Rewritten atomically, and only when something goes.
    """
    if not path.is_file():
        return
    lines = path.read_bytes().decode(errors="replace").splitlines(keepends=True)

    def keep(index: int, line: str) -> bool:
        if not line.endswith("\n"):
            return False
        if index == 0:
            return True
        first = line.split(",", 1)[0]
        return first.isdigit() and int(first) <= last

    kept = [line for i, line in enumerate(lines) if keep(i, line)]
    if not kept:
        path.unlink()
    elif kept != lines:
        write_atomic(path, lambda tmp: tmp.write_bytes("".join(kept).encode()))


def logged_epochs(path: Path) -> set[int]:
    """Epochs with a row in ``val.csv``."""
    if not path.is_file():
        return set()
    with open(path, newline="") as f:
        return {int(row[0]) for row in list(csv.reader(f))[1:] if row and row[0].isdigit()}


def _data_argument(name: str, path: str, split: str | None) -> str:
    """The ``NAME[:SPLIT]=PATH`` that :func:`lorat.data.loading.parse_data` read as ``(name, path, split)``."""
    return f"{name}:{split}={path}" if split else f"{name}={path}"


def write_run_files(run: TrainingRun) -> None:
    """Create the run folder and write its ``config.yaml`` and ``args.json`` (data, validation data,
    weight files, log interval: what ``--resume`` reads back with :func:`read_args`).

    Each file is rewritten, atomically, only when its text changes: a resume with ``--set`` keeps
    the new schedule, a resume on another machine the data's new paths.
    """
    run.out.mkdir(parents=True, exist_ok=True)
    arguments = {"data": [_data_argument(*item) for item in run.data],
                 "val_data": [_data_argument(*item) for item in run.val_data],
                 "backbone_weights": run.backbone_weights, "log_every": run.log_every,
                 "init_weights": run.init_weights}
    _write_if_changed(run.out / "config.yaml", yaml.safe_dump(config_to_dict(run.config), sort_keys=False))
    _write_if_changed(run.out / "args.json", json.dumps(arguments, indent=2))


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        write_atomic(path, lambda tmp: tmp.write_text(text))


def read_args(path: Path) -> dict[str, Any]:
    """The data arguments a run was started with (``args.json``), checked."""
    if not path.is_file():
        raise LoratError(f"{path} not found: --resume needs the data arguments that the run wrote there "
                         f"when it started")
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoratError(f"{path} is not readable JSON ({err})") from None

    def strings(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    valid = (isinstance(saved, dict) and strings(saved.get("data")) and strings(saved.get("val_data", []))
             and isinstance(saved.get("backbone_weights"), str | None)
             and isinstance(saved.get("init_weights"), str | None)
             and isinstance(saved.get("log_every", 10), int))
    if not valid:
        raise LoratError(f"{path} does not hold a run's arguments (data and val_data lists, backbone_weights)")
    return saved


_STATE_FIELDS: dict[str, type] = {"step": int, "config": str, "weights": dict, "optimizer": dict, "scaler": dict,
                                  "torch_rng": torch.Tensor}


def read_state(path: Path) -> dict[str, Any]:
    """``state.pt``, loaded on the CPU and checked: a damaged or foreign file is a LoratError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise LoratError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:  # truncated, empty or random bytes: RuntimeError, EOFError, UnpicklingError, ...
        raise LoratError(f"{path} is damaged (truncated, empty or not written by lorat.train: "
                         f"{type(err).__name__}); the run cannot continue from it") from None
    bad = [key for key, kind in _STATE_FIELDS.items() if not isinstance(state, dict)
           or not isinstance(state.get(key), kind)]
    if not bad:
        try:
            if not isinstance(json.loads(state["config"]), dict):
                bad = ["config"]
        except json.JSONDecodeError:
            bad = ["config"]
    if bad:
        raise LoratError(f"{path} is not a lorat.train state (no valid {bad[0]!r}); the run cannot continue from it")
    return state


# the keys of ``train`` that --resume may not change (besides every ``model`` key), and why
_FIXED_TRAIN_KEYS = {
    "train.finetune": "it decides which weights train",
    "train.freeze_stem": "it decides which weights train",
    "train.batch_size": "the saved step counts batches of the run's size",
    "train.samples_per_epoch": "the saved step counts batches of the run's epochs",
}


def _changes(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for each value that differs between two config dicts (keys in both)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for k in sorted(old.keys() & new.keys())
                for change in _changes(old[k], new[k], f"{key}.{k}" if key else k)]
    return [] if old == new else [(key, old, new)]


def check_resume_config(config: Config, state: dict[str, Any], path: Path) -> None:
    """Refuse a resumed config that the saved state cannot follow (the schedule may change)."""
    for key, old, new in _changes(json.loads(state["config"]), config_to_dict(config)):
        why = "the saved weights are of the run's model" if key.startswith("model.") else _FIXED_TRAIN_KEYS.get(key)
        if why:
            raise LoratError(f"--resume cannot change {key}: the run in {path.parent} has {old!r}, config.yaml and "
                             f"--set now give {new!r} ({why}); start a new run with --output for that")


def save_state(path: Path, model: LoRAT, optimizer, scaler, step: int, config: Config, full: bool,
                skipped: int) -> None:
    """Write the resumable state atomically (a kill mid-write leaves the previous one)."""
    weights = model.state_dict() if full else {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = {
        "step": step,
        "config": json.dumps(config_to_dict(config)),
        "weights": {k: v.detach().cpu() for k, v in weights.items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "skipped_images": skipped,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def restore_state(state: dict[str, Any], model: LoRAT, optimizer, scaler, full: bool, path: Path) -> None:
    """Put the saved weights, AdamW and GradScaler states and RNG states in place."""
    expected = set(model.state_dict()) if full else {n for n, p in model.named_parameters() if p.requires_grad}
    unknown, missing = set(state["weights"]) - set(model.state_dict()), expected - set(state["weights"])
    if unknown or missing:
        names = sorted(unknown or missing)[:3]
        raise LoratError(f"{path} does not fit the run's model: {'unknown' if unknown else 'missing'} tensors "
                         f"{', '.join(names)}")
    try:
        model.load_state_dict(state["weights"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        reason = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
        raise LoratError(f"{path} does not fit the run's model: {reason}") from None
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


_KEEP_CHECKPOINTS = 5


def checkpoint_due(cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with a checkpoint: every ``checkpoint_every``, and the last."""
    return (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 >= cfg.epochs


def checkpoint_complete(out: Path, epoch: int, config: Config) -> bool:
    """Whether checkpoint ``epoch`` (1-based) has all its files: the official trainable-only one
    (LoRA runs) and ours."""
    folder = out / "checkpoint" / f"epoch_{epoch:03d}"
    names = (["model.safetensors"] if config.train.finetune == "lora" else []) + ["lorat.safetensors"]
    return all((folder / name).is_file() for name in names)


def save_checkpoint(out: Path, epoch: int, model: LoRAT, config: Config) -> Path:
    """Write checkpoint ``epoch`` (1-based), each file atomically; keep the last few."""
    folder = out / "checkpoint" / f"epoch_{epoch:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    if config.train.finetune == "lora":
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        official = peft_to_official_keys(trainable, config.model.backbone.ffn == "swiglu")
        write_atomic(folder / "model.safetensors", lambda tmp: save_file(official, str(tmp)))
    save_model(model, config, folder / "lorat.safetensors")  # atomic and byte-stable itself
    old = sorted((out / "checkpoint").glob("epoch_*"))[:-_KEEP_CHECKPOINTS]
    for stale in old:
        shutil.rmtree(stale, ignore_errors=True)
    return folder
