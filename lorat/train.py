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
``metrics.csv`` (per step: loss, cls, reg, lr, samples/s) and ``val.csv`` (per epoch), the same
numbers as TensorBoard events in ``tensorboard/`` (``tensorboard --logdir DIR/tensorboard``);
``checkpoint/epoch_NNN/model.safetensors`` (the official trainable-only format) and
``lorat.safetensors`` (our single file), the last five kept, byte-identical for identical runs;
``state.pt`` (resumable: weights, AdamW, GradScaler, step, RNG).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from lorat.config import load_config
from lorat.data.sequences import DATASETS
from lorat.errors import LoratError, run_cli
from lorat.runtime import Distributed

__all__ = ["main"]


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
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR (on another machine, give --data / --val-data / --backbone-weights "
                        "again where the files live there)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (with --resume: schedule keys only, e.g. train.epochs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: the local GPU)")
    p.add_argument("--stop-after", type=int, metavar="STEPS", help="stop (resumably) after this many steps in total")
    p.add_argument("--log-every", type=int, metavar="STEPS",
                   help="steps between metrics.csv rows (default 10; a resumed run keeps its own)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    # torch and the rest load only now: --help stays instant
    from lorat.data.loading import parse_data
    from lorat.training.run_folder import check_resume_config, read_args, read_state
    from lorat.training.trainer import run_training

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
        state = read_state(state_path)
        saved_args = read_args(out / "args.json")
        config = load_config(out / "config.yaml", args.set)  # schedule overrides allowed (more epochs, workers)
        check_resume_config(config, state, state_path)
        # another machine: the same datasets and backbone file may live elsewhere (--data, --val-data,
        # --backbone-weights given again replace the saved paths, and args.json keeps the new ones)
        data = args.data or saved_args["data"]
        val_data = args.val_data or saved_args.get("val_data", [])
        backbone = args.backbone_weights or saved_args.get("backbone_weights")
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
    saved_args = {"data": data, "val_data": val_data, "backbone_weights": backbone, "log_every": log_every,
                  "init_weights": init}
    with Distributed(args.device, types=("cpu", "cuda")) as env:
        if backbone is None and init is None and state is None:
            backbone = _pretrained_backbone(config, env)
            saved_args["backbone_weights"] = backbone
        return run_training(config, parse_data(data, "--data"), parse_data(val_data, "--val-data"), backbone, out,
                            env, state, args, saved_args)


def _pretrained_backbone(config, env) -> str | None:
    """The DINOv2 file a LoRA run starts from when --backbone-weights is not given: torch hub's cache
    or Meta's URL (rank 0 downloads, the others wait); None for models without a DINOv2 release."""
    from lorat.checkpoint.hub import dinov2_path, dinov2_release, dinov2_weights

    name = dinov2_release(config.model)
    if name is None:
        return None
    if env.main:
        path = dinov2_weights(config.model)
        print(f"backbone: {path} (DINOv2 {name}; --backbone-weights FILE to use another)")
    env.barrier()
    return str(dinov2_path(name))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
