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
own generators (never from the global RNG that drop-path uses); ``state.pt`` is written every
``train.save_state_every_minutes`` (10; 0: at epoch ends only) and at every epoch end, where the
checkpoint is written before it and validation after it, and ``--resume`` writes whichever of the
two the state's epoch still lacks; rows that ``metrics.csv`` / ``val.csv`` got after the last saved
state are dropped, and so are the temporary files of killed writers. ``--resume DIR --set KEY=VALUE``
may change the schedule (``train.epochs``, workers, ...), not the model (``model.*``,
``train.finetune``, ``train.freeze_stem``) nor what a step is (``train.batch_size``,
``train.samples_per_epoch``); the change is kept in ``config.yaml``. Nor may it change the data
unless ``--allow-other-data`` is given: ``data.json`` holds the data's fingerprint (per dataset:
split, sequence and frame counts, a hash of the sequences' names and lengths; not the paths, so the
same data may move). One training at a time per folder: a second one is refused (``.lock``).

Outputs in ``--output``: ``config.yaml``, ``args.json`` (data paths, for ``--resume``), ``data.json``;
``metrics.csv`` (per step: loss, cls, reg, lr, samples/s) and ``val.csv`` (per epoch), the same
numbers as TensorBoard events in ``tensorboard/`` (``tensorboard --logdir DIR/tensorboard``);
``checkpoint/epoch_NNN/model.safetensors`` (the official trainable-only format) and
``lorat.safetensors`` (our single file), the last five kept, byte-identical for identical runs;
``state.pt`` (resumable: weights, AdamW, GradScaler, step, RNG).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from lorat.config import load_config
from lorat.data.sequences import DATASETS
from lorat.errors import LoratError, run_cli
from lorat.options import add_model_arguments
from lorat.runtime import Distributed

if TYPE_CHECKING:
    from lorat.config import Config
    from lorat.training.trainer import TrainingRun

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
    add_model_arguments(p, ("backbone_weights", "phase1_weights", "device"),
                        device={"help": "auto, cpu, cuda or cuda:N (torchrun: the local GPU)"},
                        phase1_weights={"help": "LoRATv2 phase 2: the phase-1 model it starts from (our file, or the "
                                                "official phase-1 checkpoint with --backbone-weights)"})
    p.add_argument("--init-weights", type=Path, metavar="FILE",
                   help="start from this single-file model (same architecture; train.finetune full): fine-tuning")
    p.add_argument("--output", type=Path, help="output folder")
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR (on another machine, give --data / --val-data / --backbone-weights "
                        "again where the files live there)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (with --resume: schedule keys only, e.g. train.epochs)")
    p.add_argument("--stop-after", type=int, metavar="STEPS", help="stop (resumably) after this many steps in total")
    p.add_argument("--log-every", type=int, metavar="STEPS",
                   help="steps between metrics.csv rows (default 10; a resumed run keeps its own)")
    p.add_argument("--allow-other-data", action="store_true",
                   help="with --resume: go on with data other than the run's (recorded in data.json; the run is "
                        "then no longer reproducible)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    # torch and the rest load only now: --help stays instant
    from lorat.training.trainer import run_training

    out = args.resume or args.output
    if out is None:
        raise LoratError("give --output DIR (or --resume DIR)")
    if args.resume is not None and not out.is_dir():
        raise LoratError(f"nothing to resume: {out} not found")
    with ExitStack() as folder:
        refusal = _hold(folder, out)
        run = None if refusal else _resumed_run(args, out) if _resuming(args, out) else _new_run(args, out)
        with Distributed(args.device, types=("cpu", "cuda")) as env:
            if not env.agree(refusal is None):  # rank 0 could not lock the folder: every rank stops
                raise LoratError(refusal or f"{out} is in use by another training (rank 0 could not lock it)")
            if run.backbone_weights is None and run.init_weights is None and run.state is None:
                run = dataclasses.replace(run, backbone_weights=_pretrained_backbone(run.config, env))
            return run_training(run, env)


def _hold(folder: ExitStack, out: Path) -> str | None:
    """Lock the run folder for this training until ``folder`` closes, before anything reads or
    writes it (rank 0 only: it alone writes there); None, or why another training holds it.

    Raises:
        LoratError: the folder is held and this is a job of one process (under torchrun, rank 0
            first tells the other processes, which wait for it in the process group).
    """
    from lorat.training.run_folder import try_hold_run_folder

    if int(os.environ.get("RANK", "0")) != 0:
        return None
    refusal = try_hold_run_folder(folder, out)
    if refusal is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise LoratError(refusal)
    return refusal


def _resuming(args: argparse.Namespace, out: Path) -> bool:
    """--resume, or a worker that torchrun restarted (``--max-restarts``) after the run saved a state."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    return args.resume is not None or (restarted and (out / "state.pt").is_file())


def _new_run(args: argparse.Namespace, out: Path) -> TrainingRun:
    """A fresh run in ``out`` from CONFIG and the options; never over an existing run."""
    if args.config is None:
        raise LoratError("give a CONFIG to start a run")
    if (out / "state.pt").is_file():
        raise LoratError(f"{out} already holds a run ({out / 'state.pt'}); use --resume {out} or another --output")
    config = load_config(args.config, args.set)
    _check_phase(config, args)
    init = str(args.init_weights) if args.init_weights else None
    phase1 = str(args.phase1_weights) if args.phase1_weights else None
    return _training_run(args, out, config, {"init_weights": init, "phase1_weights": phase1}, state=None)


def _check_phase(config: Config, args: argparse.Namespace) -> None:
    """LoRATv2 phase 2 starts from a phase-1 model (--phase1-weights), or fine-tunes a phase-2 model of its
    own (--init-weights, train.finetune full); --phase1-weights means nothing to any other config."""
    model = config.model
    if args.phase1_weights and not model.phase_two:
        raise LoratError(f"--phase1-weights is for LoRATv2 phase 2 (a config with model.reference_size); "
                         f"{model.variant} is not")
    if args.phase1_weights and args.init_weights:
        raise LoratError("give --phase1-weights (start phase 2 from phase 1) or --init-weights (fine-tune a phase-2 "
                         "model), not both")
    if args.phase1_weights and not Path(args.phase1_weights).is_file():  # before any model is built
        raise LoratError(f"--phase1-weights {args.phase1_weights}: file not found")
    if model.phase_two and not (args.phase1_weights or args.init_weights):
        raise LoratError(f"{model.variant} is LoRATv2 phase 2: it starts from the phase-1 model; give "
                         f"--phase1-weights FILE (train one with a phase-1 config, e.g. configs/v2-p1-b224.yaml)")


def _resumed_run(args: argparse.Namespace, out: Path) -> TrainingRun:
    """The run saved in ``out``: ``state.pt``, ``config.yaml`` (schedule overrides allowed) and ``args.json``."""
    from lorat.training.run_folder import check_resume_config, read_args, read_state

    state_path = out / "state.pt"
    if not state_path.is_file():
        raise _nothing_to_resume(args, out)
    state = read_state(state_path)
    saved = read_args(out / "args.json")
    config = load_config(out / "config.yaml", args.set)  # schedule overrides allowed (more epochs, workers)
    check_resume_config(config, state, state_path)
    return _training_run(args, out, config, saved, state)


def _nothing_to_resume(args: argparse.Namespace, out: Path) -> LoratError:
    """The error for a run folder without ``state.pt``: for a run killed before it saved one (its
    ``config.yaml`` and ``args.json`` are there, maybe a checkpoint), the command that starts it again."""
    from lorat.training.run_folder import read_args, restart_command

    if not ((out / "config.yaml").is_file() and (out / "args.json").is_file()):
        return LoratError(f"nothing to resume: {out / 'state.pt'} not found")
    saved = read_args(out / "args.json")
    given = {"data": args.data, "val_data": args.val_data, "backbone_weights": args.backbone_weights,
             "log_every": args.log_every}
    arguments = {**saved, **{key: value for key, value in given.items() if value}}
    checkpoints = sorted(p.parent.name for p in (out / "checkpoint").glob("epoch_*/lorat.safetensors"))
    kept = (f"; checkpoint/{checkpoints[-1]} holds its weights but not the optimiser state a resume needs"
            if checkpoints else "")
    return LoratError(f"nothing to resume: the run in {out} stopped before it saved its first state.pt{kept}; "
                      f"start it again from step 0 (the same run) with: {restart_command(out, arguments)}")


def _training_run(args: argparse.Namespace, out: Path, config: Config, saved: dict, state: dict | None) -> TrainingRun:
    """The run's :class:`~lorat.training.trainer.TrainingRun`: the options given now, else the ``saved``
    ones (``args.json``; the init weights always come from there), checked, the datasets parsed.

    On another machine the same datasets and backbone file may live elsewhere: --data, --val-data
    and --backbone-weights given again with --resume replace the saved paths (args.json keeps the new ones).
    """
    from lorat.data.loading import parse_data
    from lorat.training.trainer import TrainingRun

    data = args.data or saved.get("data", [])
    log_every = args.log_every or saved.get("log_every", 10)
    if not data:
        raise LoratError("give at least one --data NAME=PATH")
    if log_every < 1:
        raise LoratError(f"--log-every must be at least 1, got {log_every}")
    return TrainingRun(config=config, data=tuple(parse_data(data, "--data")), out=out,
                       val_data=tuple(parse_data(args.val_data or saved.get("val_data", []), "--val-data")),
                       backbone_weights=args.backbone_weights or saved.get("backbone_weights"),
                       init_weights=saved.get("init_weights"), phase1_weights=saved.get("phase1_weights"),
                       log_every=log_every, stop_after=args.stop_after,
                       state=state, allow_other_data=args.allow_other_data)


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
