"""Make pseudo ground truth for one target in a video: hand-placed anchor boxes, CSRT in between.

The first anchor (frame 0) is placed by hand; OpenCV's CSRT tracker carries the box forward
frame by frame. Where a look at the contact sheet shows that CSRT has drifted, add another
hand-placed anchor at that frame: the tracker is re-initialised there and carries on forward
from it. The result is one ``x,y,w,h`` line per decoded frame (0-based pixels), the format of
``bench/compare.py --gt``.

Needs OpenCV with the contrib trackers (``cv2.TrackerCSRT``), e.g. ``opencv-contrib-python-headless``
in a separate virtual environment, since it cannot sit beside ``opencv-python``.

    # look at frames to place boxes by hand (a pixel grid is drawn every 20 px)
    python bench/make_pseudo_gt.py frames clip.mp4 --at 0 120 --out-dir /tmp/frames
    # propagate, write the ground truth and contact sheets to check by eye
    python bench/make_pseudo_gt.py track clip.mp4 --anchor 0:100,80,40,120 --anchor 120:130,90,42,118 \\
        --gt clip_gt.txt --sheet clip_sheet.png --every 20
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import cv2
import numpy as np


def read_frames(path: str) -> list[np.ndarray]:
    """All decodable frames of a video, BGR, in decoding order."""
    capture = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    if not frames:
        raise SystemExit(f"{path}: no frame decoded")
    return frames


def parse_anchor(text: str) -> tuple[int, tuple[float, float, float, float]]:
    frame, box = text.split(":", 1)
    x, y, w, h = (float(v) for v in box.split(","))
    if w <= 1 or h <= 1:
        raise argparse.ArgumentTypeError(f"bad anchor box {text!r}")
    return int(frame), (x, y, w, h)


def propagate(frames: list[np.ndarray], anchors: dict[int, tuple[float, float, float, float]],
              interp_size: bool = False) -> np.ndarray:
    """One box per frame: each anchor as given, CSRT from the latest anchor elsewhere.

    With ``interp_size``, between two anchors the box keeps CSRT's centre but takes its width and
    height linearly from the two anchors (CSRT barely changes a box's size or aspect, so it cannot
    follow an object that turns or moves away); after the last anchor CSRT's box is kept.
    """
    if 0 not in anchors:
        raise SystemExit("an anchor at frame 0 is required")
    boxes = np.zeros((len(frames), 4), np.float64)
    tracker = None
    last = None
    for i, frame in enumerate(frames):
        if i in anchors:
            box = anchors[i]
            tracker = cv2.TrackerCSRT_create()
            tracker.init(frame, tuple(int(round(v)) for v in box))
        else:
            ok, found = tracker.update(frame)
            # On a lost update keep the last box: a later anchor must fix the stretch.
            box = tuple(float(v) for v in found) if ok and found[2] > 1 and found[3] > 1 else last
            if not ok:
                print(f"frame {i}: CSRT reports a loss, box kept", file=sys.stderr)
        boxes[i] = box
        last = box
    if interp_size:
        keys = sorted(anchors)
        for a, b in itertools.pairwise(keys):
            (_, _, wa, ha), (_, _, wb, hb) = anchors[a], anchors[b]
            for i in range(a + 1, b):
                t = (i - a) / (b - a)
                x, y, w, h = boxes[i]
                cx, cy = x + w / 2, y + h / 2
                w, h = wa + t * (wb - wa), ha + t * (hb - ha)
                boxes[i] = (cx - w / 2, cy - h / 2, w, h)
    return boxes


def _tile(frame: np.ndarray, box, index: int, size: int, anchor: bool) -> np.ndarray:
    """A crop around the box (box drawn, 1.5 box sizes of context each side) and the whole frame."""
    x, y, w, h = box
    H, W = frame.shape[:2]
    side = max(w, h) * 2.5 + 16
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = int(round(side))
    padded = cv2.copyMakeBorder(frame, s, s, s, s, cv2.BORDER_CONSTANT, value=(60, 60, 60))
    crop = padded[y0 + s:y0 + 2 * s, x0 + s:x0 + 2 * s]
    scale = size / s
    crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    colour = (0, 0, 255) if anchor else (0, 255, 0)
    p0 = (int(round((x - x0) * scale)), int(round((y - y0) * scale)))
    p1 = (int(round((x + w - x0) * scale)), int(round((y + h - y0) * scale)))
    cv2.rectangle(crop, p0, p1, colour, 1)
    whole = cv2.resize(frame, (size, int(round(size * H / W))), interpolation=cv2.INTER_AREA)
    k = size / W
    cv2.rectangle(whole, (int(x * k), int(y * k)), (int((x + w) * k), int((y + h) * k)), colour, 1)
    tile = np.vstack([crop, whole])
    label = f"{index}{' A' if anchor else ''}"
    cv2.putText(tile, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3)
    cv2.putText(tile, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 255), 1)
    return tile


def contact_sheet(frames, boxes, anchors, every: int, size: int = 200, columns: int = 8) -> np.ndarray:
    indices = sorted(set(range(0, len(frames), every)) | {len(frames) - 1})
    tiles = [_tile(frames[i], boxes[i], i, size, i in anchors) for i in indices]
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[r:r + columns]) for r in range(0, len(tiles), columns)]
    return np.vstack(rows)


def grid_frame(frame: np.ndarray, step: int = 20) -> np.ndarray:
    out = frame.copy()
    H, W = out.shape[:2]
    for x in range(0, W, step):
        cv2.line(out, (x, 0), (x, H - 1), (255, 255, 0) if x % 100 == 0 else (90, 90, 90), 1)
    for y in range(0, H, step):
        cv2.line(out, (0, y), (W - 1, y), (255, 255, 0) if y % 100 == 0 else (90, 90, 90), 1)
    for x in range(0, W, 100):
        cv2.putText(out, str(x), (x + 2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1)
    for y in range(100, H, 100):
        cv2.putText(out, str(y), (2, y - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("frames", help="write frames as PNG with a pixel grid, to place boxes by hand")
    f.add_argument("video")
    f.add_argument("--at", type=int, nargs="+", required=True)
    f.add_argument("--out-dir", required=True)
    f.add_argument("--box", action="append", default=[], type=parse_anchor, help="F:x,y,w,h to draw")
    f.add_argument("--gt", help="a ground-truth file whose boxes to draw (green)")
    f.add_argument("--crop", help="x0,y0,x1,y1: write only this region (grid labels keep frame coordinates)")
    f.add_argument("--zoom", type=float, default=1.0)
    t = sub.add_parser("track", help="propagate anchors with CSRT, write ground truth and a contact sheet")
    t.add_argument("video")
    t.add_argument("--anchor", action="append", required=True, type=parse_anchor, help="F:x,y,w,h (0-based)")
    t.add_argument("--gt", required=True)
    t.add_argument("--sheet")
    t.add_argument("--interp-size", action="store_true",
                   help="between anchors, CSRT's centre with the size interpolated from the anchors")
    t.add_argument("--every", type=int, default=20)
    t.add_argument("--size", type=int, default=200, help="tile width in the contact sheet")
    args = parser.parse_args(argv)

    frames = read_frames(args.video)
    print(f"{args.video}: {len(frames)} frames decoded, {frames[0].shape[1]}x{frames[0].shape[0]}")
    if args.command == "frames":
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        boxes = dict(args.box)
        gt = np.loadtxt(args.gt, delimiter=",", ndmin=2) if args.gt else None
        for i in args.at:
            image = grid_frame(frames[i])
            if gt is not None:
                x, y, w, h = gt[i]
                cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), (0, 255, 0), 1)
            if i in boxes:
                x, y, w, h = boxes[i]
                cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), (0, 0, 255), 1)
            if args.crop:
                x0, y0, x1, y1 = (int(v) for v in args.crop.split(","))
                image = image[max(y0, 0):y1, max(x0, 0):x1]
            if args.zoom != 1.0:
                image = cv2.resize(image, None, fx=args.zoom, fy=args.zoom, interpolation=cv2.INTER_NEAREST)
            cv2.putText(image, str(i), (4, image.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 255), 2)
            cv2.imwrite(str(out / f"frame_{i:05d}.png"), image)
        return 0
    anchors = dict(args.anchor)
    bad = [i for i in anchors if not 0 <= i < len(frames)]
    if bad:
        raise SystemExit(f"anchors outside the clip: {bad}")
    boxes = propagate(frames, anchors, args.interp_size)
    H, W = frames[0].shape[:2]
    with open(args.gt, "w") as fh:
        for x, y, w, h in boxes:
            fh.write(f"{x:.1f},{y:.1f},{w:.1f},{h:.1f}\n")
    print(f"wrote {args.gt}: {len(boxes)} boxes, {len(anchors)} anchors")
    outside = [i for i, (x, y, w, h) in enumerate(boxes) if x + w < 0 or y + h < 0 or x > W or y > H]
    if outside:
        print(f"warning: boxes entirely outside the frame at {outside[:10]}", file=sys.stderr)
    if args.sheet:
        cv2.imwrite(args.sheet, contact_sheet(frames, boxes, anchors, args.every, args.size))
        print(f"wrote {args.sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
