"""``python -m lorat.train CONFIG --data lasot=PATH --output DIR``: the official LoRAT recipe.

    python -m lorat.train configs/b224.yaml --backbone-weights weights/dinov2_vitb14_pretrain.pth \\
        --data lasot=/data/LaSOT --data got10k=/data/GOT-10k --data coco=/data/COCO --output runs/b224
    torchrun --nproc_per_node 8 -m lorat.train ...            # same command, DDP (NCCL / Gloo)
    python -m lorat.train ... --resume runs/b224              # continue exactly where it stopped

One process or many (``torchrun``, any number of nodes): the batch size in the config is global
and every sample is a pure function of (seed, epoch, index), so results do not depend on the
number of processes or data workers. Ctrl-C or SIGTERM finishes the current step and writes the
resumable state first; under ``torchrun --max-restarts`` a restarted worker picks the state up
from ``--output`` by itself.

A resumed run continues bit for bit (weights, AdamW, RNG states, logs) whatever stopped it, a
signal, ``--stop-after`` or a kill -9 at any point: the data loaders draw their seeds from their
own generators (never from the global RNG that drop-path uses); at an epoch end the checkpoint is
written before ``state.pt`` and validation after it, and ``--resume`` writes whichever of the two
the state's epoch still lacks; rows that ``metrics.csv`` / ``val.csv`` got after the last saved
state are dropped. ``--resume DIR --set KEY=VALUE`` may change the schedule (``train.epochs``,
workers, ...), not the model (``model.*``, ``train.finetune``, ``train.freeze_stem``) nor what a
step is (``train.batch_size``, ``train.samples_per_epoch``); the change is kept in ``config.yaml``.

Outputs in ``--output``: ``config.yaml``, ``args.json`` (data paths, for ``--resume``);
``metrics.csv`` (per step: loss, cls, reg, lr, samples/s) and ``val.csv`` (per epoch);
``checkpoint/epoch_NNN/model.safetensors`` (the official trainable-only format) and
``lorat.safetensors`` (our single file), the last five kept, byte-identical for identical runs;
``state.pt`` (resumable: weights, AdamW, GradScaler, step, RNG).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from lorat.checkpoint import build_training_model, load_model, peft_to_official_keys, save_model
from lorat.config import Config, TrainConfig, config_to_dict, load_config
from lorat.data.pairs import PairDataset, Source
from lorat.data.sequences import DATASETS, DatasetError, read_dataset
from lorat.errors import LoratError, run_cli
from lorat.files import write_atomic
from lorat.loss import lorat_loss
from lorat.model import LoRAT

__all__ = ["main", "parameter_groups", "learning_rate", "lr_for_step"]

_KEEP_CHECKPOINTS = 5


# ----------------------------------------------------------------------------- recipe pieces


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for matrices; none for 1-D (after squeeze) / norm parameters and embeddings.

    Officially: LoRA A/B, head ``layers.{0,1}.weight`` and ``head.reg_mlp.layers.2.weight`` decay;
    head biases, ``head.cls_mlp.layers.2.weight`` (1 x C) and ``token_type_embed`` do not.
    """
    decay, no_decay, embed = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "embed" in name:
            embed.append(p)
        elif p.squeeze().ndim <= 1 or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": embed, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def learning_rate(t: int, cfg: TrainConfig, iters_per_epoch: int) -> float:
    """Warm-up-prefixed cosine (timm ``CosineLRScheduler``, per update, ``warmup_prefix=True``)."""
    warmup = int(cfg.warmup_epochs * iters_per_epoch)
    if t < warmup:
        return cfg.warmup_lr + t * (cfg.lr - cfg.warmup_lr) / warmup
    total = cfg.epochs * iters_per_epoch
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * (t - warmup) / total))


def lr_for_step(step: int, cfg: TrainConfig, iters_per_epoch: int) -> float:
    """The lr used by optimiser step ``step``: the scheduler is stepped after each update, so
    steps 0 and 1 both use the initial value and step k >= 1 uses ``learning_rate(k - 1)``."""
    return learning_rate(max(step - 1, 0), cfg, iters_per_epoch)


# ----------------------------------------------------------------------------- processes


def _training_device(arg: str, world: int, local_rank: int) -> torch.device:
    """The device named by ``--device`` (auto, cpu, cuda, cuda:N); under torchrun, the local GPU.

    Raises:
        LoratError: any other name (``mps`` included: training is CPU or CUDA only), or a CUDA
            device that is not there.
    """
    if arg == "auto":
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    if arg == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", arg)
    if match is None:
        raise LoratError(f"--device {arg!r}: training runs on auto, cpu, cuda or cuda:N"
                         + (" (Apple mps is not supported)" if arg.startswith("mps") else ""))
    if not torch.cuda.is_available():
        raise LoratError(f"--device {arg} requested but CUDA is not available")
    index = local_rank if world > 1 else int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise LoratError(f"--device {arg}: there are only {torch.cuda.device_count()} CUDA devices "
                         f"(the process needs cuda:{index})")
    return torch.device("cuda", index)


class _Dist:
    """torchrun environment: rank, world size, device, backend (NCCL on CUDA, Gloo on CPU)."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = _training_device(device_arg, self.world, int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (rank 0 alone reads the run folder)."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(value, 0)
        return bool(value.item())

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (state is saved, then we exit)."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- data


def _parse_data(items: Sequence[str], option: str) -> list[tuple[str, str, str | None]]:
    out = []
    for item in items:
        if "=" not in item:
            raise LoratError(f"{option} expects NAME=PATH, got {item!r} (names: {', '.join(DATASETS)})")
        name, path = item.split("=", 1)
        split = None
        if name.count(":") == 1:
            name, split = name.split(":")
        if name not in DATASETS:
            raise LoratError(f"{option}: unknown dataset {name!r}; known: {', '.join(DATASETS)}")
        out.append((name, path, split))
    return out


def _sources(items, cfg: TrainConfig, default_split: str) -> list[Source]:
    sources = []
    for name, path, split in items:
        sequences = read_dataset(name, path, split or default_split)
        weight = cfg.dataset_weights.get(name, 1.0)
        sources.append(Source(name, sequences, weight))
    return sources


def _quiet_worker(_: int) -> None:
    """Data workers ignore Ctrl-C / SIGTERM (sent to the whole process group): the main process
    finishes the step, saves the state and then shuts the workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def _loader(dataset, indices: list[int], batch: int, workers: int, seed: Sequence[int]) -> DataLoader:
    """A DataLoader over ``dataset[indices]``, in order, with a generator of its own seeded from ``seed``.

    Starting an iterator draws the workers' base seed from the loader's generator, which would
    otherwise be the global torch RNG that drop-path uses: a resumed run, which starts one more
    iterator than an uninterrupted one, would then be one draw off.
    """
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    return DataLoader(Subset(dataset, indices), batch_size=batch, shuffle=False, num_workers=workers,
                      collate_fn=_collate, drop_last=False, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_quiet_worker if workers else None, generator=generator,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


@contextmanager
def _batches(loader: DataLoader, quiet: bool = False) -> Iterator[Iterator[dict[str, torch.Tensor]]]:
    """Iterate ``loader``, shutting its workers down on leaving, whatever the reason.

    The workers ignore SIGTERM (:func:`_quiet_worker`), so an iterator kept alive by a traceback
    (an error raised in a worker holds one) would leave them running, and the interpreter
    would wait for them forever at exit. ``quiet``: no "unreadable image" warnings (they are
    counted instead), in the workers too, which inherit the filter when they start.
    """
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", UserWarning)
        iterator = iter(loader)
        try:
            yield iterator
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
            if shutdown is not None:
                shutdown()


# ----------------------------------------------------------------------------- run folder


def _trim_log(path: Path, last: int) -> None:
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


def _logged_epochs(path: Path) -> set[int]:
    """Epochs with a row in ``val.csv``."""
    if not path.is_file():
        return set()
    with open(path, newline="") as f:
        return {int(row[0]) for row in list(csv.reader(f))[1:] if row and row[0].isdigit()}


def _read_args(path: Path) -> dict[str, Any]:
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


def _read_state(path: Path) -> dict[str, Any]:
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


def _check_resume_config(config: Config, state: dict[str, Any], path: Path) -> None:
    """Refuse a resumed config that the saved state cannot follow (the schedule may change)."""
    for key, old, new in _changes(json.loads(state["config"]), config_to_dict(config)):
        why = "the saved weights are of the run's model" if key.startswith("model.") else _FIXED_TRAIN_KEYS.get(key)
        if why:
            raise LoratError(f"--resume cannot change {key}: the run in {path.parent} has {old!r}, config.yaml and "
                             f"--set now give {new!r} ({why}); start a new run with --output for that")


def _save_state(path: Path, model: LoRAT, optimizer, scaler, step: int, config: Config, full: bool,
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


def _restore_state(state: dict[str, Any], model: LoRAT, optimizer, scaler, full: bool, path: Path) -> None:
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


# ----------------------------------------------------------------------------- checkpoints


def _unwrap(model: torch.nn.Module) -> LoRAT:
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def _checkpoint_due(cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with a checkpoint: every ``checkpoint_every``, and the last."""
    return (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 >= cfg.epochs


def _checkpoint_complete(out: Path, epoch: int, config: Config) -> bool:
    """Whether checkpoint ``epoch`` (1-based) has all its files: the official trainable-only one
    (LoRA runs) and ours."""
    folder = out / "checkpoint" / f"epoch_{epoch:03d}"
    names = (["model.safetensors"] if config.train.finetune == "lora" else []) + ["lorat.safetensors"]
    return all((folder / name).is_file() for name in names)


def _save_checkpoint(out: Path, epoch: int, model: LoRAT, config: Config) -> Path:
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


# ----------------------------------------------------------------------------- main


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lorat.train", description="Train LoRAT (official recipe).",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("config", nargs="?", help="config YAML (not needed with --resume)")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help=f"training dataset, repeatable; NAME in {', '.join(DATASETS)} (NAME:SPLIT=PATH for a split)")
    p.add_argument("--val-data", action="append", default=[], metavar="NAME=PATH",
                   help="validation dataset (default: GOT-10k val if GOT-10k is given, else none)")
    p.add_argument("--backbone-weights", help="DINOv2 file, or torchvision MobileNetV2 for a mobilenetv2 stem "
                                                "(without it the backbone starts random)")
    p.add_argument("--init-weights", type=Path, metavar="FILE",
                   help="start from this single-file model (same architecture; train.finetune full): fine-tuning")
    p.add_argument("--output", type=Path, help="output folder")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (with --resume: schedule keys only, e.g. train.epochs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: the local GPU)")
    p.add_argument("--stop-after", type=int, metavar="STEPS", help="stop (resumably) after this many steps in total")
    p.add_argument("--log-every", type=int, metavar="STEPS",
                   help="steps between metrics.csv rows (default 10; a resumed run keeps its own)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    out = args.resume or args.output
    if out is None:
        raise LoratError("give --output DIR (or --resume DIR)")
    state_path = out / "state.pt"
    resume = args.resume is not None or (restarted and state_path.is_file())
    state = None
    if resume:
        if not state_path.is_file():
            raise LoratError(f"nothing to resume: {state_path} not found")
        state = _read_state(state_path)
        saved_args = _read_args(out / "args.json")
        config = load_config(out / "config.yaml", args.set)  # schedule overrides allowed (more epochs, workers)
        _check_resume_config(config, state, state_path)
        data, val_data = saved_args["data"], saved_args.get("val_data", [])
        backbone = saved_args.get("backbone_weights")
        init = saved_args.get("init_weights")
        log_every = args.log_every or saved_args.get("log_every", 10)
    else:
        if args.config is None:
            raise LoratError("give a CONFIG to start a run")
        if state_path.is_file():
            raise LoratError(f"{out} already holds a run ({state_path}); use --resume {out} or another --output")
        config = load_config(args.config, args.set)
        data, val_data, backbone = args.data, args.val_data, args.backbone_weights
        init = str(args.init_weights) if args.init_weights else None
        log_every = args.log_every or 10
    if not data:
        raise LoratError("give at least one --data NAME=PATH")
    if log_every < 1:
        raise LoratError(f"--log-every must be at least 1, got {log_every}")
    args.log_every = log_every
    dist_env = _Dist(args.device)
    try:
        return _train(config, _parse_data(data, "--data"), _parse_data(val_data, "--val-data"), backbone, out,
                      dist_env, state, args,
                      {"data": data, "val_data": val_data, "backbone_weights": backbone, "log_every": log_every,
                       "init_weights": init})
    finally:
        dist_env.close()


def _load_init_weights(model: LoRAT, config: Config, path: Path) -> None:
    """Copy a single-file model's weights into the training model (fine-tuning start).

    Raises:
        LoratError: LoRA fine-tuning (the file holds merged weights), or a file made for another model.
    """
    if config.train.finetune != "full":
        raise LoratError("--init-weights needs train.finetune full (the file holds merged weights, not adapters)")
    start, start_config = load_model(path)
    if dataclasses.replace(start_config.model, variant=config.model.variant) != config.model:
        raise LoratError(f"--init-weights {path}: made for model {start_config.model.variant}, which differs from "
                         f"the config's {config.model.variant} (only the variant name may differ)")
    with torch.no_grad():
        model.load_state_dict(start.state_dict())


def _update(net: torch.nn.Module, model: LoRAT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            batch: dict[str, torch.Tensor], lr: float, env: _Dist, autocast: Callable,
            grad_clip: float) -> dict[str, torch.Tensor]:
    """One optimiser step on ``batch`` at learning rate ``lr`` (AMP, global-norm clipping); the losses."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
    num_pos = env.mean(batch["positive"].sum().float())
    with autocast():
        outputs = net(batch["z"], batch["x"], batch["z_feat_mask"])
        losses = lorat_loss(outputs, batch["target_box"], batch["positive"], num_pos)
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return losses


def _train(config: Config, data, val_data, backbone, out: Path, env: _Dist, state: dict[str, Any] | None, args,
           saved_args: dict) -> int:
    cfg = config.train
    if cfg.batch_size % env.world:
        raise LoratError(f"train.batch_size {cfg.batch_size} is not divisible by {env.world} processes")
    local_batch = cfg.batch_size // env.world
    iters = cfg.samples_per_epoch // cfg.batch_size
    total_steps = iters * cfg.epochs
    device = env.device

    sources = _sources(data, cfg, "train")
    if not val_data and any(name == "got10k" for name, _, _ in data):
        val_data = [(name, path, "val") for name, path, _ in data if name == "got10k"]
    val_sources = _sources(val_data, cfg, "val") if val_data and cfg.val_samples > 0 else []
    factors = (config.tracking.template_area_factor, config.tracking.search_area_factor)
    train_set = PairDataset(sources, config.model, factors, cfg, cfg.samples_per_epoch, cfg.seed)
    val_set = PairDataset(val_sources, config.model, factors, cfg, cfg.val_samples, cfg.seed + 1) \
        if val_sources else None

    if config.model.backbone.stem != "patch" and cfg.finetune == "lora":
        raise LoratError(f"model.backbone.stem {config.model.backbone.stem} has no pretrained transformer "
                         f"to adapt: use train.finetune full")
    torch.manual_seed(cfg.seed)  # identical random init (backbone without weights, head, LoRA) everywhere
    model = build_training_model(config, backbone)
    if saved_args.get("init_weights") and state is None:
        _load_init_weights(model, config, Path(saved_args["init_weights"]))
    model.to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.warmup_lr,
                                  betas=(0.9, 0.999), eps=1e-8)
    amp = {"auto": torch.float16 if device.type == "cuda" else None, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "none": None}[cfg.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16 and device.type == "cuda")
    # state.pt holds every weight unless the frozen ones can be rebuilt from the backbone file alone
    full_state = backbone is None or bool(saved_args.get("init_weights"))
    step, skipped_total = 0, 0
    if state is not None:
        _restore_state(state, model, optimizer, scaler, full_state, out / "state.pt")
        step, skipped_total = int(state["step"]), int(state.get("skipped_images", 0))
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        config_text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
        if not (out / "config.yaml").is_file() or (out / "config.yaml").read_text() != config_text:
            write_atomic(out / "config.yaml", lambda tmp: tmp.write_text(config_text))  # resume: keep its --set
        if state is None:
            write_atomic(out / "args.json", lambda tmp: tmp.write_text(json.dumps(saved_args, indent=2)))
        _trim_log(out / "metrics.csv", step)  # rows logged after the last saved state (a kill)
        _trim_log(out / "val.csv", step // iters)
    env.barrier()

    net: torch.nn.Module = model
    if cfg.compile:
        net = torch.compile(net)
    if env.world > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      static_graph=True, bucket_cap_mb=100)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext

    def save_state() -> None:
        _save_state(out / "state.pt", model, optimizer, scaler, step, config, full_state, skipped_total)

    def end_epoch(epoch: int, validate: bool, resuming: bool = False) -> None:
        """Checkpoint (when due), then state.pt, then validation. ``resuming``: the state is there,
        write only what its epoch lacks (a kill after state.pt, a deleted folder, a stop by signal)."""
        if env.main and _checkpoint_due(cfg, epoch) and not (resuming and _checkpoint_complete(out, epoch + 1, config)):
            tqdm.write(f"checkpoint: {_save_checkpoint(out, epoch + 1, model, config)}")
        if env.main and not resuming:
            save_state()
        env.barrier()
        if validate and val_set is not None and env.agree(epoch + 1 not in _logged_epochs(out / "val.csv")):
            _validate(net, val_set, env, local_batch, cfg.num_workers, autocast, out, epoch)

    if state is not None and step and step % iters == 0:
        end_epoch(step // iters - 1, validate=True, resuming=True)
    stop = _StopFlag()
    metrics = open(out / "metrics.csv", "a", newline="") if env.main else None  # noqa: SIM115
    writer = csv.writer(metrics) if metrics else None
    if writer and metrics.tell() == 0:
        writer.writerow(["step", "epoch", "lr", "loss", "cls", "reg", "samples_per_s", "skipped_images"])
    data_error: str | None = None
    try:
        while step < min(total_steps, args.stop_after or total_steps):
            epoch, position = divmod(step, iters)
            train_set.set_epoch(epoch)
            indices = [b * cfg.batch_size + env.rank * local_batch + i
                       for b in range(position, iters) for i in range(local_batch)]
            loader = _loader(train_set, indices, local_batch, cfg.num_workers, (cfg.seed, epoch))
            net.train()
            bar = tqdm(total=iters, initial=position, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
                       disable=not env.main, dynamic_ncols=True)
            tick = time.perf_counter()
            with _batches(loader, quiet=True) as batches:
                try:
                    for batch in batches:
                        lr = lr_for_step(step, cfg, iters)
                        losses = _update(net, model, optimizer, scaler, batch, lr, env, autocast, cfg.grad_clip)
                        step += 1
                        skipped_total += int(batch["skipped"].sum())
                        if env.main:
                            now = time.perf_counter()
                            speed = cfg.batch_size / max(now - tick, 1e-9)
                            tick = now
                            bar.update(1)
                            bar.set_postfix(loss=f"{losses['loss'].item():.3f}", lr=f"{lr:.2e}", sps=f"{speed:.1f}")
                            if step % args.log_every == 0 or step == total_steps:
                                writer.writerow([step, epoch, f"{lr:.6e}", f"{losses['loss'].item():.6f}",
                                                 f"{losses['cls'].item():.6f}", f"{losses['reg'].item():.6f}",
                                                 f"{speed:.2f}", skipped_total])
                                metrics.flush()
                        if stop.signal is not None or (args.stop_after and step >= args.stop_after):
                            break
                except DatasetError as err:  # e.g. every image unreadable: stop here, keeping the steps done
                    data_error = str(err)  # not the exception: its traceback holds the loader's workers
            bar.close()
            stopping = stop.signal is not None or bool(args.stop_after and step >= args.stop_after)
            if step == (epoch + 1) * iters:  # the epoch is complete, even if we stop right here
                end_epoch(epoch, validate=stop.signal is None)  # a signal asks to be quick: resume validates
            if stopping or data_error is not None:
                break
        if env.main:
            if step % iters:  # stopped mid-epoch (an epoch end has just been saved above)
                save_state()
            if skipped_total:
                print(f"warning: {skipped_total} unreadable images were skipped")
    finally:
        stop.restore()
        if metrics:
            metrics.close()
    env.barrier()
    if data_error is not None:
        saved = f"; stopped at step {step}, resumable with --resume {out} once the data is fixed" if step else ""
        raise LoratError(f"{data_error}{saved}")
    if stop.signal is not None:
        if env.main:
            print(f"stopped at step {step}; resumable state in {out / 'state.pt'}; continue with --resume {out}")
        return 130 if stop.signal == signal.SIGINT else 143
    if env.main:
        print(f"{'finished' if step >= total_steps else 'paused'} at step {step}/{total_steps}; outputs in {out}")
    return 0


def _validate(net, val_set: PairDataset, env: _Dist, local_batch: int, workers: int, autocast, out: Path,
              epoch: int) -> None:
    """Mean loss over the fixed validation pairs (eval mode), written to val.csv."""
    val_set.set_epoch(0)  # the same pairs every epoch
    n = len(val_set)
    per_rank = [i for i in range(n) if i % env.world == env.rank]
    net.eval()
    sums = torch.zeros(3, device=env.device)
    with torch.no_grad(), _batches(_loader(val_set, per_rank, local_batch, workers, (val_set.seed, 0))) as batches:
        for batch in batches:
            batch = {k: v.to(env.device) for k, v in batch.items()}
            with autocast():
                losses = lorat_loss(net(batch["z"], batch["x"], batch["z_feat_mask"]), batch["target_box"],
                                    batch["positive"])
            sums += torch.stack([losses["loss"], losses["cls"], losses["reg"]]).float() * len(batch["z"])
    sums = env.mean(sums) * env.world / n
    if env.main:
        path = out / "val.csv"
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["epoch", "val_loss", "val_cls", "val_reg"])
            w.writerow([epoch + 1, *(f"{v:.6f}" for v in sums.tolist())])
        tqdm.write(f"epoch {epoch + 1}: validation loss {sums[0].item():.4f}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
