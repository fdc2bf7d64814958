"""Dataset readers: LaSOT, LaSOT_Extension, GOT-10k, TrackingNet, TNL2K, COCO 2017 and a custom layout.

Every reader returns a list of :class:`TrackingSequence`: frame paths plus one or more :class:`Track`
(boxes as continuous xyxy float64, and a per-frame "target present" flag). Layouts and
conventions, as the benchmarks' own toolkits and pytracking read them (``custom`` is this package's):

* LaSOT: ``<root>/<category>/<category>-<k>/img/%08d.jpg``, integer 1-based ``x,y,w,h`` moved to
  0-based (x - 1, y - 1); absent = ``full_occlusion`` or ``out_of_view``. Split: the
  ``training_set.txt`` / ``testing_set.txt`` files in the root when present, else all sequences.
* LaSOT_Extension: same layout, **no** -1 shift.
* GOT-10k: ``<root>/{train,val,test}/list.txt``, ``%08d.jpg``, float ``x,y,w,h`` taken as 0-based,
  ``absence.label``; ``got10k_vot_train_split.txt`` (indices into train/list.txt) in the root, if
  present, selects the VOT-excluded training split.
* TrackingNet: ``<root>/TRAIN_0..11`` and ``TEST``, ``anno/<seq>.txt`` + ``frames/<seq>/<i>.jpg``.
* TNL2K: ``<root>/<seq>/{imgs/*, groundtruth.txt}``.
* COCO 2017: ``annotations/instances_train2017.json`` + ``images/train2017/`` (or ``train2017/``);
  each image is a one-frame sequence whose non-crowd objects are separate tracks.
* custom: ``<root>/<seq>/`` with images (directly or in ``img/``), ``groundtruth.txt`` (one
  ``x,y,w,h`` per frame, 0-based pixels, commas, tabs or spaces; ``nan`` or a non-positive size
  marks an absent target) and optionally ``absence.label`` (0/1 per frame).

Cleaning for training (the official code's) happens here where the image size is not needed
(non-finite or empty boxes become absent; sequences without any present frame are dropped); the
clip-to-image and must-intersect rules are applied when a frame is loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lorat.errors import LoratError
from lorat.files import IMAGE_EXTENSIONS, natural_sorted

__all__ = ["Track", "TrackingSequence", "DatasetError", "UnknownDatasetError", "read_dataset", "DATASETS",
           "read_boxes", "init_frame", "DatasetArg", "parse_dataset_arg"]


class DatasetError(LoratError):
    """A dataset path or annotation file is missing or malformed (the message names it)."""


class UnknownDatasetError(DatasetError):
    """A dataset name that is not among the allowed ones; ``name`` is that name."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


@dataclass
class Track:
    """One target through a sequence: (T, 4) xyxy float64 boxes and (T,) bool presence."""

    boxes: np.ndarray
    present: np.ndarray

    def xywh(self) -> np.ndarray:
        """The boxes as (T, 4) xywh."""
        return np.concatenate([self.boxes[:, :2], self.boxes[:, 2:] - self.boxes[:, :2]], axis=1)


@dataclass
class TrackingSequence:
    """Frames of one video (or one image) and its annotated targets."""

    name: str
    frames: list[Path]
    tracks: list[Track]
    dataset: str = ""

    def __len__(self) -> int:
        return len(self.frames)


def _numbers(line: str) -> list[str]:
    return [p for p in re.split(r"[,\s;]+", line.strip()) if p]


def read_boxes(path: Path, expected: int | None = None) -> np.ndarray:
    """Read an ``x,y,w,h`` per line file (commas, tabs or spaces) -> (T, 4) float64 xywh.

    Raises:
        DatasetError: missing file, a line without 4 numbers, or not ``expected`` lines.
    """
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = _numbers(line)
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 4:
            raise DatasetError(f"{path}:{i}: expected 4 numbers x,y,w,h, got {line.strip()!r}")
        rows.append(values)
    if not rows:
        raise DatasetError(f"{path}: no boxes")
    if expected is not None and len(rows) != expected:
        raise DatasetError(f"{path}: {len(rows)} boxes for {expected} frames")
    return np.asarray(rows, dtype=np.float64)


def _flags(path: Path, n: int) -> np.ndarray:
    """0/1 flags, one per frame, comma- or line-separated (LaSOT, GOT-10k .label files)."""
    if not path.is_file():
        return np.zeros(n, dtype=bool)
    values = _numbers(path.read_text())
    if len(values) != n:
        raise DatasetError(f"{path}: {len(values)} flags for {n} frames")
    try:
        return np.asarray([int(float(v)) for v in values]) > 0
    except ValueError:
        raise DatasetError(f"{path}: flags must be 0 or 1") from None


def _track(xywh: np.ndarray, absent: np.ndarray | None = None) -> Track:
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    present = np.isfinite(xywh).all(axis=1) & (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
    if absent is not None:
        present &= ~absent
    return Track(boxes, present)


def _frames(folder: Path, n: int | None = None, pattern: str | None = None, start: int = 1) -> list[Path]:
    if pattern is not None and n is not None:
        return [folder / (pattern % (i + start)) for i in range(n)]
    files = natural_sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) \
        if folder.is_dir() else []
    if not files:
        raise DatasetError(f"no images in {folder}")
    return files


def _root(path: str | Path, name: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"dataset {name}: folder not found: {root}")
    return root


def _split_names(root: Path, split: str) -> set[str] | None:
    path = root / f"{split}ing_set.txt" if split in ("train", "test") else None
    if path is not None and path.is_file():
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    return None


def _lasot(root: str | Path, split: str = "train", shift: bool = True, name: str = "lasot") -> list[TrackingSequence]:
    base = _root(root, name)
    wanted = _split_names(base, split)
    dirs = sorted(d for c in base.iterdir() if c.is_dir() for d in c.iterdir() if (d / "groundtruth.txt").is_file())
    if not dirs:
        raise DatasetError(f"dataset {name}: no <category>/<sequence>/groundtruth.txt under {base}")
    sequences = []
    for d in dirs:
        if wanted is not None and d.name not in wanted:
            continue
        xywh = read_boxes(d / "groundtruth.txt")
        if shift:
            xywh[:, :2] -= 1  # LaSOT ground truth is 1-based
        n = len(xywh)
        absent = _flags(d / "full_occlusion.txt", n) | _flags(d / "out_of_view.txt", n)
        sequences.append(TrackingSequence(d.name, _frames(d / "img", n, "%08d.jpg"), [_track(xywh, absent)], name))
    return sequences


def _got10k(root: str | Path, split: str = "train") -> list[TrackingSequence]:
    base = _root(root, "got10k") / split
    listing = base / "list.txt"
    if not listing.is_file():
        raise DatasetError(f"dataset got10k: {listing} not found")
    names = [n.strip() for n in listing.read_text().splitlines() if n.strip()]
    vot_split = base.parent / "got10k_vot_train_split.txt"
    if split == "train" and vot_split.is_file():
        names = [names[int(i)] for i in vot_split.read_text().split()]
    sequences = []
    for name in names:
        d = base / name
        frames = _frames(d)
        xywh = read_boxes(d / "groundtruth.txt")
        if split != "test" and len(xywh) != len(frames):
            raise DatasetError(f"{d / 'groundtruth.txt'}: {len(xywh)} boxes for {len(frames)} frames")
        absent = _flags(d / "absence.label", len(xywh)) if split != "test" else None
        sequences.append(TrackingSequence(name, frames, [_track(xywh, absent)], "got10k"))
    return sequences


def _trackingnet(root: str | Path, split: str = "train") -> list[TrackingSequence]:
    base = _root(root, "trackingnet")
    chunks = [base / "TEST"] if split == "test" else sorted(base.glob("TRAIN_*"))
    chunks = [c for c in chunks if c.is_dir()]
    if not chunks:
        raise DatasetError(f"dataset trackingnet: no {'TEST' if split == 'test' else 'TRAIN_*'} folder in {base}")
    sequences = []
    for chunk in chunks:
        for anno in sorted((chunk / "anno").glob("*.txt")):
            xywh = read_boxes(anno)
            n = len(xywh) if split != "test" else len(list((chunk / "frames" / anno.stem).glob("*.jpg")))
            frames = _frames(chunk / "frames" / anno.stem, n, "%d.jpg", start=0)
            sequences.append(TrackingSequence(anno.stem, frames, [_track(xywh)], "trackingnet"))
    return sequences


def _tnl2k(root: str | Path, split: str = "test") -> list[TrackingSequence]:
    base = _root(root, "tnl2k")
    sequences = []
    for d in sorted(p for p in base.iterdir() if (p / "groundtruth.txt").is_file()):
        frames = _frames(d / "imgs")
        track = _track(read_boxes(d / "groundtruth.txt", len(frames)))
        sequences.append(TrackingSequence(d.name, frames, [track], "tnl2k"))
    if not sequences:
        raise DatasetError(f"dataset tnl2k: no <sequence>/groundtruth.txt under {base}")
    return sequences


def _coco_annotations(ann: Path) -> tuple[dict[int, str], dict[int, list[list[float]]]]:
    """``instances_*.json`` -> (image file names by image id, the non-crowd ``x,y,w,h`` boxes by image id)."""
    try:
        data = json.loads(ann.read_text())
        images = {img["id"]: img["file_name"] for img in data["images"]}
        objects: dict[int, list[list[float]]] = {}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0):
                objects.setdefault(a["image_id"], []).append(a["bbox"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DatasetError(f"{ann}: malformed COCO annotations ({err})") from None
    return images, objects


def _coco(root: str | Path, split: str = "train") -> list[TrackingSequence]:
    base = _root(root, "coco")
    ann = base / "annotations" / f"instances_{split}2017.json"
    if not ann.is_file():
        raise DatasetError(f"dataset coco: {ann} not found")
    images_dir = next((p for p in (base / "images" / f"{split}2017", base / f"{split}2017") if p.is_dir()), None)
    if images_dir is None:
        raise DatasetError(f"dataset coco: neither images/{split}2017 nor {split}2017 exists in {base}")
    images, objects = _coco_annotations(ann)
    sequences = []
    for image_id, boxes in sorted(objects.items()):
        tracks = [_track(np.asarray([b], dtype=np.float64)) for b in boxes]
        tracks = [t for t in tracks if t.present.any()]
        if tracks and image_id in images:
            sequences.append(TrackingSequence(str(image_id), [images_dir / images[image_id]], tracks, "coco"))
    return sequences


def _custom(root: str | Path, split: str = "train") -> list[TrackingSequence]:
    base = _root(root, "custom")
    sequences = []
    for d in sorted(p for p in base.iterdir() if (p / "groundtruth.txt").is_file()):
        frames = _frames(d / "img" if (d / "img").is_dir() else d)
        xywh = read_boxes(d / "groundtruth.txt", len(frames))
        track = _track(xywh, _flags(d / "absence.label", len(frames)))
        sequences.append(TrackingSequence(d.name, frames, [track], "custom"))
    if not sequences:
        raise DatasetError(f"dataset custom: no <sequence>/groundtruth.txt folders under {base}")
    return sequences


DATASETS: dict[str, Callable[..., list[TrackingSequence]]] = {
    "lasot": _lasot,
    "lasot_ext": lambda root, split="test": _lasot(root, "all", shift=False, name="lasot_ext"),
    "got10k": _got10k,
    "trackingnet": _trackingnet,
    "tnl2k": _tnl2k,
    "coco": _coco,
    "custom": _custom,
}


def read_dataset(name: str, root: str | Path, split: str = "train", for_training: bool = True
                 ) -> list[TrackingSequence]:
    """Read one dataset; with ``for_training`` drop targets and sequences never present.

    Raises:
        DatasetError: unknown name, missing folder or malformed annotations (named in the message).
    """
    if name not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}", name)
    sequences = DATASETS[name](root, split)
    if for_training:
        for seq in sequences:
            seq.tracks = [t for t in seq.tracks if t.present.any()]
        sequences = [s for s in sequences if s.tracks]
        if not sequences:
            raise DatasetError(f"dataset {name} at {root}: no sequence with a visible target")
    return sequences


def init_frame(seq: TrackingSequence) -> int | None:
    """Index of the frame a sequence starts on: the first with the target present (None: never)."""
    present = np.flatnonzero(seq.tracks[0].present[:len(seq)])
    return int(present[0]) if len(present) else None


class DatasetArg(NamedTuple):
    """A ``NAME=PATH`` or ``NAME:SPLIT=PATH`` command-line argument; ``split`` is None when not given."""

    name: str
    path: str
    split: str | None


def parse_dataset_arg(text: str, option: str, names: Collection[str] = DATASETS) -> DatasetArg:
    """Parse ``NAME=PATH`` or ``NAME:SPLIT=PATH``, the value of ``option`` (``--data``, ``--dataset``, ...).

    ``names``: the datasets allowed here (default: every reader of :data:`DATASETS`), in the order the
    messages list them. The path is kept as given; whether it exists is the reader's business.

    Raises:
        UnknownDatasetError: the name is not among ``names``.
        DatasetError: no ``=``, an empty or malformed ``SPLIT``, or nothing after ``=``.
    """
    head, equals, path = text.partition("=")
    if not equals:
        raise DatasetError(f"{option} expects NAME=PATH, got {text!r} (names: {', '.join(names)})")
    name, colon, split = head.partition(":")
    if name not in names or name not in DATASETS:
        raise UnknownDatasetError(f"{option}: unknown dataset {name!r}; known: {', '.join(names)}", name)
    if colon and (not split or ":" in split):
        raise DatasetError(f"{option} expects NAME:SPLIT=PATH with one non-empty SPLIT, got {text!r}")
    if not path.strip():
        raise DatasetError(f"{option} {head}= needs a path after '='")
    return DatasetArg(name, path, split if colon else None)
