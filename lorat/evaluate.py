"""``python -m lorat.evaluate``: run benchmarks and score result files.

    python -m lorat.evaluate configs/b224.yaml --weights W --dataset lasot=/data/LaSOT --output runs/eval
    torchrun --nproc_per_node 4 -m lorat.evaluate ...            # sequences sharded over processes
    python -m lorat.evaluate score --dataset lasot=/data/LaSOT --results runs/eval/lasot/B-224 [--json]

Running: many sequences advance together, one batched forward pass per step (``--batch``), each
at its own frame (the official evaluator's scheme). Results are pytracking text files
``<output>/<dataset>/<tracker>[_<run>]/<seq>.txt`` written as each sequence finishes, so an
interrupted run resumes by skipping finished sequences. Each run folder holds ``tracker.json``
(sha256 of the weights and backbone weights, the model and tracking config, the autocast dtype,
the lorat version), written when the run starts; a run into a folder whose ``tracker.json``
differs, or that holds results without one, is refused, so results of two trackers are never
mixed (use another ``--output`` or ``--name``). ``--repeat 3`` tracks everything three times (the
official protocol for LaSOT_Extension and GOT-10k test) and averages the curves.
GOT-10k test and TrackingNet test have no public ground truth: they produce the submission zips.
Otherwise a table is printed, each run folder gets ``metrics.json`` and ``sequences.csv``, and the
dataset folder gets ``metrics.json`` (``{tracker: summary and curves}`` for every tracker evaluated
into it) and success / precision plots comparing all of them. A sequence's ``_time.txt`` holds the
time of each step that advanced it (with ``--batch N``, the batched step's: its latency).

Scoring (``score``): reads one tracker's ``<seq>.txt`` files per ``--results`` folder (ours or
anyone's; several folders are compared in one plot) and prints the same metrics. Malformed files
(a line that is not 4 numbers, a negative size, ``inf``, a ``_time.txt`` value that is not a
number of seconds) are errors naming the file and line; ``nan`` boxes are misses (a warning counts
those on frames with a visible target).

Initialisation and absent targets: a sequence starts on its *init frame*, the first frame whose
target is present (frame 1 on every public benchmark, as the official evaluation does), with the ground-truth
box clipped to the frame, as ``Tracker.init`` does. Frames before it are written as ``nan``
placeholders (boxes and times); their ground truth is absent, so no metric looks at them. The
init frame is scored as its ground truth (pytracking overwrites frame 1 the same way, also in
foreign result files). A sequence whose target is never present has nothing to initialise on: it
is left out of running and scoring alike, with a note (an error for GOT-10k / TrackingNet test,
whose submissions need every sequence). An unreadable image on an init frame is an error naming
it; an unreadable later frame repeats the previous box, with a warning.

Datasets: ``lasot`` (``--split test``, the default, or ``train``: ``testing_set.txt`` /
``training_set.txt`` in the root, else every sequence), ``lasot_ext``, ``got10k`` (``--split val``,
the default, ``test`` or ``train``), ``trackingnet`` (``test`` or ``train``), ``tnl2k``,
``custom``. Metrics follow :mod:`lorat.evaluation.metrics` (pytracking-compatible).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lorat import __version__
from lorat.config import Config, config_to_dict
from lorat.data.sequences import (
    DatasetError,
    TrackingSequence,
    UnknownDatasetError,
    init_frame,
    parse_dataset_arg,
    read_dataset,
)
from lorat.errors import LoratError, listed, run_cli
from lorat.evaluation.metrics import P20, P_NORM_02, SequenceCurves, got10k_metrics, sequence_curves, summarize_curves
from lorat.evaluation.report import format_table, mean_curves, plot_curves, write_report
from lorat.evaluation.results import (
    FILE_OFFSET,
    claim_folder,
    finished,
    folder_lock,
    read_sequence,
    read_times,
    write_got10k_zip,
    write_trackingnet_zip,
)
from lorat.files import write_atomic
from lorat.options import ModelOptions, add_model_arguments
from lorat.runtime import Distributed, dtype_name

if TYPE_CHECKING:  # torch and the model load once the arguments are parsed: --help stays instant
    import torch

__all__ = ["main", "score_results", "tracker_manifest"]

DEFAULT_SPLIT = {"lasot": "test", "lasot_ext": "test", "got10k": "val", "trackingnet": "test", "tnl2k": "test",
                 "custom": "test"}
SPLITS = {"lasot": ("test", "train"), "got10k": ("val", "test", "train"), "trackingnet": ("test", "train")}
SUBMISSION_ONLY = {("got10k", "test"), ("trackingnet", "test")}
MANIFEST_IGNORED = ("weights.file", "backbone_weights.file")  # in tracker.json for people, not compared


def _gt(seq: TrackingSequence) -> tuple[np.ndarray, np.ndarray]:
    """(T, 4) xywh ground truth and (T,) presence of a sequence's first track.

    Absent frames get a NaN box, as in the official evaluation.
    """
    track = seq.tracks[0]
    xywh = track.xywh()
    xywh[~track.present] = np.nan
    return xywh, track.present


def _trackable(name: str, split: str, sequences: list[TrackingSequence], verbose: bool = True
               ) -> list[TrackingSequence]:
    """The sequences that can be evaluated: those whose target is present on some frame.

    The others are left out with a note (``verbose``), for running and scoring alike.

    Raises:
        DatasetError: a submission-only split has such a sequence (the server needs every one),
            or no sequence is left.
    """
    never = [s.name for s in sequences if init_frame(s) is None]
    if never and (name, split) in SUBMISSION_ONLY:
        raise DatasetError(f"{name} {split}: no initial box for {listed(never)}; the submission needs every sequence")
    if never and verbose:
        print(f"note: target never visible in {len(never)} sequence(s), left out of running and scoring: "
              f"{listed(never)}", file=sys.stderr)
    kept = [s for s in sequences if init_frame(s) is not None]
    if not kept:
        raise DatasetError(f"dataset {name} ({split}): no sequence with a visible target to evaluate")
    return kept


def _fps(path: Path) -> float:
    """Frames per second from a ``<seq>_time.txt`` file (NaN when absent or empty; placeholders ignored)."""
    if not path.is_file():
        return float("nan")
    times = read_times(path)
    times = times[np.isfinite(times)]
    return float(1 / times.mean()) if len(times) and times.mean() > 0 else float("nan")


def score_results(dataset: str, sequences: list[TrackingSequence], folder: Path) -> tuple[dict, list, SequenceCurves]:
    """Score one tracker's result folder; returns (summary, per-sequence rows, mean curves).

    ``sequences`` should hold only sequences with an init frame (see :func:`init_frame`).

    Raises:
        DatasetError: folder not found; result files missing or malformed (named, with the line);
            a malformed ``_time.txt`` file.
    """
    if not folder.is_dir():
        raise DatasetError(f"results folder not found: {folder}" if not folder.exists() else
                           f"--results must name a folder of <sequence>.txt files, got the file {folder}")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise DatasetError(f"cannot read results folder {folder}: permission denied")
    missing = [s.name for s in sequences if not (folder / f"{s.name}.txt").is_file()]
    if missing:
        raise DatasetError(f"{folder}: no result file for {len(missing)} of {len(sequences)} sequences: "
                           f"{listed(missing)}")
    offset = FILE_OFFSET.get(dataset, 0.0)
    rows, curves, preds, gts, presents = [], [], [], [], []
    for seq in sequences:
        gt, present = _gt(seq)
        pred = read_sequence(folder / f"{seq.name}.txt", len(gt), offset)
        lost = int((~np.isfinite(pred).all(axis=1) & present).sum())
        if lost:
            warnings.warn(f"{seq.name}: {lost} NaN boxes on frames with a visible target, scored as misses",
                          stacklevel=1)
        start = init_frame(seq)
        if start is not None:
            pred[start] = gt[start]  # the init frame is scored as its ground truth (pytracking: frame 1)
        c = sequence_curves(pred, gt, present, dataset)
        fps = _fps(folder / f"{seq.name}_time.txt")
        rows.append((seq.name, c, len(gt), fps))
        curves.append(c)
        preds.append(pred)
        gts.append(gt)
        presents.append(present)
    summary = summarize_curves(curves)
    fps_values = [r[3] for r in rows if r[3] == r[3]]
    if fps_values:
        summary["fps"] = float(1 / np.mean([1 / f for f in fps_values]))
    if dataset == "got10k":
        try:
            summary |= got10k_metrics(preds, gts, presents)
        except ValueError as err:
            raise DatasetError(f"{folder}: cannot compute GOT-10k AO: {err}") from None
    return summary, rows, mean_curves(curves)


def _sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise LoratError(f"cannot read {path}: {err.strerror or err}") from None
    return digest.hexdigest()


def tracker_manifest(weights: Path, backbone_weights: Path | None, config: Config,
                     dtype: torch.dtype | None) -> dict:
    """What identifies a tracker's results: weight file hashes, model and tracking config, dtype, lorat version."""
    data = config_to_dict(config)
    return {
        "lorat": __version__,
        "weights": {"file": str(weights), "sha256": _sha256(weights)},
        "backbone_weights": None if backbone_weights is None else {"file": str(backbone_weights),
                                                                   "sha256": _sha256(backbone_weights)},
        "dtype": dtype_name(dtype),
        "model": data["model"],
        "tracking": data["tracking"],
    }


def _labels(folders: list[Path]) -> list[str]:
    """Distinct names for result folders: the folder name, with parent names added until they differ.

    Raises:
        LoratError: the same folder is given twice.
    """
    parts = [f.resolve().parts for f in folders]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["-".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise LoratError("the same --results folder is given twice")


def _dataset_arg(text: str, split: str | None) -> tuple[str, str, str]:
    """``--dataset NAME=PATH`` (or ``NAME:SPLIT=PATH``) and ``--split`` -> (name, path, split), checked.

    Raises:
        LoratError: malformed argument, unknown dataset, empty path, two different splits, or a split the
            dataset lacks.
    """
    try:
        arg = parse_dataset_arg(text, "--dataset", names=DEFAULT_SPLIT)
    except UnknownDatasetError as err:
        raise LoratError(f"unknown evaluation dataset {err.name!r}; use one of {', '.join(DEFAULT_SPLIT)}") from None
    if arg.split is not None and split is not None and arg.split != split:
        raise LoratError(f"--dataset {text} asks for split {arg.split!r}, --split for {split!r}; give one")
    split = split or arg.split or DEFAULT_SPLIT[arg.name]
    splits = SPLITS.get(arg.name, (DEFAULT_SPLIT[arg.name],))
    if split not in splits:
        raise LoratError(f"dataset {arg.name} has no split {split!r}; use {' or '.join(splits)}")
    return arg.name, arg.path, split


def _read(name: str, path: str, split: str) -> list[TrackingSequence]:
    sequences = read_dataset(name, path, split, for_training=False)
    listing = f"{split}ing_set.txt"
    if name == "lasot" and not (Path(path) / listing).is_file():
        print(f"note: {path} has no {listing}; evaluating all {len(sequences)} sequences", file=sys.stderr)
    return sequences


def _build_parser() -> argparse.ArgumentParser:
    """``run`` (the default command: ``python -m lorat.evaluate [CONFIG] ...``) and ``score``."""
    p = argparse.ArgumentParser(prog="python -m lorat.evaluate", description="Run and score a benchmark.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    commands = p.add_subparsers(dest="command", metavar="{run,score}",
                                help="run (the default when no command is named) or score")
    run = commands.add_parser("run", help="track a benchmark and score it", description="Run and score a benchmark.")
    add_model_arguments(run, config_positional=True)
    run.add_argument("--dataset", required=True, help="NAME=PATH")
    run.add_argument("--split", help="dataset split (default: the benchmark's test split; GOT-10k: val)")
    run.add_argument("--output", type=Path, required=True)
    run.add_argument("--name", help="tracker name in the result paths (default: the config's variant)")
    run.add_argument("--repeat", type=int, default=1, help="track every sequence this many times")
    run.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    score = commands.add_parser("score", help="score result files", description="Score result files.")
    score.add_argument("--dataset", required=True, help="NAME=PATH")
    score.add_argument("--split")
    score.add_argument("--results", required=True, nargs="+", type=Path, help="one tracker's <seq>.txt folder each")
    score.add_argument("--output", type=Path, help="write metrics.json, sequences.csv and plots here")
    score.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _score(args: argparse.Namespace) -> int:
    name, path, split = _dataset_arg(args.dataset, args.split)
    if (name, split) in SUBMISSION_ONLY:
        raise LoratError(f"{name} {split} has no public ground truth to score against; submit the zip that "
                         f"python -m lorat.evaluate writes to the evaluation server")
    labels = _labels(args.results)
    sequences = _trackable(name, split, _read(name, path, split))
    results, curves = {}, {}
    for folder, label in zip(args.results, labels, strict=True):
        summary, rows, mean = score_results(name, sequences, folder)
        results[label], curves[label] = summary, mean
        if args.output:
            write_report(args.output / label, summary, rows)
    if args.output:
        plot_curves(args.output, curves, name)
    if args.json:
        print(json.dumps(results[labels[0]] if len(results) == 1 else results, indent=2))
    else:
        print(format_table(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] not in (["run"], ["score"], ["-h"], ["--help"]):
        argv.insert(0, "run")  # running is the default command
    args = _build_parser().parse_args(argv)
    return _score(args) if args.command == "score" else _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.repeat < 1 or args.batch < 1:
        raise LoratError("--repeat and --batch must be at least 1")
    name, path, split = _dataset_arg(args.dataset, args.split)
    from lorat.checkpoint.loader import load
    from lorat.evaluation.runner import track_sequences

    options = ModelOptions.from_args(args)  # the loader sets the threads
    with Distributed(options.device) as env:
        sequences = _trackable(name, split, _read(name, path, split), verbose=env.main)
        loaded = load(dataclasses.replace(options, device=env.device), say=None)
        model, config, dtype = loaded.model, loaded.config, loaded.dtype
        tracker = (args.name or config.model.variant).replace("/", "-")
        if tracker.strip(".") == "":
            raise LoratError(f"--name must be usable as a folder name, got {tracker!r}")
        runs = [args.output / name / (tracker if args.repeat == 1 else f"{tracker}_{r:03d}")
                for r in range(1, args.repeat + 1)]
        manifest = tracker_manifest(loaded.weights, loaded.backbone_weights, config, dtype)
        for folder in runs:
            claim_folder(folder, manifest, ignore=MANIFEST_IGNORED)
        offset = FILE_OFFSET.get(name, 0.0)
        for folder in runs:
            mine = [s for i, s in enumerate(sequences) if i % env.world == env.rank]
            todo = [s for s in mine if not finished(folder, s.name, len(s))]
            if len(mine) > len(todo) and env.main:
                print(f"{folder}: {len(mine) - len(todo)} finished sequences skipped (resuming)")
            track_sequences(model, config, todo, folder, offset, args.batch, dtype, progress=env.main)
        env.barrier()
        if env.main:
            _finish(name, split, sequences, runs, tracker, args.output / name)
    return 0


def _finish(name: str, split: str, sequences: list[TrackingSequence], runs: list[Path], tracker: str,
            out: Path) -> None:
    """Submission zips, or metrics averaged over the runs (table, json, csv, plots)."""
    if (name, split) in SUBMISSION_ONLY:
        loaded = [{s.name: (read_sequence(f / f"{s.name}.txt", len(s)), read_times(f / f"{s.name}_time.txt", len(s)))
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
    summary = {"success_auc": float(curves.success.mean()), "precision": float(curves.precision[P20]),
               "norm_precision": float(curves.norm_precision[P_NORM_02]), "runs": len(runs),
               "sequences": len(sequences)}
    for key in ("ao", "sr_0.5", "sr_0.75", "fps"):
        if key in summaries[0]:
            summary[key] = float(np.mean([s[key] for s in summaries]))
    trackers = _record_tracker(out / "metrics.json", tracker, summary, curves)
    plot_curves(out, {t: c for t, (_, c) in trackers.items()}, name)
    print(format_table({t: entry for t, (entry, _) in trackers.items()}))
    print(f"results in {out}" + (f" ({len(trackers)} trackers compared)" if len(trackers) > 1 else ""))


_CURVES = ("success", "precision", "norm_precision")


def _record_tracker(path: Path, tracker: str, summary: dict, curves: SequenceCurves
                    ) -> dict[str, tuple[dict, SequenceCurves]]:
    with folder_lock(path):  # evaluations of other trackers may finish into the same folder at the same moment
        return _update_metrics(path, tracker, summary, curves)


def _update_metrics(path: Path, tracker: str, summary: dict, curves: SequenceCurves
                    ) -> dict[str, tuple[dict, SequenceCurves]]:
    """Add (or replace) ``tracker`` in a dataset folder's ``metrics.json`` -- ``{tracker: summary and
    curves}`` for every tracker evaluated into that folder -- and return all of them."""
    entries: dict = {}
    if path.is_file():
        try:
            entries = json.loads(path.read_text())
            if not isinstance(entries, dict):
                raise ValueError("not a mapping")
        except (OSError, ValueError) as err:
            print(f"warning: {path} is unreadable ({err}); it now holds {tracker} only")
            entries = {}
    entries[tracker] = summary | {"curves": {f: getattr(curves, f).tolist() for f in _CURVES}}
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(entries, indent=2) + "\n"))
    out = {}
    for name, entry in entries.items():
        try:
            out[name] = ({k: v for k, v in entry.items() if k != "curves"},
                         SequenceCurves(*(np.asarray(entry["curves"][f], dtype=np.float64) for f in _CURVES)))
        except (KeyError, TypeError, ValueError):
            print(f"warning: {path}: the entry of {name} is damaged; left out of the comparison")
    return out


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
