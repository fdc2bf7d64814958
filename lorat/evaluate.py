"""``python -m lorat.evaluate``: run benchmarks and score result files.

    python -m lorat.evaluate configs/b224.yaml --weights W --dataset lasot=/data/LaSOT --output runs/eval
    torchrun --nproc_per_node 4 -m lorat.evaluate ...            # sequences sharded over processes
    python -m lorat.evaluate score --dataset lasot=/data/LaSOT --results runs/eval/lasot/B-224 [--json]

Running: many sequences advance together, one batched forward pass per step (``--batch``), each
at its own frame (the official evaluator's scheme). Results are pytracking text files
``<output>/<dataset>/<tracker>[_<run>]/<seq>.txt`` written as each sequence finishes, so an
interrupted run resumes by skipping finished sequences. ``--repeat 3`` tracks everything three
times (the official protocol for LaSOT_Extension and GOT-10k test) and averages the curves.
GOT-10k test and TrackingNet test have no public ground truth: they produce the submission zips.
Otherwise a table is printed and ``metrics.json``, ``sequences.csv`` and success / precision
plots are written next to the results.

Scoring (``score``): reads one tracker's ``<seq>.txt`` files per ``--results`` folder (ours or
anyone's; several folders are compared in one plot) and prints the same metrics.

Datasets: ``lasot`` (test split: ``testing_set.txt`` in the root, else every sequence),
``lasot_ext``, ``got10k`` (``--split val`` or ``test``), ``trackingnet`` (test), ``tnl2k``,
``custom``. Metrics follow :mod:`lorat.metrics` (pytracking-compatible).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from lorat.checkpoint import default_weights, load_model
from lorat.config import load_config
from lorat.data.sequences import DATASETS, DatasetError, Sequence, read_dataset
from lorat.errors import LoratError, run_cli
from lorat.metrics import SequenceCurves, got10k_metrics, sequence_curves, summarize
from lorat.report import format_table, mean_curves, plot_curves, write_report
from lorat.results import FILE_OFFSET, finished, read_sequence, write_got10k_zip, write_sequence, write_trackingnet_zip
from lorat.tracker import TrackState, init_state, resolve_device, resolve_dtype, to_frame_tensor, track_step
from lorat.video import read_rgb

__all__ = ["main", "track_sequences", "score_results"]

DEFAULT_SPLIT = {"lasot": "test", "lasot_ext": "test", "got10k": "val", "trackingnet": "test", "tnl2k": "test",
                 "custom": "test"}
SUBMISSION_ONLY = {("got10k", "test"), ("trackingnet", "test")}


def _gt(seq: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(T, 4) xywh ground truth and (T,) presence of a sequence's first track.

    Absent frames get a NaN box, as in the official evaluation (LORAT_SPEC 5.1).
    """
    track = seq.tracks[0]
    xywh = track.xywh()
    xywh[~track.present] = np.nan
    return xywh, track.present


class _Running:
    """A sequence being tracked: where it is, and what it produced so far."""

    def __init__(self, seq: Sequence):
        self.seq, self.index = seq, 0
        self.boxes: list[np.ndarray] = []
        self.times: list[float] = []
        self.size: tuple[int, int] | None = None


def track_sequences(model, config, sequences: list[Sequence], folder: Path, offset: float, batch: int,
                    dtype, progress: bool = True) -> None:
    """Track sequences (batched, each at its own frame) and write their result files as they finish."""
    device = model.device
    pending = list(sequences)
    active: list[_Running] = []
    state: TrackState | None = None
    bar = tqdm(total=sum(len(s) for s in pending), unit="frame", desc=f"{folder.name}", disable=not progress,
               dynamic_ncols=True)
    seq_bar = tqdm(total=len(pending), unit="seq", desc="sequences", disable=not progress, position=1,
                   dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=4) as pool:
        while pending or active:
            joining = []
            while pending and len(active) + len(joining) < batch:
                joining.append(_Running(pending.pop(0)))
            everyone = active + joining
            images = list(pool.map(lambda r: read_rgb(r.seq.frames[r.index]), everyone))
            start = time.perf_counter()
            # sequences joining now: initialise on their first frame (output = the init box)
            new_states, kept_joining = [], []
            for r, image in zip(joining, images[len(active):], strict=True):
                gt, _ = _gt(r.seq)
                if image is None or not np.isfinite(gt[0]).all() or gt[0, 2] <= 0 or gt[0, 3] <= 0:
                    warnings.warn(f"{r.seq.name}: first frame unreadable or without a box; sequence skipped",
                                  stacklevel=1)
                    seq_bar.update(1)
                    bar.update(len(r.seq))
                    continue
                frame = to_frame_tensor(image, device)
                r.size = (image.shape[1], image.shape[0])
                box = torch.tensor([[gt[0, 0], gt[0, 1], gt[0, 0] + gt[0, 2], gt[0, 1] + gt[0, 3]]],
                                   dtype=torch.float64)
                new_states.append(init_state([frame], box, model.cfg, config.tracking))
                r.boxes.append(gt[0].copy())
                kept_joining.append(r)
            # sequences already running: one batched step
            if active:
                frames = []
                for r, image in zip(active, images[:len(active)], strict=True):
                    if image is None:
                        warnings.warn(f"{r.seq.name}: frame {r.index + 1} unreadable; the previous box is repeated",
                                      stacklevel=1)
                        image = np.zeros((r.size[1], r.size[0], 3), np.uint8)
                    frames.append(to_frame_tensor(image, device))
                step = track_step(model, state, frames, config.tracking, dtype)
                boxes = step.box.cpu().numpy()
                state = step.state
                for k, (r, image) in enumerate(zip(active, images[:len(active)], strict=True)):
                    xywh = np.array([boxes[k, 0], boxes[k, 1], boxes[k, 2] - boxes[k, 0], boxes[k, 3] - boxes[k, 1]])
                    r.boxes.append(xywh if image is not None else r.boxes[-1])
            elapsed = (time.perf_counter() - start) / max(len(active) + len(kept_joining), 1)
            for r in active + kept_joining:
                r.times.append(elapsed)
                r.index += 1
            bar.update(len(active) + len(kept_joining))
            active = active + kept_joining
            state = TrackState.cat(([state] if state is not None else []) + new_states) if active else None
            done = [i for i, r in enumerate(active) if r.index >= len(r.seq)]
            for i in done:
                r = active[i]
                write_sequence(folder, r.seq.name, np.array(r.boxes), np.array(r.times), offset)
                seq_bar.update(1)
            if done:
                keep = [i for i in range(len(active)) if i not in done]
                active = [active[i] for i in keep]
                state = state.select(keep) if keep else None
    bar.close()
    seq_bar.close()


def score_results(dataset: str, sequences: list[Sequence], folder: Path) -> tuple[dict, list, SequenceCurves]:
    """Score one tracker's result folder; returns (summary, per-sequence rows, mean curves).

    Raises:
        DatasetError: result files missing or with the wrong number of lines (named).
    """
    missing = [s.name for s in sequences if not (folder / f"{s.name}.txt").is_file()]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DatasetError(f"{folder}: no result file for {len(missing)} of {len(sequences)} sequences: "
                           f"{', '.join(missing[:5])}{more}")
    offset = FILE_OFFSET.get(dataset, 0.0)
    rows, curves, preds, gts, presents = [], [], [], [], []
    for seq in sequences:
        gt, present = _gt(seq)
        pred = read_sequence(folder / f"{seq.name}.txt", len(gt), offset)
        if not np.isfinite(pred).all():
            warnings.warn(f"{seq.name}: {int((~np.isfinite(pred).all(1)).sum())} NaN/inf boxes, scored as misses",
                          stacklevel=1)
        pred[0] = np.where(np.isfinite(gt[0]), gt[0], pred[0])  # frame 1 is the init box (pytracking rule)
        c = sequence_curves(pred, gt, present, dataset)
        times_path = folder / f"{seq.name}_time.txt"
        fps = float("nan")
        if times_path.is_file():
            times = np.loadtxt(times_path, ndmin=1)
            fps = float(1 / times.mean()) if len(times) and times.mean() > 0 else float("nan")
        rows.append((seq.name, c, len(gt), fps))
        curves.append(c)
        preds.append(pred)
        gts.append(gt)
        presents.append(present)
    summary = summarize(curves)
    fps_values = [r[3] for r in rows if r[3] == r[3]]
    if fps_values:
        summary["fps"] = float(1 / np.mean([1 / f for f in fps_values]))
    if dataset == "got10k":
        summary |= got10k_metrics(preds, gts, presents)
    return summary, rows, mean_curves(curves)


def _dataset_arg(text: str, split: str | None) -> tuple[str, str, str]:
    if "=" not in text:
        raise LoratError(f"--dataset expects NAME=PATH, got {text!r} (names: {', '.join(DEFAULT_SPLIT)})")
    name, path = text.split("=", 1)
    if name not in DATASETS or name == "coco":
        raise LoratError(f"unknown evaluation dataset {name!r}; use one of {', '.join(DEFAULT_SPLIT)}")
    return name, path, split or DEFAULT_SPLIT[name]


def _read(name: str, path: str, split: str) -> list[Sequence]:
    sequences = read_dataset(name, path, split, for_training=False)
    if name == "lasot" and not (Path(path) / "testing_set.txt").is_file():
        print(f"note: {path} has no testing_set.txt; evaluating all {len(sequences)} sequences", file=sys.stderr)
    return sequences


def _score_main(argv: Seq[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lorat.evaluate score", description="Score result files.")
    p.add_argument("--dataset", required=True, help="NAME=PATH")
    p.add_argument("--split")
    p.add_argument("--results", required=True, nargs="+", type=Path, help="one tracker's <seq>.txt folder each")
    p.add_argument("--output", type=Path, help="write metrics.json, sequences.csv and plots here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    name, path, split = _dataset_arg(args.dataset, args.split)
    sequences = _read(name, path, split)
    results, curves = {}, {}
    for folder in args.results:
        summary, rows, mean = score_results(name, sequences, folder)
        label = folder.name
        results[label], curves[label] = summary, mean
        if args.output:
            write_report(args.output / label, summary, rows)
    if args.output:
        plot_curves(args.output, curves, name)
    if args.json:
        print(json.dumps(results[args.results[0].name] if len(results) == 1 else results, indent=2))
    else:
        print(format_table(results))
    return 0


def main(argv: Seq[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["score"]:
        return _score_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m lorat.evaluate", description="Run and score a benchmark.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("config", nargs="?", help="config YAML (not needed with our single-file weights)")
    p.add_argument("--weights", help="weights (default: the bundled demo model)")
    p.add_argument("--backbone-weights", help="DINOv2 file for official trainable-only checkpoints")
    p.add_argument("--dataset", required=True, help="NAME=PATH")
    p.add_argument("--split", help="dataset split (default: the benchmark's test split; GOT-10k: val)")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--name", help="tracker name in the result paths (default: the config's variant)")
    p.add_argument("--repeat", type=int, default=1, help="track every sequence this many times")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.batch < 1:
        raise LoratError("--repeat and --batch must be at least 1")
    name, path, split = _dataset_arg(args.dataset, args.split)
    sequences = _read(name, path, split)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = resolve_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        config = load_config(args.config) if args.config else None
        model, config = load_model(args.weights or default_weights(), config, args.backbone_weights, device=device)
        dtype = resolve_dtype(args.dtype, device)
        tracker = (args.name or config.model.variant).replace("/", "-")
        runs = [args.output / name / (tracker if args.repeat == 1 else f"{tracker}_{r:03d}")
                for r in range(1, args.repeat + 1)]
        offset = FILE_OFFSET.get(name, 0.0)
        for folder in runs:
            todo = [s for i, s in enumerate(sequences) if i % world == rank and not finished(folder, s.name, len(s))]
            skipped = sum(1 for i, s in enumerate(sequences) if i % world == rank) - len(todo)
            if skipped and rank == 0:
                print(f"{folder}: {skipped} finished sequences skipped (resuming)")
            track_sequences(model, config, todo, folder, offset, args.batch, dtype, progress=rank == 0)
        if world > 1:
            dist.barrier()
        if rank == 0:
            _finish(name, split, sequences, runs, tracker, args.output / name)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _finish(name: str, split: str, sequences: list[Sequence], runs: list[Path], tracker: str, out: Path) -> None:
    """Submission zips, or metrics averaged over the runs (table, json, csv, plots)."""
    if (name, split) in SUBMISSION_ONLY:
        loaded = [{s.name: (read_sequence(f / f"{s.name}.txt", None), np.loadtxt(f / f"{s.name}_time.txt", ndmin=1))
                   for s in sequences} for f in runs]
        if name == "got10k":
            path = write_got10k_zip(out / "GOT10k-test.zip", tracker, loaded)
            if len(runs) > 1:
                for r, run in enumerate(loaded, 1):
                    write_got10k_zip(out / f"GOT10k-test{r:03d}.zip", tracker, [run])
        else:
            path = write_trackingnet_zip(out / "TrackingNet-test.zip", tracker, loaded[0])
        print(f"wrote {path} (no public ground truth: submit it to the evaluation server)")
        return
    summaries, all_curves = [], []
    for folder in runs:
        summary, rows, mean = score_results(name, sequences, folder)
        write_report(folder, summary, rows)
        summaries.append(summary)
        all_curves.append(mean)
    curves = SequenceCurves(*(np.mean([getattr(c, f) for c in all_curves], axis=0)
                              for f in ("success", "precision", "norm_precision")))
    summary = {"success_auc": float(curves.success.mean()), "precision": float(curves.precision[20]),
               "norm_precision": float(curves.norm_precision[20]), "runs": len(runs), "sequences": len(sequences)}
    for key in ("ao", "sr_0.5", "sr_0.75", "fps"):
        if key in summaries[0]:
            summary[key] = float(np.mean([s[key] for s in summaries]))
    (out / f"{tracker}_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(out, {tracker: curves}, name)
    print(format_table({tracker: summary}))
    print(f"results in {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
