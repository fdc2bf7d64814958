"""``python -m lorat.data.synthetic OUT --sequences N --frames M``: a LaSOT-layout dataset of
generated clips with exact ground truth.

Each clip has a textured background, a textured target that moves, bounces off the borders and
changes scale, often a look-alike distractor, and an occluder that crosses the target (frames
where it covers the target completely are flagged in ``full_occlusion.txt``). The target occupies
exactly the pixels of its box, so ``groundtruth.txt`` (LaSOT's 1-based integer ``x,y,w,h``) is
exact. With ``--photos DIR`` most backgrounds and objects are cut from real photographs and
half the targets turn and tilt. Layout: ``OUT/<category>/<category>-<k>/{img/%08d.jpg, groundtruth.txt,
full_occlusion.txt, out_of_view.txt}``, readable with ``--data lasot=OUT``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from lorat.errors import LoratError, run_cli
from lorat.files import IMAGE_EXTENSIONS
from lorat.video import read_rgb

__all__ = ["main", "make_clip", "load_photos", "write_dataset", "write_clip"]


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
        # start at least one size from the borders, or (large targets) anywhere fully inside
        self.cx = rng.uniform(w, size[0] - w) if 2 * w <= size[0] else rng.uniform(w / 2, size[0] - w / 2)
        self.cy = rng.uniform(h, size[1] - h) if 2 * h <= size[1] else rng.uniform(h / 2, size[1] - h / 2)
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


def load_images(folders: Sequence[Path], read: Callable[[Path], np.ndarray | None], max_side: int, option: str,
                kind: str) -> list[tuple[Path, np.ndarray]]:
    """``(path relative to its folder, image)`` for every file under ``folders`` that ``read`` accepts
    (it returns None for the others), shrunk to a long side of at most ``max_side``.

    Raises:
        LoratError: a folder is missing or holds no accepted image (the message names ``option`` and ``kind``).
    """
    images = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise LoratError(f"{option} folder not found: {folder}")
        found = [(path.relative_to(folder), image) for path in sorted(folder.rglob("*"))
                 if path.suffix.lower() in IMAGE_EXTENSIONS and (image := read(path)) is not None]
        if not found:
            raise LoratError(f"{option} folder {folder} holds no {kind}")
        for name, image in found:
            scale = max_side / max(image.shape[:2])
            if scale < 1:
                image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            images.append((name, image))
    return images


def load_photos(folders: Sequence[Path], max_side: int = 640) -> list[np.ndarray]:
    """Every readable image under ``folders`` (48 px or more) as RGB uint8, long side <= ``max_side``.

    Raises:
        LoratError: a folder is missing or holds no readable image.
    """
    def read(path: Path) -> np.ndarray | None:
        image = read_rgb(path)
        return image if image is not None and min(image.shape[:2]) >= 48 else None

    return [image for _, image in load_images(folders, read, max_side, "--photos", "readable image")]


def _photo_crop(rng: np.random.Generator, photos: list[np.ndarray], w: int, h: int) -> np.ndarray:
    """A random region of a random photo, resized to (h, w, 3)."""
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    frac = rng.uniform(0.15, 1.0)
    cw = max(8, min(pw, int(pw * frac)))
    ch = max(8, min(ph, int(cw * h / w)))
    x = int(rng.integers(0, pw - cw + 1))
    y = int(rng.integers(0, ph - ch + 1))
    return cv2.resize(photo[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_AREA)


class _Pose:
    """Slow in-plane rotation and out-of-plane tilt: maps the target rectangle to a quadrilateral."""

    def __init__(self, rng: np.random.Generator, enabled: bool):
        self.rot = rng.uniform(5, 30) if enabled else 0.0  # degrees
        self.tilt = rng.uniform(0.05, 0.3) if enabled else 0.0  # relative shrink of one side
        self.rates = rng.uniform(0.01, 0.06, 2)
        self.phases = rng.uniform(0, 2 * np.pi, 2)

    def quad(self, t: int, cx: float, cy: float, w: float, h: float) -> np.ndarray:
        """(4, 2) float32 corners (tl, tr, br, bl) in frame pixels."""
        yaw = self.tilt * np.sin(self.phases[1] + self.rates[1] * t)
        left, right = 1 + min(yaw, 0), 1 - max(yaw, 0)  # the far side looks shorter
        pts = np.array([[-w / 2, -h / 2 * left], [w / 2, -h / 2 * right],
                        [w / 2, h / 2 * right], [-w / 2, h / 2 * left]])
        a = np.deg2rad(self.rot * np.sin(self.phases[0] + self.rates[0] * t))
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        return (pts @ rot.T + [cx, cy]).astype(np.float32)


def _draw_quad(frame: np.ndarray, patch: np.ndarray, quad: np.ndarray) -> tuple[int, int, int, int] | None:
    """Warp ``patch`` onto ``quad`` in ``frame`` in place; return the drawn pixels' box (x, y, w, h)."""
    H, W = frame.shape[:2]
    x1, y1 = np.floor(quad.min(0)).astype(int)
    x2, y2 = np.ceil(quad.max(0)).astype(int)
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, W), min(y2, H)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    ph, pw = patch.shape[:2]
    src = np.float32([[0, 0], [pw, 0], [pw, ph], [0, ph]])
    m = cv2.getPerspectiveTransform(src, quad - np.float32([x1, y1]))
    size = (x2 - x1, y2 - y1)
    warped = cv2.warpPerspective(patch, m, size, flags=cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.full((ph, pw), 255, np.uint8), m, size, flags=cv2.INTER_NEAREST) > 0
    if not mask.any():
        return None
    frame[y1:y2, x1:x2][mask] = warped[mask]
    ys, xs = np.nonzero(mask)
    return x1 + int(xs.min()), y1 + int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def _background(rng: np.random.Generator, photos: list[np.ndarray] | None, W: int, H: int):
    """Per-frame background: a texture or a photo, static or slowly panning. Returns f(t) -> (H, W, 3)."""
    if not photos or rng.random() < 0.15:
        still = _texture(rng, H, W, int(rng.integers(6, 24)))
        return lambda t: still.copy()
    margin = rng.uniform(1.0, 1.3)
    big = _photo_crop(rng, photos, int(W * margin), int(H * margin))
    span_x, span_y = big.shape[1] - W, big.shape[0] - H
    speed = rng.uniform(0, 0.6)
    ox, oy = rng.uniform(0, span_x + 1e-6), rng.uniform(0, span_y + 1e-6)
    angle = rng.uniform(0, 2 * np.pi)

    def at(t: int) -> np.ndarray:
        x = int(np.clip(ox + speed * t * np.cos(angle), 0, span_x))
        y = int(np.clip(oy + speed * t * np.sin(angle), 0, span_y))
        return big[y:y + H, x:x + W].copy()

    return at


def _target_texture(rng: np.random.Generator, photos: list[np.ndarray] | None, tw: float, th: float,
                    two_faced: float) -> tuple[np.ndarray, bool]:
    """(the target's texture, whether it comes from photos): mostly a photo region when there are photos."""
    use_photo = bool(photos) and rng.random() < 0.85
    texture = _photo_crop(rng, photos, 96, max(8, int(96 * th / tw))) if use_photo \
        else _texture(rng, 64, 64, int(rng.integers(4, 16)))
    if use_photo and two_faced > 0 and rng.random() < two_faced:
        split = int(texture.shape[0] * rng.uniform(0.3, 0.7))
        texture[split:] = _photo_crop(rng, photos, texture.shape[1], texture.shape[0] - split)
    return texture, use_photo


def _distractor(rng: np.random.Generator, size: tuple[int, int], tw: float, th: float, texture: np.ndarray
                ) -> tuple[_Mover, np.ndarray] | None:
    """Often (40 %) a look-alike of the target: the same texture, tinted, on a path of its own."""
    if rng.random() >= 0.4:
        return None
    tint = rng.uniform(0.7, 1.3, 3)
    d_texture = np.clip(texture * tint, 0, 255).astype(np.uint8)
    return _Mover(rng, size, tw * rng.uniform(0.8, 1.2), th * rng.uniform(0.8, 1.2), 2.0), d_texture


def _occluder(rng: np.random.Generator, photos: list[np.ndarray] | None, use_photo: bool, tw: float, th: float,
              frames: int) -> tuple[np.ndarray, int, float] | None:
    """Often (60 %) an occluder larger than the target: (patch, first frame, speed)."""
    if rng.random() >= 0.6:
        return None
    ow, oh = int(tw * rng.uniform(1.2, 2.0)), int(th * rng.uniform(1.2, 2.0))
    start = int(rng.integers(0, max(1, frames - 10)))
    patch = _photo_crop(rng, photos, ow, oh) if use_photo else _texture(rng, oh, ow, 4)
    return patch, start, rng.uniform(2, 5)


def _draw_target(frame: np.ndarray, texture: np.ndarray, pose: _Pose, t: int, box: tuple[int, int, int, int]
                 ) -> tuple[int, int, int, int]:
    """Draw the target in its box (turned and tilted by ``pose``, if any); returns the box of its pixels."""
    x, y, w, h = box
    if not (pose.rot or pose.tilt):
        _paste(frame, cv2.resize(texture, (w, h), interpolation=cv2.INTER_LINEAR), x, y)
        return box
    drawn = _draw_quad(frame, texture, pose.quad(t, x + w / 2, y + h / 2, w, h))
    return box if drawn is None else drawn


def _occlude(frame: np.ndarray, occluder: tuple[np.ndarray, int, float] | None, t: int,
             box: tuple[int, int, int, int]) -> bool:
    """Draw the occluder, once it has started; whether it covers the target's box completely."""
    if occluder is None or t < occluder[1]:
        return False
    patch, start, speed = occluder
    x, y, w, h = box
    oh, ow = patch.shape[:2]
    # Crosses the target's row from the left, passing over the target once.
    ox = round(-ow + speed * (t - start) * 3)
    oy = round(y + h / 2 - oh / 2)
    _paste(frame, patch, ox, oy)
    return ox <= x and oy <= y and ox + ow >= x + w and oy + oh >= y + h


def make_clip(rng: np.random.Generator, frames: int, size: tuple[int, int] = (320, 240),
              photos: list[np.ndarray] | None = None, target_size: tuple[float, float] = (0.08, 0.3),
              two_faced: float = 0.0):
    """Yield ``(frame_rgb, (x, y, w, h) 0-based ints, fully_occluded)`` for one generated clip.

    With ``photos`` (RGB arrays, see :func:`load_photos`) backgrounds, targets, distractors and
    occluders are mostly regions of real photographs, and half the targets turn and tilt
    (perspective warps; the box is the bounding box of the target's drawn pixels).

    Args:
        target_size: range of the target's width and height as fractions of the frame's.
        two_faced: probability that a photo target is made of two different photo regions
            stacked (like two faces of a box) instead of one.
    """
    W, H = size
    background = _background(rng, photos, W, H)
    tw, th = rng.uniform(*target_size) * W, rng.uniform(*target_size) * H
    target = _Mover(rng, size, tw, th, rng.uniform(0.5, 4.0))
    texture, use_photo = _target_texture(rng, photos, tw, th, two_faced)
    pose = _Pose(rng, enabled=bool(photos) and rng.random() < 0.5)
    light = (rng.uniform(0, 0.2) if photos else 0.0, rng.uniform(0.01, 0.05), rng.uniform(0, 2 * np.pi))
    distractor = _distractor(rng, size, tw, th, texture)
    occluder = _occluder(rng, photos, use_photo, tw, th, frames)
    for t in range(frames):
        frame = background(t)
        if distractor is not None:
            dx, dy, dw, dh = distractor[0].step()
            _paste(frame, cv2.resize(distractor[1], (dw, dh)), dx, dy)
        box = _draw_target(frame, texture, pose, t, target.step())
        covered = _occlude(frame, occluder, t, box)
        if light[0]:
            gain = 1 + light[0] * np.sin(light[2] + light[1] * t)
            frame = np.clip(frame * gain, 0, 255).astype(np.uint8)
        yield frame, box, covered


def write_dataset(out: Path, sequences: int, frames: int, size: tuple[int, int] = (320, 240), seed: int = 0,
                  category: str = "synthetic", progress: bool = True,
                  photos: list[np.ndarray] | None = None, target_size: tuple[float, float] = (0.08, 0.3),
                  two_faced: float = 0.0) -> list[Path]:
    """Write ``sequences`` clips of ``frames`` frames in the LaSOT layout; returns their folders.

    ``photos``: optional real photographs for backgrounds and objects (:func:`load_photos`);
    ``target_size``, ``two_faced``: see :func:`make_clip`.
    """
    folders = []
    for k in tqdm(range(1, sequences + 1), desc="clips", unit="clip", disable=not progress):
        rng = np.random.default_rng([seed, k])
        clip = make_clip(rng, frames, size, photos, target_size, two_faced)
        folders.append(write_clip(out / category / f"{category}-{k}", clip, quality=92))
    return folders


def write_clip(folder: Path, clip: Iterable[tuple[np.ndarray, tuple[int, int, int, int] | None, bool]],
               quality: int) -> Path:
    """Write one clip in the LaSOT layout: ``img/%08d.jpg`` (JPEG ``quality``), ``groundtruth.txt``
    (1-based ``x,y,w,h``; an absent target ``0,0,0,0``), ``full_occlusion.txt`` and ``out_of_view.txt``.

    ``clip`` yields ``(frame_rgb, 0-based (x, y, w, h) or None when out of view, fully_occluded)``.
    """
    (folder / "img").mkdir(parents=True, exist_ok=True)
    boxes, occluded, gone = [], [], []
    for t, (frame, box, covered) in enumerate(clip, 1):
        cv2.imwrite(str(folder / "img" / f"{t:08d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, quality])
        boxes.append(box or (-1, -1, 0, 0))
        occluded.append(covered)
        gone.append(box is None)
    (folder / "groundtruth.txt").write_text("".join(f"{x + 1},{y + 1},{w},{h}\n" for x, y, w, h in boxes))
    (folder / "full_occlusion.txt").write_text(",".join(str(int(c)) for c in occluded) + "\n")
    (folder / "out_of_view.txt").write_text(",".join(str(int(g)) for g in gone) + "\n")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorat.data.synthetic",
                                     description="Write a LaSOT-layout dataset of generated clips.")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--sequences", type=int, default=20)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", default="320x240", help="frame size WxH")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--category", default="synthetic", help="category folder name")
    parser.add_argument("--photos", action="append", type=Path, default=[], metavar="DIR",
                        help="folder of real photographs (.jpg/.png) to cut backgrounds and objects from; repeatable")
    parser.add_argument("--target-size", default="0.08,0.3", metavar="MIN,MAX",
                        help="target width and height range as fractions of the frame's (default 0.08,0.3)")
    parser.add_argument("--two-faced", type=float, default=0.0, metavar="P",
                        help="probability of a photo target made of two stacked photo regions (default 0)")
    args = parser.parse_args(argv)
    try:
        size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(size) == 2 and min(size) >= 64
    except (ValueError, AssertionError):
        raise LoratError(f"--size must look like 320x240 (at least 64 px each), got {args.size!r}") from None
    if args.sequences < 1 or args.frames < 2:
        raise LoratError("--sequences must be >= 1 and --frames >= 2")
    try:
        target_size = tuple(float(v) for v in args.target_size.split(","))
        assert len(target_size) == 2 and 0.02 <= target_size[0] <= target_size[1] <= 0.7
    except (ValueError, AssertionError):
        raise LoratError(f"--target-size must look like 0.08,0.3 (fractions in [0.02, 0.7], MIN <= MAX), "
                         f"got {args.target_size!r}") from None
    if not 0 <= args.two_faced <= 1:
        raise LoratError(f"--two-faced must be a probability in [0, 1], got {args.two_faced}")
    photos = load_photos(args.photos) if args.photos else None
    write_dataset(args.out, args.sequences, args.frames, size, args.seed, args.category,  # type: ignore[arg-type]
                  photos=photos, target_size=target_size, two_faced=args.two_faced)  # type: ignore[arg-type]
    print(f"wrote {args.sequences} clips of {args.frames} frames to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
