"""``python -m lorat.bench CONFIG``: speed and memory of the model and of the whole tracking loop.

Prints one JSON object:

* ``model_fps``: forward pass only, batch 1, like the paper (10 warm-up + N timed iterations,
  autocast dtype as chosen);
* ``tracking_fps``: end to end on a synthetic 640x480 clip decoded from an mp4 file: decode,
  crop, model, post-process, box copied to the host, every frame;
* ``split_ms``: mean time per frame of decode / crop / model / post-process (measured in a second
  pass with a device synchronisation between stages);
* ``peak_memory_mb``: GPU (``max_memory_allocated``) and process RSS.

Weights do not change the speed, so without ``--weights`` a randomly initialised model is used.

Training (:mod:`lorat.training.speed`): ``--train --batch N`` times full training steps (forward,
loss, backward, clipping, AdamW) at the config's training settings as resolved on the device and
prints, as its last line, a JSON object with ``samples_per_s``, ``step_ms``, ``peak_mb``, ``dtype``;
``--train --table`` runs every precision (float32, bfloat16, float16 with the grad scaler) with
``torch.compile`` and activation checkpointing on and off, each in its own process. ``--data
NAME=PATH --workers 1 2`` times the training data pipeline (pairs per second).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from lorat.checkpoint.build import build_lorat
from lorat.checkpoint.loader import load
from lorat.config import load_config
from lorat.errors import run_cli
from lorat.model import build_network
from lorat.options import ModelOptions, add_model_arguments
from lorat.runtime import (
    cast_for_autocast,
    cpu_has_bf16,
    cpu_has_fp16,
    dtype_name,
    peak_rss_mb,
    resolve_device,
    resolve_dtype,
    set_threads,
    synchronize,
)
from lorat.tracking.cuda_graph import capture
from lorat.tracking.step import run_model, search_crops, to_frame_tensor
from lorat.tracking.tracker import Tracker
from lorat.video import prefetched

__all__ = ["main"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _synthetic_clip(path: Path, frames: int, size: tuple[int, int] = (640, 480)) -> tuple[float, ...]:
    """Write a clip of a textured square drifting over a textured background; return its first box."""
    rng = np.random.default_rng(0)
    w, h = size
    background = cv2.resize(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8), size,
                            interpolation=cv2.INTER_NEAREST)
    patch = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, size)
    for i in range(frames):
        x = int(200 + 120 * np.sin(i / 25))
        y = int(200 + 80 * np.cos(i / 31))
        frame = background.copy()
        frame[y:y + 60, x:x + 80] = patch
        writer.write(frame)
    writer.release()
    return 200.0, 280.0, 80.0, 60.0


def _decoded(path: Path):
    capture = cv2.VideoCapture(str(path))
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def benchmark(tracker: Tracker, frames: int, iters: int, warmup: int = 10) -> dict:
    """Run the three measurements on an initialised-from-scratch tracker."""
    device, dtype, cfg = tracker.device, tracker.dtype, tracker.config
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        box = _synthetic_clip(clip, frames)

        # 1. model only, batch 1 (on CUDA one graph replay per forward pass, unless --no-cuda-graph).
        first = next(_decoded(clip))
        tracker.init(first, box)
        x, _, _ = search_crops(tracker.state, [to_frame_tensor(first, device)], cfg.model, cfg.tracking)

        def forward() -> None:
            run_model(tracker.model, tracker.state, x, dtype)

        constants: dict = {}
        if _graphed(tracker):
            forward = capture(forward, constants)[0].replay
        for _ in range(warmup):
            forward()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            forward()
        synchronize(device)
        model_s = (time.perf_counter() - start) / iters

        # 2. end to end, as a user runs it (frames decoded ahead in a thread, as lorat.track does).
        start = time.perf_counter()
        n = sum(1 for _ in tracker.stream(prefetched(_decoded(clip)), box))
        end_to_end_s = (time.perf_counter() - start) / n

        # 3. the same loop, stage by stage (the step's timer hook synchronises the device per stage).
        split = dict.fromkeys(("decode", "crop", "model", "postprocess"), 0.0)
        clock = [0.0]

        def lap(stage: str) -> None:
            synchronize(device)
            now = time.perf_counter()
            split[stage] += now - clock[0]
            clock[0] = now

        def timed_frames():
            decoded = _decoded(clip)
            yield next(decoded)  # frame 0 initialises: not timed
            clock[0] = time.perf_counter()
            for frame in decoded:
                lap("decode")
                yield frame

        steps = sum(1 for _ in tracker.stream(timed_frames(), box, timer=lap)) - 1
    memory = {"process_rss": peak_rss_mb()}
    if device.type == "cuda":
        memory["gpu_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return {
        "model_fps": round(1 / model_s, 1),
        "model_ms": round(model_s * 1e3, 2),
        "tracking_fps": round(1 / end_to_end_s, 1),
        "tracking_ms": round(end_to_end_s * 1e3, 2),
        "split_ms": {k: round(v / max(steps, 1) * 1e3, 2) for k, v in split.items()},
        "frames": n,
        "peak_memory_mb": memory,
    }


def _graphed(tracker: Tracker) -> bool:
    return bool(getattr(tracker, "cuda_graph", False)) and tracker.device.type == "cuda"


def probe_inputs(config, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded (template, search, template mask) network inputs on the CPU: the same in every process."""
    generator = torch.Generator().manual_seed(1)
    m = config.model
    return (torch.randn(batch, 3, m.template_size[1], m.template_size[0], generator=generator),
            torch.randn(batch, 3, m.search_size[1], m.search_size[0], generator=generator),
            torch.randint(0, 2, (batch, *m.template_grid), generator=generator))


def max_difference(out: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Max |difference| of the score maps and boxes of two network outputs (any device, any dtype)."""
    return max(float((out[k].float().cpu() - reference[k].float().cpu()).abs().max()) for k in ("score_map", "boxes"))


def _probe(tracker: Tracker) -> dict[str, torch.Tensor]:
    """The tracker's network on :func:`probe_inputs` (LoRATv2: its full pass, with a seeded reference
    crop in phase 2)."""
    z, x, mask = (t.to(tracker.device) for t in probe_inputs(tracker.config))
    m = tracker.config.model
    if m.reference_size is not None:
        generator = torch.Generator().manual_seed(2)
        shape = (len(z), 3, m.reference_size[1], m.reference_size[0])
        x = [torch.randn(shape, generator=generator).to(tracker.device), x]
    return tracker.model(z, x, mask)


def reference_outputs(tracker: Tracker) -> dict[str, torch.Tensor]:
    """The tracker's network on :func:`probe_inputs`, as it is now, without autocast (float32)."""
    with torch.inference_mode():
        return _probe(tracker)


def output_delta(tracker: Tracker, reference: dict[str, torch.Tensor]) -> float:
    """Max |difference| of score map and boxes between the tracker's network as it runs (dtype,
    compiled, graph) and ``reference`` (:func:`reference_outputs` of the float32 network)."""

    def run() -> dict[str, torch.Tensor]:
        cast = torch.autocast(tracker.device.type, dtype=tracker.dtype) if tracker.dtype else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            return _probe(tracker)

    if _graphed(tracker):
        constants: dict = {}
        graph, out = capture(run, constants)
        graph.replay()
    else:
        out = run()
    return max_difference(out, reference)


def _without(argv: list[str], valued: tuple[str, ...], flags: tuple[str, ...]) -> list[str]:
    """``argv`` less the given options (``--opt VALUE``, ``--opt=VALUE`` or a bare flag)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in valued:
            skip = True
        elif arg not in flags and not arg.startswith(tuple(f"{v}=" for v in valued)):
            out.append(arg)
    return out


def _export_for_table(options: ModelOptions, path: Path) -> float:
    """Export the benchmarked network (the weights, or the seeded random model every variant builds)
    to ONNX at ``path``; return the ONNX Runtime outputs' max |difference| from torch float32."""
    from lorat.checkpoint.onnx import OnnxModel, export_onnx

    if options.weights:
        loaded = load(dataclasses.replace(options, device="cpu", dtype="float32"), say=None)
        model, config = loaded.model, loaded.config
    else:
        config = load_config(options.config)
        model = _random_model(config, torch.device("cpu"))
    export_onnx(model, config, path)
    inputs = probe_inputs(config)
    with torch.inference_mode():
        reference = model(*inputs)
    return max_difference(OnnxModel(path, config)(*inputs), reference)


def _random_model(config, device: torch.device) -> torch.nn.Module:
    """The seeded random model (built on ``device``: fast for large variants on a GPU)."""
    torch.manual_seed(0)
    with device:
        if config.model.family == "loratv2":
            return build_network(config.model).eval()
        return build_lorat(config.model, lora=False).eval()


def _table(options: ModelOptions, argv: list[str]) -> str:
    """Run every variant this machine supports in a process of its own (clean peak memory); compare
    each one's outputs with torch float32 on the same seeded inputs, here."""
    device = resolve_device(options.device)
    # (backend, dtype, options): each run reports its own output difference, except ONNX (below)
    variants = [("torch", "float32", [])]
    if device.type == "cuda":
        eager = ["--no-cuda-graph"]
        variants = [("torch", "float32", eager), ("torch", "float16", eager), ("torch", "bfloat16", eager),
                    ("torch compiled", "float16", ["--compile"]), ("torch CUDA graph", "float16", []),
                    ("torch CUDA graph", "float32", [])]
    else:
        if cpu_has_bf16():
            variants.append(("torch", "bfloat16", []))
        variants.append(("torch compiled", "float32", ["--compile"]))
    onnx_delta = None
    memory = "peak GPU MB (allocated)" if device.type == "cuda" else "peak RSS MB"
    rows = [f"| backend | dtype | model ms | model FPS | end-to-end FPS | end to end / model | {memory} "
            "| max abs diff vs torch float32 |", "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cpu" and importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
            path = Path(tmp) / "model.onnx"
            onnx_delta = _export_for_table(options, path)
            variants.append(("onnxruntime", "float32", ["--weights", str(path), "--backend", "onnxruntime"]))
        for backend, dtype, extra in tqdm(variants, desc="variants", unit="run"):
            base = _without(argv, ("--dtype", "--backend"), ("--compile", "--no-cuda-graph"))
            proc = subprocess.run([sys.executable, "-m", "lorat.bench", *base, "--dtype", dtype, *extra],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append(f"| {backend} | {dtype} | failed: {proc.stderr.strip().splitlines()[-1:]} | | | | | |")
                continue
            r = json.loads(proc.stdout)
            diff = r.get("max_abs_diff_vs_float32", onnx_delta)
            shown = "-" if diff is None else f"{diff:.1e}"
            peak = r["peak_memory_mb"].get("gpu_allocated", r["peak_memory_mb"]["process_rss"])
            rows.append(f"| {backend} | {dtype} | {r['model_ms']:.2f} | {r['model_fps']:.1f} | "
                        f"{r['tracking_fps']:.1f} | {r['tracking_fps'] / r['model_fps']:.0%} | {peak:.0f} | {shown} |")
    return "\n".join(rows)


def _training_config(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The config to time, with the command line's training settings applied."""
    options = ModelOptions.from_args(args)
    if options.config is None:
        parser.error("--train and --data need a CONFIG")
    config = load_config(options.config)
    changes = {"compile": args.compile or config.train.compile,
               "grad_checkpointing": args.grad_checkpointing or config.train.grad_checkpointing}
    if args.amp:
        changes["amp"] = args.amp
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes)), options


def _training_main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    from lorat.training.speed import time_data_pipeline, time_training_steps

    config, options = _training_config(parser, args)
    set_threads(options.threads)
    if args.data:
        from lorat.data.sequences import parse_dataset_arg

        data = [parse_dataset_arg(item, "--data") for item in args.data]
        rows = ["| data workers | batch | pairs/s |", "|---|---|---|"]
        for workers in args.workers:
            r = time_data_pipeline(config, data, workers, args.batch)
            rows.append(f"| {workers} | {args.batch} | {r['pairs_per_s']:.1f} |")
        print("\n".join(rows))
        return 0
    if args.table:
        _training_table(resolve_device(options.device), _without(argv, ("--amp",), ("--table", "--compile",
                                                                                  "--grad-checkpointing")))
        return 0
    device = resolve_device(options.device)
    result = {"config": str(options.config), "variant": config.model.variant, "device": _device_name(device),
              "finetune": config.train.finetune, "torch": torch.__version__}
    result |= time_training_steps(config, device, args.batch, args.steps)
    print(json.dumps(result))  # one line: the last line of the output is the JSON object
    return 0


def _training_table(device: torch.device, argv: list[str]) -> None:
    """Print every training precision x compile x activation checkpointing, each run in a process of its
    own, row by row as they finish. Precisions the CPU has no native arithmetic for are listed as
    skipped (emulated, they run for many minutes a step; ``--amp`` still runs them one at a time)."""
    cuda = device.type == "cuda"
    amps = ["none", *(["bfloat16"] if cuda or cpu_has_bf16() else []),
            *(["float16"] if cuda or cpu_has_fp16() else [])]
    memory = "peak GPU MB (allocated)" if cuda else "peak RSS MB"
    print(f"| precision | compile | checkpointing | samples/s | step ms | {memory} |\n|---|---|---|---|---|---|",
          flush=True)
    variants = [(amp, compiled, ckpt) for amp in amps for compiled in (False, True) for ckpt in (False, True)]
    for amp, compiled, ckpt in tqdm(variants, desc="variants", unit="run"):
        extra = ["--amp", amp] + ["--compile"] * compiled + ["--grad-checkpointing"] * ckpt
        proc = subprocess.run([sys.executable, "-m", "lorat.bench", *argv, *extra], capture_output=True, text=True)
        name = "float32" if amp == "none" else amp + (" + grad scaler" if amp == "float16" else "")
        switches = f"| {name} | {'on' if compiled else 'off'} | {'on' if ckpt else 'off'} |"
        if proc.returncode != 0:
            tqdm.write(f"{switches} failed: {proc.stderr.strip().splitlines()[-1:]} | | |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        tqdm.write(f"{switches} {r['samples_per_s']:.2f} | {r['step_ms']:.0f} | {r['peak_mb']:.0f} |")
    for amp in ("bfloat16", "float16"):
        if amp not in amps:
            tqdm.write(f"| {amp} | - | - | skipped: no native {amp} on this CPU | | |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorat.bench", description=__doc__.split("\n")[0].split(": ")[1])
    add_model_arguments(parser, config_positional=True)
    parser.add_argument("--frames", type=int, default=100, help="length of the synthetic clip")
    parser.add_argument("--iters", type=int, default=100, help="timed model-only iterations")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="on CUDA: launch every kernel (default: each tracking step and the model-only pass "
                             "replayed as a CUDA graph; off with --compile)")
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="LoRATv2: encode the template (and reference) again in every step, as a model without "
                             "the key-value cache must (the same outputs)")
    parser.add_argument("--table", action="store_true",
                        help="every backend and dtype this machine runs, each in its own process: a Markdown table "
                             "(with --train: every training precision, compile and checkpointing setting)")
    training = parser.add_argument_group("training speed")
    training.add_argument("--train", action="store_true", help="time training steps instead of tracking")
    training.add_argument("--batch", type=int, default=4, help="training batch (default 4)")
    training.add_argument("--steps", type=int, default=10, help="timed training steps (after 3 untimed ones)")
    training.add_argument("--amp", choices=("auto", "none", "float16", "bfloat16"),
                          help="training autocast (default: the config's train.amp)")
    training.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations")
    training.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                          help="time the training data pipeline on this dataset (repeatable)")
    training.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="data worker counts to time")
    args = parser.parse_args(argv)
    if args.train or args.data:
        return _training_main(parser, args, [a for a in (sys.argv[1:] if argv is None else argv)])
    options = ModelOptions.from_args(args)
    if options.config is None and options.weights is None:
        parser.error("give a CONFIG or --weights")
    set_threads(options.threads)
    if args.table:
        print(_table(options, [a for a in (sys.argv[1:] if argv is None else argv) if a != "--table"]))
        return 0
    graph = not (args.no_cuda_graph or args.compile)
    if options.weights:  # either backend, as the loader chooses it; torch: cast to the dtype below
        tracker = Tracker.from_loaded(load(options, say=None, cast=False), cuda_graph=graph,
                                      kv_cache=not args.no_kv_cache)
    else:
        device = resolve_device(options.device)
        config = load_config(options.config)
        tracker = Tracker(_random_model(config, device), config, cuda_graph=graph, kv_cache=not args.no_kv_cache)
    backend = getattr(tracker.model, "backend", "torch")
    reference = None
    if backend == "torch":  # float32 outputs first; then the weights go to the dtype, as the loader does
        reference = reference_outputs(tracker)
        tracker.dtype = resolve_dtype(options.dtype, tracker.device, tracker.config.model.backbone.embed_dim)
        cast_for_autocast(tracker.model, tracker.dtype)
    if args.compile and backend == "torch":
        tracker.model = torch.compile(tracker.model)  # attribute access (cfg, device) falls through to the module
    result = {"config": str(options.config or options.weights), "variant": tracker.config.model.variant,
              "device": _device_name(tracker.device), "dtype": dtype_name(tracker.dtype), "backend": backend,
              "compiled": args.compile and backend == "torch", "cuda_graph": _graphed(tracker),
              "kv_cache": tracker.config.model.family == "loratv2" and tracker.kv_cache,
              "torch": torch.__version__}
    result |= benchmark(tracker, args.frames, args.iters)
    if reference is not None:
        result["max_abs_diff_vs_float32"] = output_delta(tracker, reference)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
