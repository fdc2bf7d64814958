"""The model options, defined once for every command and the web demo, and what they become.

``--weights``, ``--config``, ``--backbone-weights`` name the files; ``--device``, ``--dtype``,
``--threads``, ``--backend`` say how the model runs. Each has one meaning everywhere: ``--dtype``
is always the compute (autocast) dtype, never a storage type. A command takes the ones it uses
(:func:`add_model_arguments`), turns them into a :class:`ModelOptions`, and gives that to the one
loader, :func:`lorat.checkpoint.loader.load`. The tracking commands add ``--no-cuda-graph`` and
``--no-assignment`` (:func:`add_tracker_arguments`) and get a :class:`lorat.Tracker` from
:func:`lorat.tracking.tracker.tracker_from_arguments`.

Nothing here imports torch: ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorat.errors import LoratError

if TYPE_CHECKING:
    from lorat.config import Config

__all__ = ["BACKENDS", "ModelOptions", "MODEL_OPTIONS", "FILE_OPTIONS", "add_model_arguments", "add_tracker_arguments",
           "parse_xywh"]

# What runs the network: auto (ONNX Runtime for an .onnx weight file, else torch), torch, onnxruntime.
BACKENDS = ("auto", "torch", "onnxruntime")


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load and how it runs (what the command-line options say).

    Attributes:
        weights: a weight file (any format :func:`lorat.load_model` reads, or an ``.onnx`` file) or a
            named model (``LoRAT-B-224``); None: ``$LORAT_WEIGHTS`` or the bundled demo model.
        config: a config (YAML path, bundled name such as ``b224``, or a :class:`~lorat.config.Config`);
            None: the one embedded in the weights.
        backbone_weights: the DINOv2 file official trainable-only checkpoints need.
        phase1_weights: LoRATv2 phase 2: the official phase-1 checkpoint (trainable tensors) that an
            official phase-2 checkpoint builds on.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        dtype: compute (autocast) dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16`` (see
            :func:`lorat.runtime.resolve_dtype`).
        threads: CPU threads for torch and ONNX Runtime; None or ``"auto"``: chosen while tracking from
            measured step times (:mod:`lorat.tracking.threads`); the outputs do not depend on it.
        backend: one of :data:`BACKENDS`.
    """

    weights: str | Path | None = None
    config: str | Path | Config | None = None
    backbone_weights: str | Path | None = None
    device: Any = "auto"
    dtype: Any = "auto"
    threads: int | str | None = None
    backend: str = "auto"
    phase1_weights: str | Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, **changes: Any) -> ModelOptions:
        """The options a parser built with :func:`add_model_arguments` read; ``changes`` override them.

        Raises:
            LoratError: the config is given both as the positional argument and as ``--config``.
        """
        values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        positional = getattr(args, "config_file", None)
        if positional is not None:
            if values.get("config") not in (None, positional):
                raise LoratError(f"two configs given: {positional} and --config {values['config']}; give one")
            values["config"] = positional
        return cls(**(values | changes))


def _threads(text: str) -> int | str:
    """``--threads``: a number, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


# name -> (flag, argparse keywords); the one definition of each option.
_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "weights": ("--weights", {
        "help": "our single file, a merged state dict, an official checkpoint, an .onnx file or a named model "
                "(LoRAT-B-224, ...) (default: $LORAT_WEIGHTS, else the bundled demo model)"}),
    "config": ("--config", {
        "help": "model config: a YAML file or a bundled name (b224, ...); not needed with our single-file weights"}),
    "backbone_weights": ("--backbone-weights", {
        "metavar": "FILE",
        "help": "DINOv2 backbone file (torchvision's MobileNetV2 for a mobilenetv2 stem): what official "
                "trainable-only checkpoints and training start from"}),
    "phase1_weights": ("--phase1-weights", {
        "metavar": "FILE",
        "help": "LoRATv2 phase 2: the official phase-1 checkpoint whose template and reference streams an "
                "official phase-2 checkpoint (trainable tensors only) builds on"}),
    "device": ("--device", {"default": "auto", "help": "auto, cpu, cuda, cuda:N or mps (default auto)"}),
    "dtype": ("--dtype", {
        "default": "auto",
        "help": "compute (autocast) dtype: auto (float16 on CUDA; bfloat16 for DINOv2 variants on a CPU with "
                "native bfloat16; else float32), float32, float16, bfloat16"}),
    "threads": ("--threads", {
        "type": _threads, "metavar": "N|auto",
        "help": "CPU threads (default auto: chosen while tracking from measured step times, so a busy machine "
                "does not slow it down; the boxes are the same on any count)"}),
    "backend": ("--backend", {
        "choices": BACKENDS, "default": "auto",
        "help": "auto (onnxruntime for an .onnx --weights file and for the bundled demo model on a CPU, "
                "else torch), torch or onnxruntime"}),
}
MODEL_OPTIONS = tuple(_OPTIONS)
FILE_OPTIONS = ("weights", "config", "backbone_weights", "phase1_weights")


def add_model_arguments(parser: argparse.ArgumentParser, names: Iterable[str] = MODEL_OPTIONS,
                        config_positional: bool = False, **changes: dict[str, Any]) -> None:
    """Add the model options ``names`` (default: all of :data:`MODEL_OPTIONS`) to ``parser``.

    Args:
        config_positional: also accept the config as an optional positional argument (``CONFIG``).
        changes: per option, argparse keywords that differ for this command (``weights={"nargs": "+"}``,
            ``device={"default": None}``); the flag and its meaning stay the same.
    """
    names = list(names)
    unknown = [n for n in [*names, *changes] if n not in _OPTIONS]
    if unknown:
        raise ValueError(f"unknown model options {unknown}; known: {MODEL_OPTIONS}")
    if config_positional and "config" in names:
        parser.add_argument("config_file", nargs="?", metavar="CONFIG", help=_OPTIONS["config"][1]["help"])
    for name in names:
        flag, keywords = _OPTIONS[name]
        parser.add_argument(flag, **(keywords | changes.get(name, {})))


def add_tracker_arguments(parser: argparse.ArgumentParser) -> None:
    """Every model option, ``--no-cuda-graph``, ``--no-assignment`` and ``--no-kv-cache`` (``lorat.track``,
    ``lorat.vot``)."""
    add_model_arguments(parser)
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="on CUDA: launch every kernel of each step instead of replaying the step as a CUDA graph")
    parser.add_argument("--no-assignment", action="store_true",
                        help="track several targets fully independently (no lap identity assignment)")
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="LoRATv2: encode the template (and reference) again every frame instead of keeping "
                             "their keys and values (the same boxes, slower)")


def parse_xywh(text: str) -> tuple[float, float, float, float] | None:
    """A typed box, ``"x,y,w,h"`` (commas and/or spaces), as four floats (possibly nan or inf: the
    caller says what it accepts); None when the text is not four numbers. The one box syntax of the
    ``--init`` option and of the web demo's box field."""
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        return None
    return values if len(values) == 4 else None  # type: ignore[return-value]
