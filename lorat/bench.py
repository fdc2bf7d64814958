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
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from lorat.build import build_lorat
from lorat.checkpoint import load_model
from lorat.config import load_config
from lorat.errors import run_cli
from lorat.runtime import resolve_device, resolve_dtype, set_threads
from lorat.tracker import Tracker, run_model, search_crops, to_frame_tensor

__all__ = ["main"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

        # 1. model only, batch 1.
        first = next(_decoded(clip))
        tracker.init(first, box)
        x, _, _ = search_crops(tracker.state, [to_frame_tensor(first, device)], cfg.model, cfg.tracking)
        for _ in range(warmup):
            run_model(tracker.model, tracker.state, x, dtype)
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            run_model(tracker.model, tracker.state, x, dtype)
        _sync(device)
        model_s = (time.perf_counter() - start) / iters

        # 2. end to end, as a user runs it.
        start = time.perf_counter()
        n = sum(1 for _ in tracker.stream(_decoded(clip), box))
        end_to_end_s = (time.perf_counter() - start) / n

        # 3. the same loop, stage by stage (the step's timer hook synchronises the device per stage).
        split = dict.fromkeys(("decode", "crop", "model", "postprocess"), 0.0)
        clock = [0.0]

        def lap(stage: str) -> None:
            _sync(device)
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
    memory = {"process_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorat.bench", description=__doc__.split("\n")[0].split(": ")[1])
    parser.add_argument("config", nargs="?", help="model config YAML (optional with single-file --weights)")
    parser.add_argument("--weights", help="weights to load (default: random init; speed is the same)")
    parser.add_argument("--backbone-weights", help="DINOv2 file for official trainable-only checkpoints")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads (default: torch's choice; on a busy machine fewer can be faster)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (float16 on CUDA, else float32), float32, float16, bfloat16")
    parser.add_argument("--frames", type=int, default=100, help="length of the synthetic clip")
    parser.add_argument("--iters", type=int, default=100, help="timed model-only iterations")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto",
                        help="onnxruntime (or auto) with an .onnx --weights file from python -m lorat.export --onnx")
    args = parser.parse_args(argv)
    if args.config is None and args.weights is None:
        parser.error("give a CONFIG or --weights")
    set_threads(args.threads)
    onnx = args.weights is not None and (args.backend == "onnxruntime" or args.weights.lower().endswith(".onnx"))
    if onnx:
        tracker = Tracker.from_pretrained(args.weights, args.config, device=args.device, dtype=args.dtype,
                                          backend=args.backend)
        result = {"config": args.config or str(args.weights), "variant": tracker.config.model.variant,
                  "device": _device_name(torch.device("cpu")), "dtype": "float32", "backend": "onnxruntime",
                  "compiled": False, "torch": torch.__version__}
        print(json.dumps(result | benchmark(tracker, args.frames, args.iters), indent=2))
        return 0
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = load_config(args.config) if args.config else None
    if args.weights:
        model, config = load_model(args.weights, config, args.backbone_weights, device=device)
    else:
        assert config is not None
        model = build_lorat(config.model, lora=False).eval().to(device)
    if args.compile:
        model = torch.compile(model)  # attribute access (cfg, device) falls through to the module
    result = {"config": args.config or str(args.weights), "variant": config.model.variant,
              "device": _device_name(device), "dtype": str(dtype or torch.float32).removeprefix("torch."),
              "backend": "torch", "compiled": args.compile, "torch": torch.__version__}
    result |= benchmark(Tracker(model, config, dtype=dtype), args.frames, args.iters)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
