"""The training loop of ``python -m lorat.train``, top to bottom: set-up, steps, bookkeeping.

A :class:`~lorat.training.run_folder.TrainingRun` (also importable from here) says what to train:
config, data, weight files, run folder, resume state. :func:`run_training` builds it
(:func:`_setup`; a resumed run first checks that its data is the data it started with), then
trains epoch after epoch (:func:`_train_epoch`: one optimiser step per batch, then its log row, and
the resumable state every ``train.save_state_every_minutes``), ending each epoch with a checkpoint,
the resumable state and validation (:func:`_end_epoch`), and stops on a signal, the ``stop_after``
step or a data error with the state saved; rank 0 holds the run folder throughout. The recipe is in
:mod:`lorat.training.optim`, the step (forward, loss, update) in :mod:`lorat.training.step`, the run
folder's files in :mod:`lorat.training.run_folder`, the data loaders in :mod:`lorat.data.loading`.
"""

from __future__ import annotations

import csv
import signal
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lorat.checkpoint.build import build_training_model
from lorat.checkpoint.loader import load_model
from lorat.config import Config, TrainConfig
from lorat.data.loading import batches, loader, sources
from lorat.data.pairs import PairDataset
from lorat.data.sequences import DatasetError
from lorat.errors import LoratError
from lorat.model.v2 import LoRATv2
from lorat.model.vit import LoRAT
from lorat.runtime import Distributed, dtype_name
from lorat.training.optim import make_optimizer, make_scheduler
from lorat.training.run_folder import (
    TrainingRun,
    checkpoint_complete,
    checkpoint_due,
    data_difference,
    data_fingerprint,
    logged_epochs,
    read_data_fingerprint,
    restore_state,
    save_checkpoint,
    save_state,
    trim_log,
    try_hold_run_folder,
    write_data_fingerprint,
    write_run_files,
)
from lorat.training.step import forward_loss, precision, training_amp, update

__all__ = ["TrainingRun", "run_training", "load_init_weights"]

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
    if not config.model.same_network(start_config.model):
        raise LoratError(f"--init-weights {path}: made for model {start_config.model.variant}, which differs from "
                         f"the config's {config.model.variant} (only the variant name may differ)")
    with torch.no_grad():
        model.load_state_dict(start.state_dict())


def load_phase_one(model: LoRATv2, path: Path, backbone_weights: str | None) -> None:
    """Start a LoRATv2 phase-2 training model from the phase-1 model in ``path`` (through the one
    loader: our single file, or an official phase-1 checkpoint with its backbone file), as the official
    phase 2 starts: phase 1's template and search streams become the frozen template and reference
    streams; the new search stream starts from the backbone with fresh LoRA, norm and head.

    Raises:
        LoratError: the file is not the phase-1 model of the run's config.
    """
    from lorat.checkpoint.build import phase_one_config, start_from_phase_one
    from lorat.checkpoint.files import embeds_config

    given = None if embeds_config(path) else Config(model=phase_one_config(model.cfg))  # official: no config inside
    first, first_config = load_model(path, given, backbone_weights=backbone_weights)
    if first_config.model.family != "loratv2" or first_config.model.phase_two:
        raise LoratError(f"--phase1-weights {path}: holds {first_config.model.variant}, not a LoRATv2 phase-1 model")
    start_from_phase_one(model, first, path)


@dataclass
class _Loop:
    """The built run, everything a training loop step touches (:func:`_setup`), and where it stands."""

    spec: TrainingRun
    env: Distributed
    model: LoRAT                 # the weights (saved, checkpointed)
    net: torch.nn.Module         # what runs the batches: the model, compiled and/or in DDP
    optimizer: torch.optim.Optimizer
    scheduler: Any               # timm CosineLRScheduler, stepped per update
    scaler: torch.amp.GradScaler
    autocast: Any
    train_set: PairDataset
    val_set: PairDataset | None
    step: int = 0
    skipped: int = 0
    saved_at: float = 0.0  # time.monotonic() when state.pt was last written, or the loop was built

    @property
    def config(self) -> Config:
        return self.spec.config

    @property
    def out(self) -> Path:
        return self.spec.out

    @property
    def iters(self) -> int:
        return self.config.train.samples_per_epoch // self.config.train.batch_size

    @property
    def total(self) -> int:
        return self.iters * self.config.train.epochs

    def save_state(self) -> None:
        save_state(self.out / "state.pt", self.model, self.optimizer, self.scaler, self.step, self.config,
                   self.spec.full_state, self.skipped)
        self.saved_at = time.monotonic()

    def state_due(self) -> bool:
        """Whether a mid-epoch state is due: ``train.save_state_every_minutes`` have passed since the
        last one (an epoch end writes its own)."""
        minutes = self.config.train.save_state_every_minutes
        return minutes > 0 and self.step % self.iters != 0 and time.monotonic() - self.saved_at >= minutes * 60


# ----------------------------------------------------------------------------- set-up


def _check_recipe(config: Config, env: Distributed) -> None:
    """Refuse what the processes or the model cannot train."""
    cfg = config.train
    if cfg.batch_size % env.world:
        raise LoratError(f"train.batch_size {cfg.batch_size} is not divisible by {env.world} processes")
    if config.model.backbone.stem != "patch" and cfg.finetune == "lora":
        raise LoratError(f"model.backbone.stem {config.model.backbone.stem} has no pretrained transformer "
                         f"to adapt: use train.finetune full")


def _datasets(spec: TrainingRun) -> tuple[PairDataset, PairDataset | None, dict[str, list]]:
    """The training pairs, the fixed validation pairs (None without validation data or samples) and
    the fingerprint of both (``data.json``)."""
    config, cfg = spec.config, spec.config.train
    val_data = spec.val_data
    if not val_data:  # default: GOT-10k's val split, when GOT-10k is trained on
        val_data = tuple((name, path, "val") for name, path, _ in spec.data if name == "got10k")
    val_sources = sources(val_data, cfg, "val") if val_data and cfg.val_samples > 0 else []
    train_sources = sources(spec.data, cfg, "train")
    fingerprint = {"train": data_fingerprint(spec.data, train_sources, "train"),
                   "val": data_fingerprint(val_data, val_sources, "val") if val_sources else []}
    train_set = PairDataset(train_sources, config.model, config.tracking, cfg, cfg.samples_per_epoch, cfg.seed)
    if not val_sources:
        return train_set, None, fingerprint
    return (train_set, PairDataset(val_sources, config.model, config.tracking, cfg, cfg.val_samples, cfg.seed + 1),
            fingerprint)


def _check_data(spec: TrainingRun, env: Distributed, now: dict[str, list]) -> tuple[dict | None, str | None]:
    """A resumed run's data against the fingerprint it started with (``data.json``; rank 0 decides for
    every process): the saved fingerprint (None: none) and what differs (None: nothing).

    Raises:
        LoratError: the data differs and ``spec.allow_other_data`` is off, or ``data.json`` is damaged.
    """
    saved = difference = refusal = None
    if env.main and spec.state is not None:
        try:
            saved = read_data_fingerprint(spec.out / "data.json")
        except LoratError as err:
            refusal = str(err)
        difference = data_difference(saved, now) if saved is not None else None
        if difference is not None and not spec.allow_other_data:
            refusal = (f"--resume {spec.out}: {difference}; give the data the run started with (it may have moved), "
                       f"or add --allow-other-data to go on with this data (the run is then no longer reproducible)")
    if not env.agree(refusal is None):
        raise LoratError(refusal or f"rank 0 refused the data for {spec.out}")
    return saved, difference


def _training_model(spec: TrainingRun, device: torch.device) -> LoRAT:
    """The model on ``device``: the backbone file or the init weights, else a seeded random start."""
    torch.manual_seed(spec.config.train.seed)  # identical random init (backbone without weights, head, LoRA) everywhere
    model = build_training_model(spec.config, spec.backbone_weights)
    if spec.init_weights and spec.state is None:
        load_init_weights(model, spec.config, Path(spec.init_weights))
    elif spec.phase1_weights and spec.state is None:
        load_phase_one(model, Path(spec.phase1_weights), spec.backbone_weights)
    return model.to(device)


def _network(model: LoRAT, cfg: TrainConfig, env: Distributed) -> torch.nn.Module:
    """What runs the batches: the model, compiled when the config asks, in DDP over several processes."""
    net: torch.nn.Module = torch.compile(model) if cfg.compile else model
    if env.world > 1:
        device = env.device
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      static_graph=True, bucket_cap_mb=100)
    return net


def _setup(spec: TrainingRun, env: Distributed) -> _Loop:
    """Datasets, model, optimiser, schedule and AMP; the saved state put back; the run folder prepared."""
    cfg, device = spec.config.train, env.device
    _check_recipe(spec.config, env)
    train_set, val_set, fingerprint = _datasets(spec)
    saved_data, other_data = _check_data(spec, env, fingerprint)
    model = _training_model(spec, device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.samples_per_epoch // cfg.batch_size)
    _, scaler, autocast = precision(cfg, device)
    loop = _Loop(spec, env, model, _network(model, cfg, env), optimizer, scheduler, scaler, autocast, train_set,
                 val_set, saved_at=time.monotonic())
    if spec.state is not None:
        restore_state(spec.state, model, optimizer, scaler, spec.full_state, spec.out / "state.pt")
        loop.step, loop.skipped = int(spec.state["step"]), int(spec.state.get("skipped_images", 0))
    if env.main:
        change = None
        if other_data is not None:
            change = {"step": loop.step, "difference": other_data, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
            print(f"warning: --allow-other-data: {other_data}; the run goes on with this data from step {loop.step} "
                  f"and is no longer reproducible (recorded in {spec.out / 'data.json'})")
        write_run_files(spec)
        write_data_fingerprint(spec.out / "data.json", fingerprint, saved_data, change)
        trim_log(spec.out / "metrics.csv", loop.step)  # rows logged after the last saved state (a kill)
        trim_log(spec.out / "val.csv", loop.step // loop.iters)
    env.barrier()
    return loop


# ----------------------------------------------------------------------------- the loop


def run_training(spec: TrainingRun, env: Distributed) -> int:
    """Set up, then epochs of steps with their bookkeeping, then the closing message; the exit code.

    Rank 0 holds the run folder throughout (:func:`~lorat.training.run_folder.hold_run_folder`;
    ``python -m lorat.train`` takes it before it reads the folder, and it is held on here).

    Raises:
        LoratError: another training holds the run folder, a recipe the processes cannot run, data
            that cannot be read (the steps done are saved first), a state that does not fit the
            model, data other than the resumed run's.
    """
    with ExitStack() as folder:
        refusal = try_hold_run_folder(folder, spec.out, reentrant=True) if env.main else None
        if not env.agree(refusal is None):
            raise LoratError(refusal or f"{spec.out} is in use by another training (rank 0 could not lock it)")
        return _train(spec, env)


def _train(spec: TrainingRun, env: Distributed) -> int:
    """:func:`run_training` in the held run folder."""
    loop = _setup(spec, env)
    if env.main:
        _announce(loop)
    log = _Log(spec.out, spec.log_every, loop.total, loop.step) if env.main else None
    if spec.state is not None and loop.step and loop.step % loop.iters == 0:
        _end_epoch(loop, loop.step // loop.iters - 1, validate=True, resuming=True, log=log)
    stop = _StopFlag()
    try:
        data_error = _train_epochs(loop, stop, log)
        if env.main and loop.step % loop.iters:  # stopped mid-epoch (an epoch end has just been saved)
            loop.save_state()
        if env.main and loop.skipped:
            print(f"warning: {loop.skipped} unreadable images were skipped")
    finally:
        stop.restore()
        if log is not None:
            log.close()
    env.barrier()
    return _conclude(loop, stop, data_error)


def _announce(loop: _Loop) -> None:
    """The start-up summary and, for a resumed run, where it resumes."""
    cfg, iters = loop.config.train, loop.iters
    print(_summary(loop))
    if loop.spec.state is not None:
        print(f"resuming from step {loop.step} of {loop.total} (epoch {loop.step // iters + 1} of {cfg.epochs}, "
              f"{loop.step % iters} of its {iters} steps done) in {loop.out}")


def _train_epochs(loop: _Loop, stop: _StopFlag, log: _Log | None) -> str | None:
    """Epochs, each ended by :func:`_end_epoch`, until the end, the ``stop_after`` step, a signal or
    a data error; returns the data error, if any."""
    iters = loop.iters
    end = min(loop.total, loop.spec.stop_after or loop.total)
    data_error: str | None = None
    while loop.step < end and data_error is None:
        epoch = loop.step // iters
        data_error = _train_epoch(loop, stop, log)
        if loop.step == (epoch + 1) * iters:  # the epoch is complete, even if we stop right here
            _end_epoch(loop, epoch, validate=stop.signal is None, log=log)  # a signal: quick; resume validates
        if stop.signal is not None:
            break
    return data_error


def _conclude(loop: _Loop, stop: _StopFlag, data_error: str | None) -> int:
    """The closing message and the exit code (130 / 143 after SIGINT / SIGTERM).

    Raises:
        LoratError: the data error that stopped the run, with how to resume it.
    """
    out, main = loop.out, loop.env.main
    if data_error is not None:
        if loop.step:
            data_error += f"; stopped at step {loop.step}, resumable with --resume {out} once the data is fixed"
        raise LoratError(data_error)
    if stop.signal is not None:
        if main:
            print(f"stopped at step {loop.step}; resumable state in {out / 'state.pt'}; continue with --resume {out}")
        return 130 if stop.signal == signal.SIGINT else 143
    if main:
        print(f"{'finished' if loop.step >= loop.total else 'paused'} at step {loop.step}/{loop.total}; "
              f"outputs in {out}")
    return 0


def _train_epoch(loop: _Loop, stop: _StopFlag, log: _Log | None) -> str | None:
    """Train from ``loop.step`` to the end of its epoch, or until a stop; returns a data error, if any."""
    cfg, env, stop_after = loop.config.train, loop.env, loop.spec.stop_after
    epoch, position = divmod(loop.step, loop.iters)
    local = cfg.batch_size // env.world
    loop.train_set.set_epoch(epoch)
    indices = [b * cfg.batch_size + env.rank * local + i for b in range(position, loop.iters) for i in range(local)]
    loop.net.train()
    bar = tqdm(total=loop.iters, initial=position, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
               disable=not env.main, dynamic_ncols=True)
    if log is not None:
        log.tick = time.perf_counter()
    with bar, batches(loader(loop.train_set, indices, local, cfg.num_workers, (cfg.seed, epoch)), quiet=True) as stream:
        try:
            for batch in stream:
                lr, losses = _step(loop, batch)
                if log is not None:
                    log.write(loop, epoch, lr, losses, bar)
                if stop.signal is not None or (stop_after and loop.step >= stop_after):
                    break
                if env.main and loop.state_due():  # a kill loses minutes, not the epoch
                    loop.save_state()
        except DatasetError as err:  # e.g. every image unreadable: stop here, keeping the steps done
            return str(err)  # not the exception: its traceback holds the loader's workers
    return None


def _step(loop: _Loop, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimiser step on a batch from the loader; its lr and losses."""
    env = loop.env
    # timm's scheduler is stepped after each update: steps 0 and 1 share the first lr
    loop.scheduler.step_update(max(loop.step - 1, 0))
    lr = loop.optimizer.param_groups[0]["lr"]
    batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
    num_pos = env.mean(batch["positive"].sum().float())
    losses = update(loop.net, loop.optimizer, loop.scaler, batch, num_pos, loop.autocast,
                    loop.config.train.grad_clip)
    loop.step += 1
    loop.skipped += int(batch["skipped"].sum())
    return lr, losses


# ----------------------------------------------------------------------------- epoch ends


def _end_epoch(loop: _Loop, epoch: int, validate: bool, resuming: bool = False, log: _Log | None = None) -> None:
    """Checkpoint (when due), then state.pt, then validation. ``resuming``: the state is there,
    write only what its epoch lacks (a kill after state.pt, a deleted folder, a stop by signal)."""
    cfg, env, out = loop.config.train, loop.env, loop.out
    if env.main and checkpoint_due(cfg, epoch) and not (resuming and checkpoint_complete(out, epoch + 1, loop.config)):
        tqdm.write(f"checkpoint: {save_checkpoint(out, epoch + 1, loop.model, loop.config)}")
    if env.main and not resuming:
        loop.save_state()
    env.barrier()
    if validate and loop.val_set is not None and env.agree(epoch + 1 not in logged_epochs(out / "val.csv")):
        values = _validate(loop, loop.val_set, epoch)
        if log is not None:
            log.validation(epoch, (epoch + 1) * loop.iters, values)


def _validate(loop: _Loop, val_set: PairDataset, epoch: int) -> list[float]:
    """Mean loss, cls and reg over the fixed validation pairs (eval mode), written to val.csv and returned."""
    cfg, env, net = loop.config.train, loop.env, loop.net
    val_set.set_epoch(0)  # the same pairs every epoch
    n = len(val_set)
    per_rank = [i for i in range(n) if i % env.world == env.rank]
    net.eval()
    sums = torch.zeros(3, device=env.device)
    local = cfg.batch_size // env.world
    with torch.no_grad(), batches(loader(val_set, per_rank, local, cfg.num_workers, (val_set.seed, 0))) as stream:
        for batch in stream:
            batch = {k: v.to(env.device) for k, v in batch.items()}
            losses = forward_loss(net, batch, loop.autocast)
            sums += torch.stack([losses["loss"], losses["cls"], losses["reg"]]).float() * len(batch["z"])
    sums = env.mean(sums) * env.world / n
    if env.main:
        _write_validation(loop.out / "val.csv", epoch, sums.tolist())
    return sums.tolist()


def _write_validation(path: Path, epoch: int, values: list[float]) -> None:
    """Append epoch ``epoch`` (0-based)'s validation losses to ``val.csv`` and say the loss."""
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["epoch", "val_loss", "val_cls", "val_reg"])
        w.writerow([epoch + 1, *(f"{v:.6f}" for v in values)])
    tqdm.write(f"epoch {epoch + 1}: validation loss {values[0]:.4f}")


# ----------------------------------------------------------------------------- what a user sees


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

    def write(self, loop: _Loop, epoch: int, lr: float, losses: dict[str, torch.Tensor], bar: tqdm) -> None:
        now = time.perf_counter()
        speed = loop.config.train.batch_size / max(now - self.tick, 1e-9)
        self.tick = now
        bar.update(1)
        bar.set_postfix(loss=f"{losses['loss'].item():.3f}", lr=f"{lr:.2e}", sps=f"{speed:.1f}")
        if loop.step % self.every == 0 or loop.step == self.total:
            values = {k: losses[k].item() for k in ("loss", "cls", "reg")}
            self.writer.writerow([loop.step, epoch, f"{lr:.6e}", *(f"{v:.6f}" for v in values.values()),
                                  f"{speed:.2f}", loop.skipped])
            self.file.flush()
            if self.events is not None:
                for key, value in {**values, "lr": lr, "samples_per_s": speed}.items():
                    self.events.add_scalar(f"train/{key}", value, loop.step)
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
    saved state, are dropped: all of them when a run killed before its first state starts again), or
    None with a note when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises this when the tensorboard package is missing
        print("note: the tensorboard package is not installed; metrics go to metrics.csv only")
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=step + 1)


def _summary(loop: _Loop) -> str:
    """The start-up summary: model, weights, data, schedule, device, output."""
    cfg, model, spec = loop.config.train, loop.model, loop.spec
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = "; ".join(f"{s.name}: {len(s.sequences)} sequences (weight {s.weight:g})" for s in loop.train_set.sources)
    val = "; ".join(f"{s.name}: {len(s.sequences)}" for s in loop.val_set.sources) if loop.val_set else "none"
    start = (f"init {spec.init_weights}" if spec.init_weights
             else f"backbone {spec.backbone_weights}" if spec.backbone_weights else "backbone randomly initialised")
    amp = dtype_name(training_amp(cfg, loop.env.device)) if loop.autocast is not nullcontext else "off (float32)"
    lines = [
        f"model      {loop.config.model.variant}: {params / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trained "
        f"(finetune {cfg.finetune}); {start}",
        f"data       {data}; validation {val}",
        f"schedule   {cfg.epochs} epochs x {loop.iters} steps of {cfg.batch_size} pairs = {loop.total} "
        f"steps; lr {cfg.lr:g}, warm-up {cfg.warmup_epochs} epoch(s)",
        f"device     {loop.env.device} x {loop.env.world} process(es); amp {amp}; {cfg.num_workers} data worker(s)",
        f"output     {loop.out} (metrics.csv, tensorboard/, checkpoint/, state.pt)",
    ]
    return "\n".join(lines)
