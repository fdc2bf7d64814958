"""Interpolate two single-file models of the same network: ``(1 - alpha) * A + alpha * B``.

    python bench/average_weights.py runs/demo-stage3/.../lorat.safetensors \\
        runs/demo-stage4b/checkpoint/epoch_016/lorat.safetensors --alpha 0.5 --out runs/wise-0.5.safetensors

Weight-space interpolation between a model and its fine-tuned descendant (Wortsman et al., "Robust
fine-tuning of zero-shot models", CVPR 2022) keeps much of what fine-tuning added while losing less of
what the start knew. Both files must hold the same configuration (the variant name aside); the result
carries A's configuration. Integer tensors (BatchNorm counters) are taken from A. Refuses to overwrite
an existing file.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from lorat.checkpoint.loader import load_model, save_model
from lorat.errors import LoratError, run_cli


def interpolate(a: torch.nn.Module, b: torch.nn.Module, alpha: float) -> None:
    """Set ``a``'s floating-point weights to ``(1 - alpha) * a + alpha * b``, in place."""
    sb = b.state_dict()
    with torch.no_grad():
        for key, value in a.state_dict().items():
            if value.is_floating_point():
                value.lerp_(sb[key].to(value.dtype), alpha)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="the start model (alpha 0)")
    p.add_argument("b", type=Path, help="the fine-tuned model (alpha 1)")
    p.add_argument("--alpha", type=float, required=True, help="weight of B, in [0, 1]")
    p.add_argument("--out", type=Path, required=True, help="the file to write (must not exist)")
    args = p.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        raise LoratError(f"--alpha {args.alpha}: give a value in [0, 1]")
    if args.out.exists():
        raise LoratError(f"{args.out} exists; give a new file name")
    a, config = load_model(args.a)
    b, config_b = load_model(args.b)
    if not config.model.same_network(config_b.model):
        raise LoratError(f"{args.a} and {args.b} hold different networks ({config.model.variant} and "
                         f"{config_b.model.variant})")
    interpolate(a, b, args.alpha)
    save_model(a, config, args.out)
    print(f"wrote {args.out} ({1 - args.alpha:g} x {args.a} + {args.alpha:g} x {args.b})")
    return 0

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
