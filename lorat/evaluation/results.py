"""Result files in the community's layouts: those of pytracking, the GOT-10k toolkit and the TrackingNet
evaluation server, as the official code writes them
(``trackit/data/components/result_collector/handler/external_adaptors/``).

* pytracking text: ``<dir>/<seq>.txt``, one ``x<TAB>y<TAB>w<TAB>h`` line per frame (3 decimals),
  frame 1 included, in the dataset's own annotation coordinates (LaSOT: 1-based, so +1), and
  ``<seq>_time.txt`` with seconds per frame. pytracking / OSTrack analysis scripts read them as is.
* GOT-10k test submission: ``GOT10k-test.zip`` with ``<tracker>/<seq>/<seq>_00R.txt``
  (rasterised boxes, comma-separated, 4 decimals) and ``<seq>_time.txt`` (8 decimals).
* TrackingNet test submission: ``TrackingNet-test.zip`` with ``<tracker>/<seq>/<seq>.txt``
  (rasterised boxes, comma-separated, 2 decimals), as the official code writes it.

Boxes handed to these functions are xywh in 0-based pixels; ``offset`` converts to the file's
convention.

Reading is strict about malformed files: a line without 4 numbers, a negative width or height, or
an infinite value is an error naming the file and line. ``nan`` is allowed (a tracker that lost
the target, or a frame before the init frame): it is scored as a miss where the target is visible.
A run folder also holds ``tracker.json`` (:func:`claim_folder`), which says which tracker wrote
the results, so that a resumed run never mixes results of two trackers.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from lorat.data.sequences import DatasetError, read_boxes
from lorat.errors import LoratError
from lorat.files import RASTER_EPS, write_atomic

__all__ = ["FILE_OFFSET", "MANIFEST", "box_line", "write_sequence", "read_sequence", "read_times", "finished",
           "claim_folder", "folder_lock",
           "rasterize_xywh", "write_got10k_zip", "write_trackingnet_zip"]

FILE_OFFSET = {"lasot": 1.0}  # datasets whose files are 1-based (MATLAB toolkit)
MANIFEST = "tracker.json"  # which tracker wrote a run folder


def box_line(box) -> str:
    """One result-file line: ``x<TAB>y<TAB>w<TAB>h`` with 3 decimals (pytracking's ``%.3f``), no newline.

    The one box format of every command: the CLI, the evaluator and the app write the same text.
    """
    return "\t".join(f"{float(v):.3f}" for v in box)


def write_sequence(folder: Path, name: str, boxes: np.ndarray, times: np.ndarray, offset: float = 0.0) -> Path:
    """Write ``<name>.txt`` and ``<name>_time.txt`` atomically (a finished file is always whole)."""
    path = folder / f"{name}.txt"
    shifted = np.asarray(boxes, dtype=np.float64).copy()
    shifted[:, :2] += offset
    times_text = "".join(f"{t:.6f}\n" for t in times)
    write_atomic(folder / f"{name}_time.txt", lambda tmp: tmp.write_text(times_text))
    boxes_text = "".join(box_line(row) + "\n" for row in shifted)
    write_atomic(path, lambda tmp: tmp.write_text(boxes_text))
    return path


def _data_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines of a text file.

    Raises:
        DatasetError: the file cannot be read (names it).
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_sequence(path: Path, frames: int | None = None, offset: float = 0.0) -> np.ndarray:
    """Read a result file (tabs, commas or spaces) back to 0-based xywh; ``nan`` rows are kept.

    Raises:
        DatasetError: missing or unreadable file, malformed line, negative width or height,
            infinite value, or not ``frames`` lines (names the file, and the line where it can).
    """
    if not path.is_file():
        raise DatasetError(f"result file missing: {path}")
    try:
        boxes = read_boxes(path, frames)
    except DatasetError as err:
        raise DatasetError(f"results: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    bad = np.flatnonzero(np.isinf(boxes).any(axis=1) | (boxes[:, 2:] < 0).any(axis=1))
    if len(bad):
        line, text = _data_lines(path)[bad[0]]
        what = "an infinite value" if np.isinf(boxes[bad[0]]).any() else "a negative width or height"
        more = f" ({len(bad) - 1} more such lines)" if len(bad) > 1 else ""
        raise DatasetError(f"results: {path}:{line}: {what} in {text!r}{more}")
    boxes[:, :2] -= offset
    return boxes


def read_times(path: Path, frames: int | None = None) -> np.ndarray:
    """Read a ``<seq>_time.txt`` file: seconds per frame, ``nan`` for frames not tracked.

    Raises:
        DatasetError: unreadable file, a value that is not a number, negative or infinite, or
            (``frames`` given) not one value per frame; names the file and line.
    """
    values = []
    for line, text in _data_lines(path):
        for part in (p for p in re.split(r"[,\s;]+", text) if p):
            try:
                value = float(part)
            except ValueError:
                value = float("inf")
            if np.isinf(value) or value < 0:
                raise DatasetError(f"{path}:{line}: expected seconds per frame (a number >= 0), got {text!r}")
            values.append(value)
    if frames is not None and len(values) != frames:
        raise DatasetError(f"{path}: {len(values)} times for {frames} frames")
    return np.asarray(values, dtype=np.float64)


def finished(folder: Path, name: str, frames: int) -> bool:
    """Whether a complete result file for the sequence exists (used to resume a run)."""
    path = folder / f"{name}.txt"
    if not path.is_file():
        return False
    return len(_data_lines(path)) == frames


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (for naming what differs)."""
    if not isinstance(data, Mapping):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _has_results(folder: Path) -> bool:
    """Whether ``folder`` holds any ``.txt`` file (a result file of some tracker)."""
    try:
        return folder.is_dir() and any(p.suffix == ".txt" for p in folder.iterdir())
    except OSError as err:
        raise LoratError(f"cannot read {folder}: {err.strerror or err}") from None


def claim_folder(folder: Path, manifest: Mapping[str, Any], ignore: Sequence[str] = ()) -> None:
    """Make sure ``folder`` holds results of the tracker ``manifest`` describes, or none yet.

    A new or empty folder gets ``tracker.json``; an existing one must match (keys in ``ignore``,
    e.g. a file path or the lorat version, are recorded but not compared).

    Raises:
        LoratError: the folder holds results of another tracker, or results without
            ``tracker.json``, or cannot be written; the message names what differs.
    """
    manifest = json.loads(json.dumps(manifest))  # the form it takes in the file (lists, not tuples)
    with folder_lock(folder):  # two evaluations starting together: the second sees the first one's manifest
        _claim(folder, manifest, ignore)


def folder_lock(path: Path) -> FileLock:
    """A lock beside ``path`` (``.<name>.lock`` in its parent folder), for a short read-modify-write of it
    that another process may be doing at the same moment."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LoratError(f"cannot write {path}: {err.strerror or err}") from None
    return FileLock(path.parent / f".{path.name}.lock")


def _claim(folder: Path, manifest: Mapping[str, Any], ignore: Sequence[str]) -> None:
    path = folder / MANIFEST
    advice = "use another --output or --name, or move the old results away"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise LoratError(f"cannot read {path} ({err}); {advice}") from None
        new, before = _flatten(manifest), _flatten(old)
        diffs = [f"{k}: {before.get(k)!r} before, {new.get(k)!r} now" for k in sorted(set(new) | set(before))
                 if not any(k == i or k.startswith(f"{i}.") for i in ignore) and new.get(k) != before.get(k)]
        if diffs:
            more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise LoratError(f"{folder} holds results of another tracker ({'; '.join(diffs[:3])}{more}); {advice}")
        return
    if _has_results(folder):
        raise LoratError(f"{folder} holds results but no {MANIFEST}, so they may come from another tracker; {advice}")
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))


def rasterize_xywh(boxes: np.ndarray) -> np.ndarray:
    """Official submission rounding of (N, 4) xywh boxes, the rule of :func:`lorat.tracking.boxes.rasterize` in
    numpy (NaN rows stay NaN): x1, y1 floored, x2, y2 -> floor(v + 1 - RASTER_EPS), back to xywh."""
    b = np.asarray(boxes, dtype=np.float64)
    lo = np.floor(b[:, :2])
    hi = np.floor(b[:, :2] + b[:, 2:] + 1 - RASTER_EPS)
    return np.concatenate([lo, hi - lo], axis=1)


def _csv(rows: np.ndarray, decimals: int) -> str:
    return "".join(",".join(f"{v:.{decimals}f}" for v in row) + "\n" for row in rows)


def write_got10k_zip(path: Path, tracker: str, runs: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]]) -> Path:
    """GOT-10k test submission; ``runs[r][seq] = (boxes xywh, seconds per frame)``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for r, run in enumerate(runs, 1):
            for seq, (boxes, times) in sorted(run.items()):
                z.writestr(f"{tracker}/{seq}/{seq}_{r:03d}.txt", _csv(rasterize_xywh(boxes), 4))
                if r == 1:
                    z.writestr(f"{tracker}/{seq}/{seq}_time.txt", "".join(f"{t:.8f}\n" for t in times))
    return path


def write_trackingnet_zip(path: Path, tracker: str, run: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """TrackingNet test submission (one run)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for seq, (boxes, _) in sorted(run.items()):
            z.writestr(f"{tracker}/{seq}/{seq}.txt", _csv(rasterize_xywh(boxes), 2))
    return path
