"""A training run's folder: its logs, arguments, resumable state and checkpoints.

A :class:`TrainingRun` is what a run needs (config, data, weight files, resumable state);
:func:`write_run_files` puts its ``config.yaml`` and ``args.json`` in the folder, and ``--resume``
reads them back (:func:`read_args`, :func:`read_state`). The folder holds ``config.yaml``,
``args.json`` (data paths), ``metrics.csv`` / ``val.csv`` (logs), ``state.pt`` (weights, AdamW,
GradScaler, step, RNG) and ``checkpoint/epoch_NNN/`` (the official trainable-only
``model.safetensors`` for LoRA runs, and our ``lorat.safetensors``). Every write is
atomic (:func:`lorat.files.write_atomic`), so a kill at any point leaves a usable folder; the
temporary files a kill leaves go at the next start (:func:`remove_stale_temp_files`).

One training at a time: :func:`hold_run_folder` locks ``.lock`` for the whole run (the lock goes
with the process, even after a kill -9) and writes who holds it in ``.lock.owner``. ``data.json``
holds the fingerprint of the data the run trains on (:func:`data_fingerprint`: names, splits,
sequence and frame counts, a hash of the sequences' names and lengths, not the pixels or the
paths), which a resume compares with the data given then (:func:`data_difference`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock
import torch
import yaml
from safetensors.torch import save_file

from lorat.checkpoint.keys import peft_to_official_keys
from lorat.checkpoint.loader import save_model
from lorat.config import Config, TrainConfig, config_to_dict
from lorat.errors import LoratError
from lorat.files import write_atomic
from lorat.model.vit import LoRAT

if TYPE_CHECKING:
    from lorat.data.pairs import Source

__all__ = ["TrainingRun", "write_run_files", "trim_log", "logged_epochs", "read_args", "read_state",
           "check_resume_config", "save_state", "restore_state", "checkpoint_due", "checkpoint_complete",
           "save_checkpoint", "hold_run_folder", "try_hold_run_folder", "remove_stale_temp_files",
           "data_fingerprint", "data_difference", "read_data_fingerprint", "write_data_fingerprint",
           "restart_command"]


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
        phase1_weights: LoRATv2 phase 2: the phase-1 model (our single file, or an official phase-1
            checkpoint with the backbone file) whose streams phase 2 starts from; None: none.
        log_every: steps between ``metrics.csv`` rows.
        stop_after: stop, resumably, once this many steps are done in total; None: train to the end.
        state: the resumable state read from ``out/state.pt`` (:func:`read_state`) that the run
            continues from; None: a fresh start.
        allow_other_data: a resumed run may continue on data other than the data it started with
            (``data.json``); the change is recorded there and the run is no longer reproducible.
    """

    config: Config
    data: tuple[DataSource, ...]
    out: Path
    val_data: tuple[DataSource, ...] = ()
    backbone_weights: str | None = None
    init_weights: str | None = None
    phase1_weights: str | None = None
    log_every: int = 10
    stop_after: int | None = None
    state: dict[str, Any] | None = field(default=None, repr=False)
    allow_other_data: bool = False

    @property
    def full_state(self) -> bool:
        """Whether ``state.pt`` holds every weight: it does unless the frozen ones can be rebuilt
        from the backbone file alone."""
        return self.backbone_weights is None or bool(self.init_weights) or bool(self.phase1_weights)


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
    if run.phase1_weights:  # LoRATv2 phase 2 only: every other run's args.json stays as earlier versions wrote it
        arguments["phase1_weights"] = run.phase1_weights
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
             and isinstance(saved.get("phase1_weights"), str | None)
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


# ----------------------------------------------------------------------------- one training per folder

_LOCK, _OWNER = ".lock", ".lock.owner"
_HELD: set[Path] = set()  # the run folders this process holds (resolved paths)
_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")  # lorat.files.write_atomic's temporary files: .NAME.PID.tmp


def _owner(out: Path) -> str:
    """Who holds ``out``'s lock, as ``.lock.owner`` says: ``pid N on HOST since TIME``."""
    try:
        owner = json.loads((out / _OWNER).read_text())
        return f"pid {int(owner['pid'])} on {owner['host']} since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being replaced right now
        return "its pid and host are not recorded yet"


@contextmanager
def hold_run_folder(out: Path, reentrant: bool = False) -> Iterator[None]:
    """Hold the run folder ``out`` (created if needed) for one training while the block runs.

    The lock is ``out/.lock`` (:mod:`filelock`, taken at once or never: the system drops it when the
    process ends, a kill -9 included); ``out/.lock.owner`` says who holds it (pid, host, start time)
    for the message another training gets. The temporary files that killed processes left in the
    folder are removed once the lock is held (:func:`remove_stale_temp_files`). ``reentrant``: a
    folder this process holds already is held again, as it is (otherwise a second hold is refused,
    in one process as across processes).

    Raises:
        LoratError: another training holds the folder (the message names the folder and its holder),
            or the folder cannot be created or locked.
    """
    key = out.resolve()
    if reentrant and key in _HELD:
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LoratError(f"cannot create the run folder {out}: {err.strerror or err}") from None
    lock = filelock.FileLock(out / _LOCK, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:  # before OSError: Timeout is a TimeoutError
        raise LoratError(f"{out} is in use by another training ({_owner(out)}); wait for it to end or stop it, "
                         f"or give another --output") from None
    except OSError as err:
        raise LoratError(f"cannot lock the run folder {out} ({_LOCK}): {err.strerror or err}") from None
    try:
        _HELD.add(key)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_atomic(out / _OWNER, lambda tmp: tmp.write_text(json.dumps(owner) + "\n"))
        remove_stale_temp_files(out)
        yield
    finally:
        _HELD.discard(key)
        with suppress(OSError):
            (out / _OWNER).unlink(missing_ok=True)
        lock.release()


def try_hold_run_folder(stack: ExitStack, out: Path, reentrant: bool = False) -> str | None:
    """:func:`hold_run_folder` until ``stack`` closes: None, or why the folder cannot be held (the
    error's message, for rank 0 to tell the other processes before it raises)."""
    try:
        stack.enter_context(hold_run_folder(out, reentrant))
    except LoratError as err:
        return str(err)
    return None


def _process_exists(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (assumed where that cannot be probed)."""
    if os.name != "posix":  # os.kill(pid, 0) probes on POSIX only (elsewhere it terminates)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):  # no process has such a number
        return False
    except OSError:  # PermissionError: it exists, another user's
        return True
    return True


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Remove the temporary files (``.NAME.PID.tmp``, see :func:`lorat.files.write_atomic`) that
    processes which no longer exist left in ``out`` and its checkpoint folders (a kill mid-write);
    the files removed. Those of live processes stay."""
    folders = [out, *sorted(p for p in (out / "checkpoint").glob("epoch_*") if p.is_dir())]
    removed = []
    for path in (p for folder in folders for p in sorted(folder.glob(".*.tmp"))):
        match = _TEMP.match(path.name)
        if match is None or int(match[1]) == os.getpid() or _process_exists(int(match[1])) or not path.is_file():
            continue
        with suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def restart_command(out: Path, arguments: dict[str, Any]) -> str:
    """The command that starts the run in ``out`` again from its first step: its ``config.yaml`` and the
    options of ``arguments`` (``args.json``'s keys), quoted for a POSIX shell."""
    parts = ["python", "-m", "lorat.train", str(out / "config.yaml")]
    for option, key in (("--data", "data"), ("--val-data", "val_data")):
        for item in arguments.get(key) or []:
            parts += [option, item]
    for option, key in (("--backbone-weights", "backbone_weights"), ("--init-weights", "init_weights"),
                        ("--phase1-weights", "phase1_weights")):
        if arguments.get(key):
            parts += [option, str(arguments[key])]
    parts += ["--log-every", str(arguments.get("log_every", 10)), "--output", str(out)]
    return shlex.join(parts)


# ----------------------------------------------------------------------------- the data's fingerprint


def data_fingerprint(items: Sequence[DataSource], sources: Sequence[Source], default_split: str
                     ) -> list[dict[str, Any]]:
    """Per dataset (``items`` as read into ``sources``): name, split, number of sequences and frames,
    and the SHA-256 of the sequences' names and lengths in reading order (which decides the pairs
    drawn); not the paths (the same data may move) nor the pixels (too slow to read)."""
    prints = []
    for (name, _, split), source in zip(items, sources, strict=True):
        listing = "".join(f"{seq.name}\t{len(seq)}\n" for seq in source.sequences)
        prints.append({"name": name, "split": split or default_split, "sequences": len(source.sequences),
                       "frames": sum(len(seq) for seq in source.sequences),
                       "sha256": hashlib.sha256(listing.encode()).hexdigest()})
    return prints


_PRINT_FIELDS = {"name": str, "split": str, "sequences": int, "frames": int, "sha256": str}


def _valid_prints(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(entry, dict) and all(isinstance(entry.get(k), kind) for k, kind in _PRINT_FIELDS.items())
        for entry in value)


def read_data_fingerprint(path: Path) -> dict[str, Any] | None:
    """``data.json``: ``{"train": [...], "val": [...], "changes": [...]}``; None when the folder has
    none (a run started before fingerprints were kept).

    Raises:
        LoratError: the file is not a fingerprint.
    """
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoratError(f"{path} is not readable JSON ({err}); delete it to resume without the data check") from None
    if not (isinstance(saved, dict) and _valid_prints(saved.get("train")) and _valid_prints(saved.get("val", []))
            and isinstance(saved.get("changes", []), list)):
        raise LoratError(f"{path} does not hold a data fingerprint; delete it to resume without the data check")
    return saved


def _label(entry: dict[str, Any]) -> str:
    return f"{entry['name']}:{entry['split']}"


def _prints_difference(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str | None:
    if old == new:
        return None
    if [_label(e) for e in old] != [_label(e) for e in new]:
        return (f"gives {', '.join(map(_label, new)) or 'no dataset'} where the run has "
                f"{', '.join(map(_label, old)) or 'none'}")
    for a, b in zip(old, new, strict=True):
        if (a["sequences"], a["frames"]) != (b["sequences"], b["frames"]):
            return (f"{_label(b)} has {b['sequences']} sequences of {b['frames']} frames where the run has "
                    f"{a['sequences']} sequences of {a['frames']} frames")
        if a != b:
            return f"{_label(b)} has other sequences than the run's (the same counts, other names or lengths)"
    return None


def data_difference(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between the data a run started with (``saved``) and ``now``, in a phrase; None:
    the same. Validation data is compared when both have some (``train.val_samples`` may change)."""
    for part, option in (("train", "--data"), ("val", "--val-data")):
        old, new = saved.get(part) or [], now.get(part) or []
        if part == "val" and not (old and new):
            continue
        difference = _prints_difference(old, new)
        if difference:
            return f"{option} {difference}"
    return None


def write_data_fingerprint(path: Path, now: dict[str, Any], saved: dict[str, Any] | None = None,
                           change: dict[str, Any] | None = None) -> None:
    """Write ``data.json``: the fingerprint ``now`` (the validation one ``saved`` when there is none now),
    the ``changes`` of ``saved`` and ``change``, a record of a resume on other data."""
    saved = saved or {}
    record = {"train": now["train"], "val": now.get("val") or saved.get("val", []),
              "changes": [*saved.get("changes", []), *([change] if change else [])]}
    _write_if_changed(path, json.dumps(record, indent=2) + "\n")
