"""The model options that every tracking command shares (``lorat.track``, ``lorat.vot``), and the one
way they become a :class:`lorat.Tracker`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from lorat.runtime import BACKENDS, default_weights, default_weights_notice, set_threads

if TYPE_CHECKING:  # torch loads with the tracker, after the arguments are parsed
    from lorat.tracker import Tracker

__all__ = ["add_tracker_arguments", "tracker_from_arguments"]


def add_tracker_arguments(p: argparse.ArgumentParser) -> None:
    """``--weights``, ``--config``, ``--backbone-weights``, ``--device``, ``--threads``, ``--dtype``,
    ``--no-cuda-graph``, ``--backend`` and ``--no-assignment``."""
    p.add_argument("--config", help="model config YAML (not needed with our single-file weights)")
    p.add_argument("--weights", help="our single file, a merged state dict, an official checkpoint or a named model "
                                     "(LoRAT-B-224, ...) (default: the bundled demo model)")
    p.add_argument("--backbone-weights", help="DINOv2 file, for official trainable-only checkpoints")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: torch's choice; on a busy machine "
                                                             "fewer can be faster)")
    p.add_argument("--dtype", default="auto", help="auto (float16 on CUDA; bfloat16 for DINOv2 variants on a CPU "
                   "with native bfloat16; else float32), float32, float16, bfloat16")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA: launch every kernel of each step instead of replaying the step as a CUDA graph")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (onnxruntime for an .onnx --weights file, else torch), torch or onnxruntime")
    p.add_argument("--no-assignment", action="store_true",
                   help="track several targets fully independently (no lap identity assignment)")


def tracker_from_arguments(args: argparse.Namespace, say: Callable[[str], object] = print) -> Tracker:
    """Load the tracker the options of :func:`add_tracker_arguments` describe; ``say`` reports which
    weights were chosen when none were given."""
    set_threads(args.threads)
    weights = args.weights or default_weights()
    if not args.weights:
        say(default_weights_notice(weights))
    from lorat.tracker import Tracker

    return Tracker.from_pretrained(weights, args.config, args.backbone_weights, device=args.device, dtype=args.dtype,
                                   backend=args.backend, assignment=not args.no_assignment,
                                   cuda_graph=not args.no_cuda_graph)
