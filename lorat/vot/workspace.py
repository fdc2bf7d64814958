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
(``python -m lorat.vot_workspace`` is the older name of this command.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from lorat.errors import LoratError, run_cli
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


def write_sequence(folder: Path, name: str, frames: int, objects: int = 1, masks: bool = False,
                   size: tuple[int, int] = (320, 240), seed: int = 0) -> Path:
    """Write one generated sequence in the VOT format to ``folder / name``.

    Each object is a textured ellipse moving on a smooth closed path over a textured background;
    its ground truth per frame is the bounding rectangle ``x,y,w,h`` of its pixels or, with
    ``masks``, the pixel mask.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    root = folder / name
    (root / "color").mkdir(parents=True, exist_ok=True)
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
        cv2.imwrite(str(root / "color" / f"{t + 1:08d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
    files = ["groundtruth.txt"] if objects == 1 else [f"groundtruth_{k:03d}.txt" for k in range(objects)]
    for file, lines in zip(files, truth, strict=True):
        (root / file).write_text("\n".join(lines) + "\n")
    (root / "sequence").write_text(f"name={name}\nfps=30\nformat=default\nchannels.color=color/%08d.jpg\n"
                                   f"width={width}\nheight={height}\nlength={frames}\n")
    return root


def write_workspace(folder: Path, tracker_argv: Sequence[str] = (), sequences: int = 3, frames: int = 60,
                    objects: int = 1, masks: bool = False) -> Path:
    """Write the workspace described in the module docstring to ``folder`` (which must not hold one)."""
    folder = Path(folder)
    if (folder / "config.yaml").exists():
        raise LoratError(f"{folder} already holds a VOT workspace (config.yaml); choose another folder")
    names = [f"lorat-{'masks' if masks else 'boxes'}-{k + 1}" for k in range(sequences)]
    for k, name in enumerate(names):
        write_sequence(folder / "sequences", name, frames + 10 * k, objects, masks, seed=k)
    (folder / "sequences" / "list.txt").write_text("\n".join(names) + "\n")
    kind = ("mask" if masks else "box") + (f", {objects} objects" if objects > 1 else "")
    (folder / "stack.yaml").write_text(_STACK.format(kind=kind, multiobject="\n    multiobject: True"
                                                     if objects > 1 else ""))
    (folder / "config.yaml").write_text("stack: ./stack.yaml\nregistry:\n- ./trackers.ini\n")
    (folder / "trackers.ini").write_text(trackers_ini("LoRAT", tracker_argv))
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
    from lorat.vot.server import _build_parser  # the tracker options must be ones python -m lorat.vot takes

    _build_parser().parse_args(tracker_argv)
    folder = write_workspace(args.folder, tracker_argv, args.sequences, args.frames, args.objects, args.masks)
    print(f"wrote a VOT workspace in {folder}: {args.sequences} sequence(s), the tracker LoRAT in "
          f"{folder / 'trackers.ini'}")
    print(f"next: vot evaluate --workspace {folder} LoRAT && vot analysis --workspace {folder} LoRAT")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
