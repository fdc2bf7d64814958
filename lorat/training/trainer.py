"""The training loop of ``python -m lorat.train``, top to bottom: set-up, steps, bookkeeping.

:func:`run_training` builds the run (:func:`_setup`), then trains epoch after epoch
(:func:`_train_epoch`: one optimiser step per batch, then its log row), ending each epoch with a
checkpoint, the resumable state and validation (:func:`_end_epoch`), and stops on a signal,
``--stop-after`` or a data error with the state saved. The recipe is in :mod:`lorat.training.optim`, the
run folder's files in :mod:`lorat.training.run_folder`, the data loaders in :mod:`lorat.data.loading`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lorat.checkpoint.build import build_training_model
from lorat.checkpoint.loader import load_model
from lorat.config import Config, config_to_dict
from lorat.data.loading import batches, loader, sources
from lorat.data.pairs import PairDataset
from lorat.data.sequences import DatasetError
from lorat.errors import LoratError
from lorat.files import write_atomic
from lorat.model.vit import LoRAT
from lorat.runtime import Distributed
from lorat.training.loss import lorat_loss
from lorat.training.optim import make_optimizer, make_scheduler, update
from lorat.training.run_folder import (
    checkpoint_complete,
    checkpoint_due,
    logged_epochs,
    restore_state,
    save_checkpoint,
    save_state,
    trim_log,
)

__all__ = ["run_training", "load_init_weights"]

_AMP = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "none": None}
_METRICS_HEADER = ["step", "epoch", "lr", "loss", "cls", "reg", "samples_per_s", "skipped_images"]


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


def load_init_weights(model: LoRAT, config: Config, path: Path) -> None:
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


@dataclass
class _Run:
    """Everything a training loop step touches (built by :func:`_setup`)."""

    config: Config
    env: Distributed
    out: Path
    model: LoRAT                 # the weights (saved, checkpointed)
    net: torch.nn.Module         # what runs the batches: the model, compiled and/or in DDP
    optimizer: torch.optim.Optimizer
    scheduler: Any               # timm CosineLRScheduler, stepped per update
    scaler: torch.amp.GradScaler
    autocast: Any
    train_set: PairDataset
    val_set: PairDataset | None
    full_state: bool             # state.pt holds every weight (else the trainable ones only)
    step: int = 0
    skipped: int = 0

    @property
    def iters(self) -> int:
        return self.config.train.samples_per_epoch // self.config.train.batch_size

    def save_state(self) -> None:
        save_state(self.out / "state.pt", self.model, self.optimizer, self.scaler, self.step, self.config,
                   self.full_state, self.skipped)


def _setup(config: Config, data, val_data, backbone, out: Path, env: Distributed, state: dict[str, Any] | None,
           saved_args: dict) -> _Run:
    """Datasets, model, optimiser, schedule and AMP; the saved state put back; the run folder prepared."""
    cfg = config.train
    if cfg.batch_size % env.world:
        raise LoratError(f"train.batch_size {cfg.batch_size} is not divisible by {env.world} processes")
    if config.model.backbone.stem != "patch" and cfg.finetune == "lora":
        raise LoratError(f"model.backbone.stem {config.model.backbone.stem} has no pretrained transformer "
                         f"to adapt: use train.finetune full")
    if not val_data and any(name == "got10k" for name, _, _ in data):
        val_data = [(name, path, "val") for name, path, _ in data if name == "got10k"]
    val_sources = sources(val_data, cfg, "val") if val_data and cfg.val_samples > 0 else []
    factors = (config.tracking.template_area_factor, config.tracking.search_area_factor)
    train_set = PairDataset(sources(data, cfg, "train"), config.model, factors, cfg, cfg.samples_per_epoch, cfg.seed)
    val_set = PairDataset(val_sources, config.model, factors, cfg, cfg.val_samples, cfg.seed + 1) \
        if val_sources else None

    device = env.device
    torch.manual_seed(cfg.seed)  # identical random init (backbone without weights, head, LoRA) everywhere
    model = build_training_model(config, backbone)
    if saved_args.get("init_weights") and state is None:
        load_init_weights(model, config, Path(saved_args["init_weights"]))
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    iters = cfg.samples_per_epoch // cfg.batch_size
    scheduler = make_scheduler(optimizer, cfg, iters)
    amp = torch.float16 if cfg.amp == "auto" and device.type == "cuda" else _AMP[cfg.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16 and device.type == "cuda")
    net: torch.nn.Module = torch.compile(model) if cfg.compile else model
    if env.world > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      static_graph=True, bucket_cap_mb=100)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    # state.pt holds every weight unless the frozen ones can be rebuilt from the backbone file alone
    run = _Run(config, env, out, model, net, optimizer, scheduler, scaler, autocast, train_set, val_set,
               full_state=backbone is None or bool(saved_args.get("init_weights")))
    if state is not None:
        restore_state(state, model, optimizer, scaler, run.full_state, out / "state.pt")
        run.step, run.skipped = int(state["step"]), int(state.get("skipped_images", 0))
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        config_text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
        if not (out / "config.yaml").is_file() or (out / "config.yaml").read_text() != config_text:
            write_atomic(out / "config.yaml", lambda tmp: tmp.write_text(config_text))  # resume: keep its --set
        args_text = json.dumps(saved_args, indent=2)
        if not (out / "args.json").is_file() or (out / "args.json").read_text() != args_text:
            write_atomic(out / "args.json", lambda tmp: tmp.write_text(args_text))  # resumed elsewhere: new paths
        trim_log(out / "metrics.csv", run.step)  # rows logged after the last saved state (a kill)
        trim_log(out / "val.csv", run.step // iters)
    env.barrier()
    return run


def _end_epoch(run: _Run, epoch: int, validate: bool, resuming: bool = False, log: _Log | None = None) -> None:
    """Checkpoint (when due), then state.pt, then validation. ``resuming``: the state is there,
    write only what its epoch lacks (a kill after state.pt, a deleted folder, a stop by signal)."""
    cfg, env, out = run.config.train, run.env, run.out
    if env.main and checkpoint_due(cfg, epoch) and not (resuming and checkpoint_complete(out, epoch + 1, run.config)):
        tqdm.write(f"checkpoint: {save_checkpoint(out, epoch + 1, run.model, run.config)}")
    if env.main and not resuming:
        run.save_state()
    env.barrier()
    if validate and run.val_set is not None and env.agree(epoch + 1 not in logged_epochs(out / "val.csv")):
        values = _validation_loss(run.net, run.val_set, env, cfg.batch_size // env.world, cfg.num_workers,
                                  run.autocast, out, epoch)
        if log is not None:
            log.validation(epoch, (epoch + 1) * run.iters, values)


class _Log:
    """``metrics.csv`` rows and TensorBoard scalars (``tensorboard/``) every ``every`` steps, and the
    progress bar's numbers (rank 0 only). A resumed run drops the events past its saved step."""

    def __init__(self, out: Path, every: int, total: int, step: int):
        self.file = open(out / "metrics.csv", "a", newline="")  # noqa: SIM115 (closed by close())
        self.writer = csv.writer(self.file)
        if self.file.tell() == 0:
            self.writer.writerow(_METRICS_HEADER)
        self.events = _tensorboard(out, step)
        self.every, self.total, self.tick = every, total, time.perf_counter()

    def write(self, run: _Run, epoch: int, lr: float, losses: dict[str, torch.Tensor], bar: tqdm) -> None:
        now = time.perf_counter()
        speed = run.config.train.batch_size / max(now - self.tick, 1e-9)
        self.tick = now
        bar.update(1)
        bar.set_postfix(loss=f"{losses['loss'].item():.3f}", lr=f"{lr:.2e}", sps=f"{speed:.1f}")
        if run.step % self.every == 0 or run.step == self.total:
            values = {k: losses[k].item() for k in ("loss", "cls", "reg")}
            self.writer.writerow([run.step, epoch, f"{lr:.6e}", *(f"{v:.6f}" for v in values.values()),
                                  f"{speed:.2f}", run.skipped])
            self.file.flush()
            if self.events is not None:
                for key, value in {**values, "lr": lr, "samples_per_s": speed}.items():
                    self.events.add_scalar(f"train/{key}", value, run.step)
                self.events.flush()

    def validation(self, epoch: int, step: int, values: list[float]) -> None:
        if self.events is not None:
            for key, value in zip(("loss", "cls", "reg"), values, strict=True):
                self.events.add_scalar(f"val/{key}", value, step)
            self.events.flush()

    def close(self) -> None:
        self.file.close()
        if self.events is not None:
            self.events.close()


def _tensorboard(out: Path, step: int):
    """A TensorBoard writer for ``out/tensorboard`` (an earlier process's events after ``step``, the
    saved state, are dropped), or None with a note when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises this when the tensorboard package is missing
        print("note: the tensorboard package is not installed; metrics go to metrics.csv only")
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)


def _summary(run: _Run, backbone, saved_args: dict) -> str:
    """The start-up summary: model, weights, data, schedule, device, output."""
    cfg, model = run.config.train, run.model
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = "; ".join(f"{s.name}: {len(s.sequences)} sequences (weight {s.weight:g})" for s in run.train_set.sources)
    val = "; ".join(f"{s.name}: {len(s.sequences)}" for s in run.val_set.sources) if run.val_set else "none"
    start = (f"init {saved_args['init_weights']}" if saved_args.get("init_weights")
             else f"backbone {backbone}" if backbone else "backbone randomly initialised")
    amp = "off" if run.autocast is nullcontext else "float16" if cfg.amp == "auto" else str(cfg.amp)
    lines = [
        f"model      {run.config.model.variant}: {params / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trained "
        f"(finetune {cfg.finetune}); {start}",
        f"data       {data}; validation {val}",
        f"schedule   {cfg.epochs} epochs x {run.iters} steps of {cfg.batch_size} pairs = {cfg.epochs * run.iters} "
        f"steps; lr {cfg.lr:g}, warm-up {cfg.warmup_epochs} epoch(s)",
        f"device     {run.env.device} x {run.env.world} process(es); amp {amp}; {cfg.num_workers} data worker(s)",
        f"output     {run.out} (metrics.csv, tensorboard/, checkpoint/, state.pt)",
    ]
    return "\n".join(lines)


def run_training(config: Config, data, val_data, backbone, out: Path, env: Distributed, state: dict[str, Any] | None,
           args: argparse.Namespace, saved_args: dict) -> int:
    """Set up, then epochs of steps with their bookkeeping, then the closing message; the exit code."""
    run = _setup(config, data, val_data, backbone, out, env, state, saved_args)
    cfg, iters = config.train, run.iters
    total = iters * cfg.epochs
    end = min(total, args.stop_after or total)
    if env.main:
        print(_summary(run, backbone, saved_args))
        if state is not None:
            print(f"resuming from step {run.step} of {total} (epoch {run.step // iters + 1} of {cfg.epochs}, "
                  f"{run.step % iters} of its {iters} steps done) in {out}")
    log = _Log(out, args.log_every, total, run.step) if env.main else None
    if state is not None and run.step and run.step % iters == 0:
        _end_epoch(run, run.step // iters - 1, validate=True, resuming=True, log=log)
    stop = _StopFlag()
    data_error: str | None = None
    try:
        while run.step < end and data_error is None:
            epoch = run.step // iters
            data_error = _train_epoch(run, stop, log, args.stop_after)
            if run.step == (epoch + 1) * iters:  # the epoch is complete, even if we stop right here
                _end_epoch(run, epoch, validate=stop.signal is None, log=log)  # a signal: quick; resume validates
            if stop.signal is not None:
                break
        if env.main and run.step % iters:  # stopped mid-epoch (an epoch end has just been saved above)
            run.save_state()
        if env.main and run.skipped:
            print(f"warning: {run.skipped} unreadable images were skipped")
    finally:
        stop.restore()
        if log is not None:
            log.close()
    env.barrier()
    if data_error is not None:
        if run.step:
            data_error += f"; stopped at step {run.step}, resumable with --resume {out} once the data is fixed"
        raise LoratError(data_error)
    if stop.signal is not None:
        if env.main:
            print(f"stopped at step {run.step}; resumable state in {out / 'state.pt'}; continue with --resume {out}")
        return 130 if stop.signal == signal.SIGINT else 143
    if env.main:
        print(f"{'finished' if run.step >= total else 'paused'} at step {run.step}/{total}; outputs in {out}")
    return 0


def _train_epoch(run: _Run, stop: _StopFlag, log: _Log | None, stop_after: int | None) -> str | None:
    """Train from ``run.step`` to the end of its epoch, or until a stop; returns a data error, if any."""
    cfg, env = run.config.train, run.env
    epoch, position = divmod(run.step, run.iters)
    local = cfg.batch_size // env.world
    run.train_set.set_epoch(epoch)
    indices = [b * cfg.batch_size + env.rank * local + i for b in range(position, run.iters) for i in range(local)]
    run.net.train()
    bar = tqdm(total=run.iters, initial=position, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
               disable=not env.main, dynamic_ncols=True)
    if log is not None:
        log.tick = time.perf_counter()
    with bar, batches(loader(run.train_set, indices, local, cfg.num_workers, (cfg.seed, epoch)), quiet=True) as stream:
        try:
            for batch in stream:
                # the step (timm's scheduler is stepped after each update: steps 0 and 1 share the first lr)
                run.scheduler.step_update(max(run.step - 1, 0))
                lr = run.optimizer.param_groups[0]["lr"]
                batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
                num_pos = env.mean(batch["positive"].sum().float())
                losses = update(run.net, run.optimizer, run.scaler, batch, num_pos, run.autocast, cfg.grad_clip)
                run.step += 1
                run.skipped += int(batch["skipped"].sum())
                # bookkeeping
                if log is not None:
                    log.write(run, epoch, lr, losses, bar)
                if stop.signal is not None or (stop_after and run.step >= stop_after):
                    break
        except DatasetError as err:  # e.g. every image unreadable: stop here, keeping the steps done
            return str(err)  # not the exception: its traceback holds the loader's workers
    return None


def _validation_loss(net, val_set: PairDataset, env: Distributed, local_batch: int, workers: int, autocast, out: Path,
                     epoch: int) -> list[float]:
    """Mean loss, cls and reg over the fixed validation pairs (eval mode), written to val.csv and returned."""
    val_set.set_epoch(0)  # the same pairs every epoch
    n = len(val_set)
    per_rank = [i for i in range(n) if i % env.world == env.rank]
    net.eval()
    sums = torch.zeros(3, device=env.device)
    with torch.no_grad(), batches(loader(val_set, per_rank, local_batch, workers, (val_set.seed, 0))) as stream:
        for batch in stream:
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
    return sums.tolist()
