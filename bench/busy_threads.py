"""Tracking speed quiet and beside busy processes: the default thread policy against fixed counts.

    python bench/busy_threads.py                      # the demo model and a random-weight B-224
    python bench/busy_threads.py --loads 0 1 --repeats 3

Each cell is the median end-to-end FPS of ``python -m lorat.track`` on assets/box.mp4 (the run's own
FPS line: decoding, tracking and writing, without start-up), runs interleaved so that a drift of the
machine hits every column alike. A load is N processes spinning ``while True: pass``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIP, INIT = ROOT / "assets" / "box.mp4", "290,14,308,228"


def _fps(model: list[str], frames: int, threads: int | None) -> float:
    extra = [] if threads is None else ["--threads", str(threads)]
    run = subprocess.run([sys.executable, "-m", "lorat.track", str(CLIP), "--init", INIT, "--max-frames", str(frames),
                          *model, *extra], capture_output=True, text=True, check=True)
    return float(re.search(r"\(([\d.]+) FPS\)", run.stdout).group(1))


def _b224(folder: Path) -> Path:
    import torch

    from lorat.checkpoint.build import build_lorat
    from lorat.checkpoint.loader import save_model
    from lorat.config import load_config

    config = load_config("b224")
    torch.manual_seed(0)
    return save_model(build_lorat(config.model, lora=False).eval(), config, folder / "b224_random.safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="busy processes beside the run")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2], help="fixed --threads values to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=150, help="frames per run (demo model); 0: skip it")
    parser.add_argument("--b224-frames", type=int, default=40, help="frames per run (B-224); 0: skip B-224")
    args = parser.parse_args(argv)
    columns = [None, *args.counts]
    head = " | ".join(["default", *(f"`--threads {t}`" for t in args.counts)])
    print(f"| model | busy processes | {head} | default / best fixed |\n|---|---|" + "---|" * (len(columns) + 1))
    with tempfile.TemporaryDirectory() as tmp:
        models = [("demo (default: ONNX Runtime)", [], args.frames),
                  ("demo, `--backend torch`", ["--backend", "torch"], args.frames)] if args.frames else []
        if args.b224_frames:
            models.append(("B-224 (random weights)", ["--weights", str(_b224(Path(tmp)))], args.b224_frames))
        for name, model, frames in models:
            for load in args.loads:
                busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
                try:
                    runs = {c: [] for c in columns}
                    for _ in range(args.repeats):
                        for c in columns:
                            runs[c].append(_fps(model, frames, c))
                finally:
                    for p in busy:
                        p.kill()
                median = {c: statistics.median(v) for c, v in runs.items()}
                best = max(median[c] for c in args.counts)
                cells = " | ".join(f"{median[c]:.1f}" for c in columns)
                print(f"| {name} | {load} | {cells} | {median[None] / best:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
