"""Compare LoRAT with simple baselines on clips with ground truth (success AUC, P@20, P_norm@0.2).

    python bench/compare.py --dataset lasot=/data/syn-val --weights run/checkpoint/epoch_020/lorat.safetensors
    python bench/compare.py --video box.mp4 --gt box_pseudo_gt.txt --weights weights/lorat_demo.safetensors --mil
    python bench/compare.py ... --set tracking.window_penalty=0.3 --set tracking.search_area_factor=4.5

Trackers: ``lorat`` (the given weights), ``static`` (the init box, never moved) and, with
``--mil``, OpenCV's MIL tracker. Every tracker starts from the ground-truth box of frame 1 and is
scored with :mod:`lorat.evaluation.metrics` (pytracking-compatible OPE). Prints a Markdown table and, with
``--json``, one JSON object. ``--set tracking.KEY=VALUE`` changes a tracking setting of the
loaded model's config (for choosing settings on development clips; checked like a config file).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import yaml

from lorat.checkpoint.loader import load
from lorat.config import config_from_dict, config_to_dict
from lorat.data.sequences import read_boxes, read_dataset
from lorat.errors import ConfigError, run_cli
from lorat.evaluation.metrics import sequence_curves, summarize_curves
from lorat.options import ModelOptions, add_model_arguments
from lorat.tracking.tracker import Tracker
from lorat.video import open_source, read_rgb


def _clips(args):
    """Yield (name, frame iterator factory, gt xywh (T,4), present (T,), dataset name)."""
    if args.video:
        gt = read_boxes(Path(args.gt))
        yield Path(args.video).stem, lambda: (f for _, f in open_source(args.video)), gt, None, "custom"
        return
    name, path = args.dataset.split("=", 1)
    for seq in read_dataset(name, path, args.split, for_training=False):
        track = seq.tracks[0]
        gt = track.xywh()
        frames = seq.frames

        def load(frames=frames):
            return (read_rgb(p) for p in frames)

        yield seq.name, load, gt, track.present, name


def _run(kind: str, frames, init: np.ndarray, tracker: Tracker | None) -> tuple[np.ndarray, float]:
    """(T, 4) xywh boxes of one tracker (frame 1: ``init`` for every tracker) and its frames per second."""
    start = time.perf_counter()
    if kind == "lorat":
        boxes = [init] + [np.array(r.targets[0].box) for r in itertools.islice(tracker.stream(frames, init), 1, None)]
    elif kind == "mil":
        mil = cv2.TrackerMIL_create()
        boxes = [init]
        for i, frame in enumerate(frames):
            bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
            if i == 0:
                mil.init(bgr, tuple(int(round(v)) for v in init))
                continue
            ok, box = mil.update(bgr)
            boxes.append(np.array(box, dtype=np.float64) if ok else boxes[-1])
    else:
        boxes = [init for _ in frames]
    return np.array(boxes), len(boxes) / (time.perf_counter() - start)


def _with_tracking(config, items: Sequence[str]):
    """``config`` with ``tracking.KEY=VALUE`` overrides applied and checked."""
    data = config_to_dict(config)
    for item in items:
        key, sep, raw = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not sep or section != "tracking" or not name:
            raise ConfigError(f"--set {item!r}: only tracking settings can change here (tracking.KEY=VALUE)")
        if name not in data["tracking"]:
            raise ConfigError(f"--set {item!r}: no tracking setting {name!r} (known: {', '.join(data['tracking'])})")
        data["tracking"][name] = yaml.safe_load(raw)
    return config_from_dict(data, where="--set")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", help="NAME=PATH of a dataset (lasot, custom, got10k, ...)")
    parser.add_argument("--split", default="all", help="dataset split (default all sequences)")
    parser.add_argument("--video", help="a single video file")
    parser.add_argument("--gt", help="ground truth x,y,w,h per frame for --video")
    add_model_arguments(parser, weights={"required": True})
    parser.add_argument("--mil", action="store_true", help="also run OpenCV's MIL tracker")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="tracking.KEY=VALUE",
                        help="change a tracking setting of the model's config; repeatable")
    args = parser.parse_args(argv)
    if bool(args.video) == bool(args.dataset) or (args.video and not args.gt):
        parser.error("give --dataset NAME=PATH, or --video FILE with --gt FILE")
    tracker = Tracker.from_loaded(load(ModelOptions.from_args(args), say=None))
    if args.set:
        tracker.config = _with_tracking(tracker.config, args.set)
    kinds = ["lorat", "static"] + (["mil"] if args.mil else [])
    curves = {k: [] for k in kinds}
    speed = {k: [] for k in kinds}
    for name, frames, gt, present, dataset in _clips(args):
        for kind in kinds:
            boxes, fps = _run(kind, frames(), gt[0], tracker if kind == "lorat" else None)
            if len(boxes) != len(gt):
                print(f"warning: {name}: {len(boxes)} frames decoded, {len(gt)} boxes; scoring the common part",
                      file=sys.stderr)
                m = min(len(boxes), len(gt))
                boxes, gt_, pr = boxes[:m], gt[:m], None if present is None else present[:m]
            else:
                gt_, pr = gt, present
            curves[kind].append(sequence_curves(boxes, gt_, pr, dataset))
            speed[kind].append(fps)
    results = {k: summarize_curves(curves[k]) | {"fps": float(np.mean(speed[k]))} for k in kinds}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("| tracker | success AUC | P@20px | P_norm@0.2 | FPS |\n|---|---|---|---|---|")
        for k, r in results.items():
            print(f"| {k} | {r['success_auc']:.3f} | {r['precision']:.3f} | {r['norm_precision']:.3f} "
                  f"| {r['fps']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
