"""``python -m lorat.data.synthetic OUT --sequences N --frames M``: a LaSOT-layout dataset of
generated clips with exact ground truth.

Each clip has a textured background, a textured target that moves, bounces off the borders and
changes scale, often a look-alike distractor, and an occluder that crosses the target (frames
where it covers the target completely are flagged in ``full_occlusion.txt``). The target occupies
exactly the pixels of its box, so ``groundtruth.txt`` (LaSOT's 1-based integer ``x,y,w,h``) is
exact. Layout: ``OUT/<category>/<category>-<k>/{img/%08d.jpg, groundtruth.txt,
full_occlusion.txt, out_of_view.txt}``, readable with ``--data lasot=OUT``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from lorat.errors import LoratError, run_cli

__all__ = ["main", "make_clip", "write_dataset"]


def _texture(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """Smooth random colour field with some blobs: (h, w, 3) uint8."""
    low = rng.integers(0, 256, (max(2, h // scale), max(2, w // scale), 3)).astype(np.uint8)
    tex = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(2, 8))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(2, max(3, w // 4))), int(rng.integers(2, max(3, h // 4))))
        cv2.ellipse(tex, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    noise = rng.normal(0, 6, tex.shape)
    return np.clip(tex + noise, 0, 255).astype(np.uint8)


def _paste(frame: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    h, w = frame.shape[:2]
    ph, pw = patch.shape[:2]
    x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + pw, w), min(y + ph, h)
    if x1 < x2 and y1 < y2:
        frame[y1:y2, x1:x2] = patch[y1 - y:y2 - y, x1 - x:x2 - x]


class _Mover:
    """A box that drifts with a random-walk velocity, bounces off the borders and breathes in scale."""

    def __init__(self, rng: np.random.Generator, size: tuple[int, int], w: float, h: float, speed: float):
        self.rng, self.size = rng, size
        self.w0, self.h0 = w, h
        self.cx = rng.uniform(w, size[0] - w)
        self.cy = rng.uniform(h, size[1] - h)
        angle = rng.uniform(0, 2 * np.pi)
        self.vx, self.vy = speed * np.cos(angle), speed * np.sin(angle)
        self.phase, self.rate, self.amp = rng.uniform(0, 6.3), rng.uniform(0.02, 0.08), rng.uniform(0.0, 0.35)
        self.t = 0

    def step(self) -> tuple[int, int, int, int]:
        s = 1 + self.amp * np.sin(self.phase + self.rate * self.t)
        w, h = max(8, round(self.w0 * s)), max(8, round(self.h0 * s))
        self.vx += self.rng.normal(0, 0.4)
        self.vy += self.rng.normal(0, 0.4)
        self.cx += self.vx
        self.cy += self.vy
        W, H = self.size
        if not w / 2 <= self.cx <= W - w / 2:
            self.vx = -self.vx
            self.cx = min(max(self.cx, w / 2), W - w / 2)
        if not h / 2 <= self.cy <= H - h / 2:
            self.vy = -self.vy
            self.cy = min(max(self.cy, h / 2), H - h / 2)
        self.t += 1
        return round(self.cx - w / 2), round(self.cy - h / 2), w, h


def make_clip(rng: np.random.Generator, frames: int, size: tuple[int, int] = (320, 240)):
    """Yield ``(frame_rgb, (x, y, w, h) 0-based ints, fully_occluded)`` for one generated clip."""
    W, H = size
    background = _texture(rng, H, W, int(rng.integers(6, 24)))
    tw, th = rng.uniform(0.08, 0.3) * W, rng.uniform(0.08, 0.3) * H
    target = _Mover(rng, size, tw, th, rng.uniform(0.5, 4.0))
    texture = _texture(rng, 64, 64, int(rng.integers(4, 16)))
    distractor = None
    if rng.random() < 0.4:  # a look-alike: the same texture, tinted
        tint = rng.uniform(0.7, 1.3, 3)
        d_texture = np.clip(texture * tint, 0, 255).astype(np.uint8)
        distractor = (_Mover(rng, size, tw * rng.uniform(0.8, 1.2), th * rng.uniform(0.8, 1.2), 2.0), d_texture)
    occluder = None
    if rng.random() < 0.6:
        ow, oh = int(tw * rng.uniform(1.2, 2.0)), int(th * rng.uniform(1.2, 2.0))
        start = int(rng.integers(0, max(1, frames - 10)))
        occluder = (_texture(rng, oh, ow, 4), start, rng.uniform(2, 5))
    for t in range(frames):
        frame = background.copy()
        if distractor is not None:
            dx, dy, dw, dh = distractor[0].step()
            _paste(frame, cv2.resize(distractor[1], (dw, dh)), dx, dy)
        x, y, w, h = target.step()
        _paste(frame, cv2.resize(texture, (w, h), interpolation=cv2.INTER_LINEAR), x, y)
        covered = False
        if occluder is not None and t >= occluder[1]:
            patch, start, speed = occluder
            oh, ow = patch.shape[:2]
            # Crosses the target's row from the left, passing over the target once.
            ox = round(-ow + speed * (t - start) * 3)
            oy = round(y + h / 2 - oh / 2)
            _paste(frame, patch, ox, oy)
            covered = ox <= x and oy <= y and ox + ow >= x + w and oy + oh >= y + h
        yield frame, (x, y, w, h), covered


def write_dataset(out: Path, sequences: int, frames: int, size: tuple[int, int] = (320, 240), seed: int = 0,
                  category: str = "synthetic", progress: bool = True) -> list[Path]:
    """Write ``sequences`` clips of ``frames`` frames in the LaSOT layout; returns their folders."""
    folders = []
    for k in tqdm(range(1, sequences + 1), desc="clips", unit="clip", disable=not progress):
        rng = np.random.default_rng([seed, k])
        folder = out / category / f"{category}-{k}"
        (folder / "img").mkdir(parents=True, exist_ok=True)
        boxes, occluded = [], []
        for t, (frame, box, covered) in enumerate(make_clip(rng, frames, size), 1):
            cv2.imwrite(str(folder / "img" / f"{t:08d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 92])
            boxes.append(box)
            occluded.append(covered)
        (folder / "groundtruth.txt").write_text("".join(f"{x + 1},{y + 1},{w},{h}\n" for x, y, w, h in boxes))
        (folder / "full_occlusion.txt").write_text(",".join(str(int(c)) for c in occluded) + "\n")
        (folder / "out_of_view.txt").write_text(",".join("0" for _ in boxes) + "\n")
        folders.append(folder)
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorat.data.synthetic",
                                     description="Write a LaSOT-layout dataset of generated clips.")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--sequences", type=int, default=20)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", default="320x240", help="frame size WxH")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--category", default="synthetic", help="category folder name")
    args = parser.parse_args(argv)
    try:
        size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(size) == 2 and min(size) >= 64
    except (ValueError, AssertionError):
        raise LoratError(f"--size must look like 320x240 (at least 64 px each), got {args.size!r}") from None
    if args.sequences < 1 or args.frames < 2:
        raise LoratError("--sequences must be >= 1 and --frames >= 2")
    write_dataset(args.out, args.sequences, args.frames, size, args.seed, args.category)  # type: ignore[arg-type]
    print(f"wrote {args.sequences} clips of {args.frames} frames to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
