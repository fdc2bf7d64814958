"""Tile evenly spaced frames of a video into one image (for READMEs and issue reports).

    python bench/contact_sheet.py box_tracked.mp4 assets/box_contact_sheet.jpg --frames 8 --columns 4

Frames are read one at a time (the video is never held in memory); each tile is labelled with
its 1-based frame number.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import cv2
import numpy as np

from lorat.errors import LoratError, run_cli
from lorat.video import open_source


def _tile(frame_rgb: np.ndarray, index: int, width: int) -> np.ndarray:
    scale = width / frame_rgb.shape[1]
    bgr = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
    tile = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    for colour, thickness in (((0, 0, 0), 4), ((255, 255, 255), 2)):
        cv2.putText(tile, f"frame {index + 1}", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, colour, thickness)
    return tile


def contact_sheet(video: str, count: int, columns: int, tile_width: int) -> np.ndarray:
    """(H, W, 3) uint8 BGR sheet of ``count`` evenly spaced frames, ``columns`` per row."""
    source = open_source(video)
    try:
        total = source.frame_count
        if not total:
            raise LoratError(f"{video}: unknown frame count; cannot space the frames evenly")
        wanted = {int(round(i * (total - 1) / max(count - 1, 1))) for i in range(count)}
        tiles, last, used = [], None, -1
        for index, frame in source:
            if frame is None:
                continue
            last = (index, frame)
            if index in wanted:
                tiles.append(_tile(frame, index, tile_width))
                used = index
        # Containers often announce a frame or two more than they decode: end on the last one.
        if last is not None and len(tiles) < len(wanted) and last[0] != used:
            tiles.append(_tile(last[1], last[0], tile_width))
    finally:
        source.close()
    if not tiles:
        raise LoratError(f"{video}: no frame could be read")
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    return np.vstack(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tile evenly spaced video frames into one image.")
    parser.add_argument("video")
    parser.add_argument("output", help="image file (.jpg or .png)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--tile-width", type=int, default=320)
    args = parser.parse_args(argv)
    if args.frames < 1 or args.columns < 1 or args.tile_width < 16:
        raise LoratError("--frames and --columns must be >= 1 and --tile-width >= 16")
    sheet = contact_sheet(args.video, args.frames, args.columns, args.tile_width)
    if not cv2.imwrite(args.output, sheet):
        raise LoratError(f"could not write {args.output} (unknown image extension or unwritable folder?)")
    print(f"wrote {args.output} ({sheet.shape[1]}x{sheet.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
