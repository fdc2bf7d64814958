"""``python -m lorat.export``: write our single-file weights from official files.

    python -m lorat.export --config configs/b224.yaml \\
        --backbone-weights weights/dinov2_vitb14_pretrain.pth \\
        --weights LoRAT-B-224/model.safetensors --output weights/lorat_b224.safetensors

The output is one safetensors file with the merged model and its config in the metadata:
``python -m lorat.track video.mp4 --weights weights/lorat_b224.safetensors`` needs nothing else.
Any format :func:`lorat.checkpoint.load_model` reads can be the input.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from lorat.checkpoint import load_model, save_model
from lorat.config import load_config
from lorat.errors import run_cli

__all__ = ["main"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorat.export",
                                     description="Export LoRAT weights as one self-describing safetensors file.")
    parser.add_argument("--config", help="model config YAML (not needed if --weights is our single file)")
    parser.add_argument("--weights", required=True, help="official checkpoint, merged state dict or single file")
    parser.add_argument("--backbone-weights", help="DINOv2 file (needed for official trainable-only checkpoints)")
    parser.add_argument("--output", required=True, help="output .safetensors path")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="stored dtype")
    args = parser.parse_args(argv)

    config = load_config(args.config) if args.config else None
    model, config = load_model(args.weights, config, args.backbone_weights)
    path = save_model(model, config, args.output, dtype=_DTYPES[args.dtype])
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({config.model.variant}, {n:,} parameters, {args.dtype}, "
          f"{path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
