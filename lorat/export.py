"""``python -m lorat.export``: write our single-file weights from official files.

    python -m lorat.export --config configs/b224.yaml \\
        --backbone-weights weights/dinov2_vitb14_pretrain.pth \\
        --weights LoRAT-B-224/model.safetensors --output weights/lorat_b224.safetensors

The output is one safetensors file with the merged model and its config in the metadata:
``python -m lorat.track video.mp4 --weights weights/lorat_b224.safetensors`` needs nothing else.
Any format :func:`lorat.checkpoint.loader.load_model` reads can be the input.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from lorat.checkpoint.loader import load, save_model
from lorat.errors import run_cli
from lorat.options import FILE_OPTIONS, ModelOptions, add_model_arguments

__all__ = ["main"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorat.export",
                                     description="Export LoRAT weights as one self-describing safetensors file.")
    add_model_arguments(parser, (*FILE_OPTIONS, "threads"), weights={"required": True})
    parser.add_argument("--output", help="output .safetensors path")
    parser.add_argument("--save-dtype", choices=sorted(_DTYPES), default="float32",
                        help="dtype the weights are stored in (float16 / bfloat16 halve the file)")
    parser.add_argument("--onnx", metavar="PATH", help="also (or only) write the network as ONNX for the onnxruntime "
                                                        "backend, checked against PyTorch (pip install 'lorat[onnx]')")
    args = parser.parse_args(argv)
    if not (args.output or args.onnx):
        parser.error("give --output FILE.safetensors and/or --onnx FILE.onnx")

    loaded = load(ModelOptions.from_args(args, device="cpu", dtype="float32", backend="torch"), say=None)
    model, config = loaded.model, loaded.config
    n = sum(p.numel() for p in model.parameters())
    if args.output:
        path = save_model(model, config, args.output, dtype=_DTYPES[args.save_dtype])
        print(f"wrote {path} ({config.model.variant}, {n:,} parameters, {args.save_dtype}, "
              f"{path.stat().st_size / 2**20:.1f} MiB)")
    if args.onnx:
        from lorat.checkpoint.onnx import export_onnx

        worst = export_onnx(model, config, args.onnx)
        print(f"wrote {args.onnx} ({config.model.variant}, dynamic batch; ONNX Runtime vs PyTorch: max |diff| "
              f"{worst:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
