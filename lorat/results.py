"""Result files in the community's layouts (LORAT_SPEC section 5.4, FIELD_NOTES section 4.1).

* pytracking text: ``<dir>/<seq>.txt``, one ``x<TAB>y<TAB>w<TAB>h`` line per frame (3 decimals),
  frame 1 included, in the dataset's own annotation coordinates (LaSOT: 1-based, so +1), and
  ``<seq>_time.txt`` with seconds per frame. pytracking / OSTrack analysis scripts read them as is.
* GOT-10k test submission: ``GOT10k-test.zip`` with ``<tracker>/<seq>/<seq>_00R.txt``
  (rasterised boxes, comma-separated, 4 decimals) and ``<seq>_time.txt`` (8 decimals).
* TrackingNet test submission: ``TrackingNet-test.zip`` with ``<tracker>/<seq>/<seq>.txt``
  (rasterised boxes, comma-separated, 2 decimals), as the official code writes it.

Boxes handed to these functions are xywh in 0-based pixels; ``offset`` converts to the file's
convention.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lorat.data.sequences import DatasetError, read_boxes

__all__ = ["FILE_OFFSET", "write_sequence", "read_sequence", "finished", "rasterize_xywh",
           "write_got10k_zip", "write_trackingnet_zip"]

FILE_OFFSET = {"lasot": 1.0}  # datasets whose files are 1-based (MATLAB toolkit)


def write_sequence(folder: Path, name: str, boxes: np.ndarray, times: np.ndarray, offset: float = 0.0) -> Path:
    """Write ``<name>.txt`` and ``<name>_time.txt`` atomically (a finished file is always whole)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.txt"
    shifted = np.asarray(boxes, dtype=np.float64).copy()
    shifted[:, :2] += offset
    for target, text in ((folder / f"{name}_time.txt", "".join(f"{t:.6f}\n" for t in times)),
                         (path, "".join("\t".join(f"{v:.3f}" for v in row) + "\n" for row in shifted))):
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    return path


def read_sequence(path: Path, frames: int | None = None, offset: float = 0.0) -> np.ndarray:
    """Read a result file (tabs, commas or spaces) back to 0-based xywh.

    Raises:
        DatasetError: missing file, malformed line, or not ``frames`` lines (names the file).
    """
    if not path.is_file():
        raise DatasetError(f"result file missing: {path}")
    try:
        boxes = read_boxes(path, frames)
    except DatasetError as err:
        raise DatasetError(f"results: {err}") from None
    boxes[:, :2] -= offset
    return boxes


def finished(folder: Path, name: str, frames: int) -> bool:
    """Whether a complete result file for the sequence exists (used to resume a run)."""
    path = folder / f"{name}.txt"
    if not path.is_file():
        return False
    return sum(1 for line in path.read_text().splitlines() if line.strip()) == frames


def rasterize_xywh(boxes: np.ndarray) -> np.ndarray:
    """Official submission rounding: x1, y1 floored, x2, y2 -> floor(v + 1 - 1e-4), back to xywh."""
    b = np.asarray(boxes, dtype=np.float64)
    x1, y1 = np.floor(b[:, 0]), np.floor(b[:, 1])
    x2, y2 = np.floor(b[:, 0] + b[:, 2] + 1 - 1e-4), np.floor(b[:, 1] + b[:, 3] + 1 - 1e-4)
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)


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
