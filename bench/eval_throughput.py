"""Batched evaluation throughput: the same sequences tracked at several batch sizes, in one process.

    python bench/eval_throughput.py configs/b224.yaml --dataset lasot=/data/syn --batch 1 16 --device cuda

Uses the evaluator's runner (:func:`lorat.evaluation.runner.track_sequences`: frames read by a thread pool,
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

from lorat.checkpoint.build import build_lorat
from lorat.config import load_config
from lorat.data.sequences import read_dataset
from lorat.errors import run_cli
from lorat.evaluation.runner import track_sequences
from lorat.options import ModelOptions, add_model_arguments
from lorat.runtime import cast_for_autocast, dtype_name, resolve_device, resolve_dtype, set_threads


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, ("config", "device", "dtype", "threads"), config_positional=True)
    parser.add_argument("--dataset", required=True, help="NAME=PATH, e.g. lasot=/data/syn")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes to time")
    args = parser.parse_args(argv)
    options = ModelOptions.from_args(args)
    if options.config is None:
        parser.error("give a CONFIG (a random model of it is timed)")
    set_threads(options.threads)
    device = resolve_device(options.device)
    config = load_config(options.config)
    dtype = resolve_dtype(options.dtype, device, config.model.backbone.embed_dim)
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
