"""``python -m lorat.train CONFIG --data lasot=PATH --output DIR``: the official LoRAT recipe.

    python -m lorat.train configs/b224.yaml --backbone-weights weights/dinov2_vitb14_pretrain.pth \\
        --data lasot=/data/LaSOT --data got10k=/data/GOT-10k --data coco=/data/COCO --output runs/b224
    torchrun --nproc_per_node 8 -m lorat.train ...            # same command, DDP (NCCL / Gloo)
    python -m lorat.train ... --resume runs/b224              # continue exactly where it stopped

One process or many (``torchrun``, any number of nodes): the batch size in the config is global
and every sample is a pure function of (seed, epoch, index), so results do not depend on the
number of processes or data workers, and a resumed run continues bit for bit. Ctrl-C or SIGTERM
finishes the current step and writes the resumable state first; under ``torchrun
--max-restarts`` a restarted worker picks the state up from ``--output`` by itself.

Outputs in ``--output``: ``config.yaml``; ``metrics.csv`` (per step: loss, cls, reg, lr,
samples/s) and ``val.csv`` (per epoch); ``checkpoint/epoch_NNN/model.safetensors`` (the official
trainable-only format) and ``lorat.safetensors`` (our single file), the last five kept;
``state.pt`` (resumable: weights, AdamW, GradScaler, step, RNG).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from lorat.checkpoint import build_training_model, peft_to_official_keys, save_model
from lorat.config import Config, TrainConfig, config_to_dict, load_config
from lorat.data.pairs import PairDataset, Source
from lorat.data.sequences import DATASETS, read_dataset
from lorat.errors import LoratError, run_cli
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


class _Dist:
    """torchrun environment: rank, world size, device, backend (NCCL on CUDA, Gloo on CPU)."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        if device_arg.startswith("cuda"):
            if not torch.cuda.is_available():
                raise LoratError("--device cuda requested but CUDA is not available")
            index = local if self.world > 1 else (torch.device(device_arg).index or 0)
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device(device_arg)
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


def _loader(dataset, indices: list[int], batch: int, workers: int) -> DataLoader:
    return DataLoader(Subset(dataset, indices), batch_size=batch, shuffle=False, num_workers=workers,
                      collate_fn=_collate, drop_last=False, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_quiet_worker if workers else None,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


# ----------------------------------------------------------------------------- checkpoints


def _unwrap(model: torch.nn.Module) -> LoRAT:
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def _save_state(path: Path, model: LoRAT, optimizer, scaler, step: int, config: Config, full: bool) -> None:
    weights = model.state_dict() if full else {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = {
        "step": step,
        "config": json.dumps(config_to_dict(config)),
        "weights": {k: v.detach().cpu() for k, v in weights.items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous state intact


def _save_checkpoint(out: Path, epoch: int, model: LoRAT, config: Config) -> Path:
    folder = out / "checkpoint" / f"epoch_{epoch:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    if config.train.finetune == "lora":
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(peft_to_official_keys(trainable, config.model.backbone.ffn == "swiglu"),
                  str(folder / "model.safetensors"))
    save_model(model, config, folder / "lorat.safetensors")
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
    p.add_argument("--output", type=Path, help="output folder")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (torchrun: the local GPU)")
    p.add_argument("--stop-after", type=int, metavar="STEPS", help="stop (resumably) after this many steps in total")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics.csv rows")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    out = args.resume or args.output
    if out is None:
        raise LoratError("give --output DIR (or --resume DIR)")
    state_path = out / "state.pt"
    resume = args.resume is not None or (restarted and state_path.is_file())
    if resume:
        if not state_path.is_file():
            raise LoratError(f"nothing to resume: {state_path} not found")
        saved_args = json.loads((out / "args.json").read_text())
        config = load_config(out / "config.yaml", args.set)  # overrides allowed (e.g. more epochs, workers)
        data, val_data = saved_args["data"], saved_args["val_data"]
        backbone = saved_args["backbone_weights"]
    else:
        if args.config is None:
            raise LoratError("give a CONFIG to start a run")
        if state_path.is_file():
            raise LoratError(f"{out} already holds a run ({state_path}); use --resume {out} or another --output")
        config = load_config(args.config, args.set)
        data, val_data, backbone = args.data, args.val_data, args.backbone_weights
    if not data:
        raise LoratError("give at least one --data NAME=PATH")
    dist_env = _Dist(args.device)
    try:
        return _train(config, _parse_data(data, "--data"), _parse_data(val_data, "--val-data"), backbone, out,
                      dist_env, resume, args, {"data": data, "val_data": val_data, "backbone_weights": backbone})
    finally:
        dist_env.close()


def _train(config: Config, data, val_data, backbone, out: Path, env: _Dist, resume: bool, args,
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
    model.to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.warmup_lr,
                                  betas=(0.9, 0.999), eps=1e-8)
    amp = {"auto": torch.float16 if device.type == "cuda" else None, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "none": None}[cfg.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16 and device.type == "cuda")
    step = 0
    if resume:
        state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
        missing = set(state["weights"]) - set(model.state_dict())
        if missing:
            raise LoratError(f"{out / 'state.pt'} does not fit the model: {sorted(missing)[:3]}")
        model.load_state_dict(state["weights"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step = int(state["step"])
    elif env.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        (out / "args.json").write_text(json.dumps(saved_args, indent=2))
    env.barrier()

    net: torch.nn.Module = model
    if cfg.compile:
        net = torch.compile(net)
    if env.world > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      static_graph=True, bucket_cap_mb=100)
    stop = _StopFlag()
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    metrics = open(out / "metrics.csv", "a", newline="") if env.main else None  # noqa: SIM115
    writer = csv.writer(metrics) if metrics else None
    if writer and metrics.tell() == 0:
        writer.writerow(["step", "epoch", "lr", "loss", "cls", "reg", "samples_per_s", "skipped_images"])
    skipped_total = 0
    try:
        while step < total_steps:
            epoch, position = divmod(step, iters)
            train_set.set_epoch(epoch)
            indices = [b * cfg.batch_size + env.rank * local_batch + i
                       for b in range(position, iters) for i in range(local_batch)]
            loader = _loader(train_set, indices, local_batch, cfg.num_workers)
            net.train()
            bar = tqdm(total=iters, initial=position, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
                       disable=not env.main, dynamic_ncols=True)
            tick = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # unreadable images are counted instead
                for batch in loader:
                    lr = lr_for_step(step, cfg, iters)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    num_pos = env.mean(batch["positive"].sum().float())
                    with autocast():
                        outputs = net(batch["z"], batch["x"], batch["z_feat_mask"])
                        losses = lorat_loss(outputs, batch["target_box"], batch["positive"], num_pos)
                    scaler.scale(losses["loss"]).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
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
            bar.close()
            stopping = stop.signal is not None or bool(args.stop_after and step >= args.stop_after)
            if step == (epoch + 1) * iters:  # the epoch is complete, even if we stop right here
                if val_set is not None and stop.signal is None:  # a signal asks to be quick
                    _validate(net, val_set, env, local_batch, cfg.num_workers, autocast, out, epoch)
                if env.main:
                    _save_state(out / "state.pt", model, optimizer, scaler, step, config, backbone is None)
                    if (epoch + 1) % cfg.checkpoint_every == 0 or step >= total_steps:
                        folder = _save_checkpoint(out, epoch + 1, model, config)
                        tqdm.write(f"checkpoint: {folder}")
                env.barrier()
            if stopping:
                break
        if env.main:
            if step % iters:  # stopped mid-epoch (an epoch end has just been saved above)
                _save_state(out / "state.pt", model, optimizer, scaler, step, config, backbone is None)
            if skipped_total:
                print(f"warning: {skipped_total} unreadable images were skipped")
    finally:
        stop.restore()
        if metrics:
            metrics.close()
    env.barrier()
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
    with torch.no_grad():
        for batch in _loader(val_set, per_rank, local_batch, workers):
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
