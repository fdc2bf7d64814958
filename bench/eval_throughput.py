"""Batched evaluation throughput: the same sequences tracked at several batch sizes, in one process.

    python bench/eval_throughput.py configs/b224.yaml --dataset lasot=/data/syn --batch 1 16 --device cuda

Uses the evaluator's runner (:func:`lorat.runner.track_sequences`: frames read by a thread pool,
one forward pass per step for ``batch`` sequences) on a randomly initialised model; speed does not
depend on the weights. Model load and a short warm-up are not timed. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lorat.build import build_lorat
from lorat.config import load_config
from lorat.data.sequences import read_dataset
from lorat.errors import run_cli
from lorat.runner import track_sequences
from lorat.runtime import dtype_name, resolve_device, resolve_dtype
from lorat.tracker import cast_for_autocast


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="model config YAML")
    parser.add_argument("--dataset", required=True, help="NAME=PATH, e.g. lasot=/data/syn")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes to time")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    config = load_config(args.config)
    dtype = resolve_dtype(args.dtype, device, config.model.backbone.embed_dim)
    torch.manual_seed(0)
    model = cast_for_autocast(build_lorat(config.model, lora=False).eval().to(device), dtype)
    name, root = args.dataset.split("=", 1)
    sequences = read_dataset(name, root, for_training=False)
    frames = sum(len(s) for s in sequences)
    rows = [f"| batch | frames | seconds | frames/s | speed-up vs batch {args.batch[0]} |", "|---|---|---|---|---|"]
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        track_sequences(model, config, sequences[:2], Path(tmp) / "warmup", 0.0, 2, dtype, progress=False)
        for batch in args.batch:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            track_sequences(model, config, sequences, Path(tmp) / f"batch{batch}", 0.0, batch, dtype, progress=False)
            seconds = time.perf_counter() - start
            rate = frames / seconds
            first = first or rate
            rows.append(f"| {batch} | {frames} | {seconds:.1f} | {rate:.1f} | {rate / first:.1f}x |")
    print(f"{config.model.variant}, {dtype_name(dtype)}, {device}, {len(sequences)} sequences\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
