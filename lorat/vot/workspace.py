"""``python -m lorat.vot.workspace DIR``: an offline VOT-toolkit workspace with generated sequences.

    python -m lorat.vot.workspace vot-ws --weights LoRAT-B-224        # 3 sequences, box ground truth
    vot evaluate --workspace vot-ws LoRAT
    vot analysis --workspace vot-ws LoRAT

It writes, without downloading anything: ``sequences/`` (each a textured ellipse moving over
texture, in the toolkit's own format: ``color/00000001.jpg``..., ``groundtruth.txt`` or, with
several objects, ``groundtruth_000.txt``..., ``sequence``), ``sequences/list.txt``, a
``stack.yaml`` (one unsupervised experiment with the toolkit's quality analyses), ``config.yaml``
and ``trackers.ini`` with a ``LoRAT`` entry for ``python -m lorat.vot`` and the given options
(see ``python -m lorat.vot --help``). ``--masks`` writes mask ground truth (a segmentation stack:
the tracker answers masks), ``--objects N`` several objects per sequence (multi-object stack).
It is for trying the integration and the toolkit end to end; the numbers it gives are not a benchmark.
The folder may be new, empty, or hold other files, but none of those it writes: it never overwrites.
(``python -m lorat.vot_workspace`` is the older name of this command.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from lorat.errors import LoratError, listed, run_cli
from lorat.vot.server import trackers_ini

__all__ = ["main", "write_sequence", "write_workspace"]

_STACK = """\
title: lorat offline test stack ({kind})
experiments:
  baseline:
    type: unsupervised
    repetitions: 1{multiobject}
    analyses:
      - type: average_accuracy
        name: Quality
        burnin: 0
        ignore_unknown: False
        weighted: False
      - type: average_success_plot
        name: Quality plot
        burnin: 0
        ignore_unknown: False
"""


def _texture(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth random colour texture, (height, width, 3) uint8."""
    coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _mask_rle(mask: np.ndarray) -> str:
    """The toolkit's text form of a mask: ``m<x>,<y>,<w>,<h>,<run lengths>`` of its bounding crop."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].ravel()
    changes = np.flatnonzero(np.diff(crop.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], changes, [crop.size]]))
    if crop[0]:
        runs = np.concatenate([[0], runs])
    return f"m{cols[0]},{rows[0]},{cols[-1] - cols[0] + 1},{rows[-1] - rows[0] + 1}," + ",".join(map(str, runs))


def _write_new(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, which must not exist (never an overwrite, even of a file made meanwhile)."""
    try:
        with open(path, "x") as f:
            f.write(text)
    except FileExistsError:
        raise LoratError(f"{path} already exists; it is not overwritten") from None
    except OSError as err:
        raise LoratError(f"cannot write {path}: {err.strerror or err}") from None


def _make_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents); it may exist as a folder. A LoratError where it cannot be one."""
    if folder.exists() and not folder.is_dir():
        raise LoratError(f"{folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LoratError(f"cannot create the folder {folder}: {err.strerror or err}") from None


def write_sequence(folder: Path, name: str, frames: int, objects: int = 1, masks: bool = False,
                   size: tuple[int, int] = (320, 240), seed: int = 0) -> Path:
    """Write one generated sequence in the VOT format to ``folder / name``.

    Each object is a textured ellipse moving on a smooth closed path over a textured background;
    its ground truth per frame is the bounding rectangle ``x,y,w,h`` of its pixels or, with
    ``masks``, the pixel mask.

    Raises:
        LoratError: ``folder / name`` exists and is not an empty folder (nothing is overwritten), or
            cannot be written.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    root = folder / name
    if root.exists() and not (root.is_dir() and not any(root.iterdir())):
        raise LoratError(f"{root} already exists; it is not overwritten")
    _make_folder(root / "color")
    background = _texture(rng, height, width, 12) // 2 + 40
    sprites = [_texture(rng, height, width, 6) for _ in range(objects)]
    shapes = [(rng.uniform(0.08, 0.14) * width, rng.uniform(0.10, 0.18) * height) for _ in range(objects)]
    phases = rng.uniform(0, 2 * np.pi, (objects, 2))
    yy, xx = np.mgrid[0:height, 0:width]
    truth: list[list[str]] = [[] for _ in range(objects)]
    for t in range(frames):
        frame = background.copy()
        for k in range(objects):
            angle = 2 * np.pi * t / frames
            cx = width * (0.5 + 0.3 * np.cos(angle + phases[k, 0]))
            cy = height * (0.5 + 0.28 * np.sin(2 * angle + phases[k, 1]))
            ax, ay = shapes[k][0] * (1 + 0.15 * np.sin(angle)), shapes[k][1]
            inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
            frame[inside] = sprites[k][inside]
            if masks:
                truth[k].append(_mask_rle(inside))
            else:
                rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
                truth[k].append(f"{cols[0]},{rows[0]},{cols[-1] - cols[0] + 1},{rows[-1] - rows[0] + 1}")
        image = root / "color" / f"{t + 1:08d}.jpg"
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise LoratError(f"cannot encode the frame {image} as JPEG")
        try:
            with open(image, "xb") as f:
                f.write(data.tobytes())
        except OSError as err:
            raise LoratError(f"cannot write {image}: {err.strerror or err}") from None
    files = ["groundtruth.txt"] if objects == 1 else [f"groundtruth_{k:03d}.txt" for k in range(objects)]
    for file, lines in zip(files, truth, strict=True):
        _write_new(root / file, "\n".join(lines) + "\n")
    _write_new(root / "sequence", f"name={name}\nfps=30\nformat=default\nchannels.color=color/%08d.jpg\n"
                                  f"width={width}\nheight={height}\nlength={frames}\n")
    return root


def _names(sequences: int, masks: bool) -> list[str]:
    return [f"lorat-{'masks' if masks else 'boxes'}-{k + 1}" for k in range(sequences)]


def _in_the_way(folder: Path, names: Sequence[str]) -> list[str]:
    """What of the workspace ``folder`` already holds (relative paths), so that nothing is overwritten."""
    try:
        if not folder.exists():
            return []
        if not folder.is_dir():
            raise LoratError(f"{folder} is a file, not a folder")
        paths = ["config.yaml", "stack.yaml", "trackers.ini", "sequences/list.txt", *(f"sequences/{n}" for n in names)]
        return [p for p in paths if (folder / p).exists() or (folder / p).is_symlink()]
    except OSError as err:  # e.g. a folder that may not be read
        raise LoratError(f"cannot look into {folder}: {err.strerror or err}") from None


def write_workspace(folder: Path, tracker_argv: Sequence[str] = (), sequences: int = 3, frames: int = 60,
                    objects: int = 1, masks: bool = False) -> Path:
    """Write the workspace described in the module docstring to ``folder``: a new or empty folder, or one
    that holds none of the files and folders it writes (they are never overwritten).

    Raises:
        LoratError: ``folder`` holds some of them (named), is a file, or cannot be created or written;
            ``tracker_argv`` holds ``--ini``.
    """
    folder = Path(folder)
    names = _names(sequences, masks)
    entry = trackers_ini("LoRAT", tracker_argv)  # before anything is written: it checks the options
    taken = _in_the_way(folder, names)
    if taken:
        raise LoratError(f"{folder} already holds {listed(taken)}; nothing is overwritten: choose a new or empty "
                         f"folder")
    _make_folder(folder)
    _make_folder(folder / "sequences")
    for k, name in enumerate(names):
        write_sequence(folder / "sequences", name, frames + 10 * k, objects, masks, seed=k)
    _write_new(folder / "sequences" / "list.txt", "\n".join(names) + "\n")
    kind = ("mask" if masks else "box") + (f", {objects} objects" if objects > 1 else "")
    _write_new(folder / "stack.yaml", _STACK.format(kind=kind, multiobject="\n    multiobject: True"
                                                    if objects > 1 else ""))
    _write_new(folder / "trackers.ini", entry)
    _write_new(folder / "config.yaml", "stack: ./stack.yaml\nregistry:\n- ./trackers.ini\n")  # last: complete
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorat.vot.workspace",
                                description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("folder", type=Path, help="the workspace folder to create")
    p.add_argument("--sequences", type=int, default=3, help="number of sequences (default 3)")
    p.add_argument("--frames", type=int, default=60, help="frames of the first sequence; each next one has 10 more")
    p.add_argument("--objects", type=int, default=1, help="objects per sequence (default 1)")
    p.add_argument("--masks", action="store_true", help="mask ground truth instead of boxes")
    args, tracker_argv = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if min(args.sequences, args.objects) < 1 or args.frames < 2:
        raise LoratError("--sequences and --objects must be at least 1, --frames at least 2")
    from lorat.vot.server import _build_parser, check_tracker_files  # options python -m lorat.vot takes

    check_tracker_files(_build_parser().parse_args(tracker_argv))
    folder = write_workspace(args.folder, tracker_argv, args.sequences, args.frames, args.objects, args.masks)
    print(f"wrote a VOT workspace in {folder}: {args.sequences} sequence(s), the tracker LoRAT in "
          f"{folder / 'trackers.ini'}")
    print(f"next: vot evaluate --workspace {folder} LoRAT && vot analysis --workspace {folder} LoRAT")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
