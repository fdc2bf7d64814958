"""Start-up: how long until the first tracked box, against ``python -c "import torch"``.

    python bench/startup.py                    # 5 paired runs, the bundled model on assets/box.mp4
    python bench/startup.py --repeats 9 --backend torch -- --backend torch

Prints the medians of paired runs (``import torch``, then a 2-frame ``python -m lorat.track``: the init
box and the first tracked box), their ratio, and where the time of one run goes: the imports (from
``python -X importtime``, by top-level package) and, in one process, the steps the command takes
(model load, video open, init, first step). Arguments after ``--`` go to ``lorat.track``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from lorat.options import add_model_arguments

ROOT = Path(__file__).resolve().parent.parent
CLIP, INIT = ROOT / "assets" / "box.mp4", "290,14,308,228"


def _seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def _imports(command: list[str]) -> dict[str, float]:
    """Seconds of imports by top-level package (the sum of ``-X importtime``'s own times of its modules)."""
    run = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True, check=True)
    totals: dict[str, float] = defaultdict(float)
    for line in run.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \| *(\S+)", line)
        if match:
            totals[match.group(2).split(".")[0]] += int(match.group(1)) / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


_STEPS = """
import sys, time
started = time.perf_counter()
marks = []
def mark(name):
    marks.append((name, time.perf_counter()))
import numpy, cv2, torch
mark("import torch, cv2, numpy")
from lorat.tracking.tracker import Tracker
from lorat.checkpoint.loader import load
from lorat.options import ModelOptions
mark("import lorat (tracking)")
loaded = load(ModelOptions(None, backend=sys.argv[3]), say=None)
mark(f"load the model ({loaded.backend})")
from lorat.video import open_source
source = open_source(sys.argv[1])
frames = iter(source)
first = cv2.cvtColor(next(frames)[1], cv2.COLOR_BGR2RGB)
mark("open the video, first frame")
tracker = Tracker.from_loaded(loaded)
tracker.init(first, [float(v) for v in sys.argv[2].split(",")])
mark("init")
tracker.track(cv2.cvtColor(next(frames)[1], cv2.COLOR_BGR2RGB))
mark("first tracked box")
last = started
for name, at in marks:
    print(f"{name}\\t{at - last:.3f}")
    last = at
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    add_model_arguments(parser, ("backend",))  # for the in-process breakdown; lorat.track's after --
    parser.add_argument("track_args", nargs="*", help="extra lorat.track arguments (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        track = ["-m", "lorat.track", str(CLIP), "--init", INIT, "--max-frames", "2", "--save-txt",
                 str(Path(tmp) / "boxes.txt"), *args.track_args]
        pairs = [(_seconds([sys.executable, "-c", "import torch"]), _seconds([sys.executable, *track]))
                 for _ in range(args.repeats)]
        torch_s, track_s = (statistics.median(p[i] for p in pairs) for i in (0, 1))
        print(f"import torch: {torch_s:.2f} s, first tracked box: {track_s:.2f} s (medians of {args.repeats} "
              f"paired runs), ratio {track_s / torch_s:.2f}")
        print("\nimports of one run (python -X importtime, by top-level package, s):")
        for name, seconds in list(_imports(track).items())[:8]:
            print(f"  {name}\t{seconds:.2f}")
        steps = subprocess.run([sys.executable, "-c", _STEPS, str(CLIP), INIT, args.backend], capture_output=True,
                               text=True, check=True).stdout
        print("\none run, step by step (s):")
        for line in steps.splitlines():
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
