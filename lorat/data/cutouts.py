"""``python -m lorat.data.cutouts OUT --stamps DIR --photos DIR``: clips of real cut-out objects.

Each clip moves one object with a real silhouette (an RGBA cut-out, e.g. the photographs among
Debian's ``tuxpaint-stamps-default`` images) through a scene that looks like video: a
photograph or a plain wall as background, seen by a camera that pans, shakes and zooms; a
skin-coloured forearm that holds the object or crosses it; other cut-outs as distractors (some
of them look-alikes of the target); lighting drift, motion blur, defocus, sensor noise and JPEG
artefacts; frames from 176x144 to 640x480. The object turns in the image plane, turns out of it
(it narrows, and shows its mirror view after a half turn), breathes in scale and stretches.

The ground-truth box is the bounding box of the object's visible alpha mask (parts hidden by a
hand or a distractor still count, as in human annotations; parts outside the frame do not), so
background shows inside the box as with real objects. ``--frames 1`` writes still images: the
official recipe's static-image pairs (two jittered crops of one photo), as COCO gives them.

:class:`Variety` (``--aspect``, ``--grey``, ``--dark``, ``--salient``, ``--spin``, ``--tilt``,
``--lowres``) adds what the default mix lacks: very wide or tall targets (boards, signs, vehicles
from the side), greyscale, low-light and low-detail clips, a small distinctive part on the target (a
logo on a box: the box stays the whole object), strong in-plane rotation and perspective tilt. Each
is off by default, and off it draws no random number, so the datasets of earlier recipes are
reproduced exactly.

Layout: LaSOT's (``OUT/<category>/<category>-<k>/{img/%08d.jpg, groundtruth.txt,
full_occlusion.txt, out_of_view.txt}``), readable with ``--data lasot=OUT``. Cut-outs are sorted
into photographs and drawings by their colour statistics (:func:`is_photograph`); targets are
photographs, drawings serve as distractors. ``--holdout`` keeps a deterministic share of the
photographs out of training clips (``--use heldout`` makes validation clips from them).
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from lorat.data.synthetic import _photo_crop, load_images, load_photos, write_clip
from lorat.errors import LoratError, run_cli

__all__ = ["Cutout", "Variety", "load_cutouts", "is_photograph", "make_clip", "write_dataset", "main"]

SIZES = ((176, 144), (320, 240), (480, 360), (640, 480))  # frame sizes and their odds below
SIZE_ODDS = (0.2, 0.4, 0.25, 0.15)


@dataclass(frozen=True)
class Cutout:
    """An object cut out of a picture: (h, w, 4) uint8 RGBA cropped to its mask, and where it came from."""

    rgba: np.ndarray
    name: str
    photo: bool


@dataclass(frozen=True)
class Variety:
    """What clips may hold beyond the default mix; every field off by default.

    Attributes:
        aspect: (low, high): the target's width / height drawn log-uniformly in this range (its
            short side kept at 12 px or more); None: the cut-out's own shape, stretched a little.
        grey: odds that a clip is greyscale.
        dark: odds of a low-light clip (gain 0.12-0.4 and 2-4x the sensor noise).
        salient: odds that a small distinctive part (another cut-out, 15-35 % of the target's long
            side, inside its silhouette) rides on the target.
        spin: in-plane rotation amplitude in degrees, drawn in [spin / 2, spin] (None: 0-35 on 60 %
            of the targets).
        tilt: perspective tilt amplitude in degrees (the target's plane swings about a vertical and
            a horizontal axis, seen from 3 half-sizes away; amplitudes drawn in [tilt / 2, tilt]).
        lowres: odds of low-detail footage (recorded at 1/2.5-1/5 of the frame size, then scaled up).
    """

    aspect: tuple[float, float] | None = None
    grey: float = 0.0
    dark: float = 0.0
    salient: float = 0.0
    spin: float | None = None
    tilt: float | None = None
    lowres: float = 0.0

    def __post_init__(self):
        if self.aspect is not None and not 0 < self.aspect[0] <= self.aspect[1]:
            raise LoratError(f"the aspect range must be 0 < MIN <= MAX, got {self.aspect}")
        for name in ("grey", "dark", "salient", "lowres"):
            if not 0 <= getattr(self, name) <= 1:
                raise LoratError(f"--{name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.spin is not None and not 0 <= self.spin <= 180:
            raise LoratError(f"--spin must be in [0, 180] degrees, got {self.spin}")
        if self.tilt is not None and not 0 <= self.tilt <= 75:
            raise LoratError(f"--tilt must be in [0, 75] degrees, got {self.tilt}")


def _with_part(rng: np.random.Generator, cutout: Cutout, others: Sequence[Cutout]) -> Cutout:
    """``cutout`` with another cut-out pasted small inside its silhouette (its alpha unchanged)."""
    part = others[int(rng.integers(len(others)))].rgba
    h, w = cutout.rgba.shape[:2]
    side = max(int(rng.uniform(0.15, 0.35) * max(w, h)), 4)
    ph, pw = part.shape[:2]
    scale = side / max(ph, pw)
    size = (max(int(pw * scale), 2), max(int(ph * scale), 2))
    small = cv2.resize(part, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    inside = np.argwhere(cutout.rgba[..., 3] > 128)
    cy, cx = inside[int(rng.integers(len(inside)))] if len(inside) else (h // 2, w // 2)
    x0 = int(np.clip(cx - size[0] // 2, 0, max(w - size[0], 0)))
    y0 = int(np.clip(cy - size[1] // 2, 0, max(h - size[1], 0)))
    rgba = cutout.rgba.copy()
    region = rgba[y0:y0 + size[1], x0:x0 + size[0]]
    small = small[:region.shape[0], :region.shape[1]]
    alpha = small[..., 3:] / 255.0 * (region[..., 3:] > 128)
    region[..., :3] = np.clip(region[..., :3] * (1 - alpha) + small[..., :3] * alpha, 0, 255).astype(np.uint8)
    return Cutout(rgba, f"{cutout.name}+part", cutout.photo)


def is_photograph(rgba: np.ndarray) -> bool:
    """Whether an RGBA cut-out looks like a photograph rather than a drawing.

    Drawings are made of flat colour regions: many horizontally adjacent opaque pixels are
    identical. In photographs (sensor noise, shading) almost none are.
    """
    opaque = rgba[..., 3] > 128
    pairs = opaque[:, 1:] & opaque[:, :-1]
    if pairs.sum() < 400:
        return False
    same = (np.abs(rgba[:, 1:, :3].astype(np.int16) - rgba[:, :-1, :3]).sum(-1) == 0) & pairs
    return bool(same.sum() / pairs.sum() < 0.05)


def load_cutouts(folders: Sequence[Path], max_side: int = 320) -> list[Cutout]:
    """Every RGBA ``*.png`` under ``folders`` with a real mask, cropped to it (long side <= ``max_side``).

    Raises:
        LoratError: a folder is missing or holds no usable RGBA image.
    """
    def read(path: Path) -> np.ndarray | None:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if path.suffix.lower() == ".png" else None
        if image is None or image.ndim != 3 or image.shape[2] != 4:
            return None
        rgba = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
        ys, xs = np.nonzero(rgba[..., 3] > 128)
        if len(xs) < 400 or (rgba[..., 3] < 128).sum() < 0.05 * rgba[..., 3].size:
            return None  # too small, or no real silhouette (an opaque rectangle)
        return rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1]

    return [Cutout(rgba, str(name), is_photograph(rgba))
            for name, rgba in load_images(folders, read, max_side, "--stamps", "RGBA .png cut-out")]


def held_out(name: str, share: float) -> bool:
    """Deterministic split of cut-outs by name (the same on every machine)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


# ----------------------------------------------------------------------------- drawing


def _composite(frame: np.ndarray, rgba: np.ndarray, m: np.ndarray, blur: tuple[float, float] = (0.0, 0.0)
               ) -> np.ndarray:
    """Alpha-composite ``rgba`` warped by ``m`` (2x3 affine or 3x3 homography) onto ``frame`` in place.

    ``blur``: motion (dx, dy) in px during the exposure. Returns the warped alpha (H, W) float32 in [0, 1].
    """
    H, W = frame.shape[:2]
    warp = cv2.warpPerspective if m.shape == (3, 3) else cv2.warpAffine
    warped = warp(rgba, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                  borderValue=(0, 0, 0, 0)).astype(np.float32)
    length = float(np.hypot(*blur))
    if length >= 2:
        k = int(min(length, 31)) | 1
        kernel = np.zeros((k, k), np.float32)
        c = k // 2
        d = np.array(blur) / length
        cv2.line(kernel, (round(c - d[0] * c), round(c - d[1] * c)), (round(c + d[0] * c), round(c + d[1] * c)), 1.0)
        kernel /= kernel.sum()
        warped[..., :3] *= warped[..., 3:] / 255.0  # blur premultiplied colour
        warped = cv2.filter2D(warped, -1, kernel)
        alpha = warped[..., 3:] / 255.0
        colour = warped[..., :3] / np.maximum(alpha, 1e-3)
    else:
        alpha = warped[..., 3:] / 255.0
        colour = warped[..., :3]
    frame[:] = np.clip(frame * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8)
    return alpha[..., 0]


def _affine(cx: float, cy: float, src_w: int, src_h: int, w: float, h: float, angle: float, mirror: bool
            ) -> np.ndarray:
    """2x3 map from a (src_h, src_w) image to a w x h object turned by ``angle`` degrees about (cx, cy)."""
    sx, sy = w / src_w, h / src_h
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    scale = np.diag([-sx if mirror else sx, sy])
    lin = rot @ scale
    return np.hstack([lin, (np.array([cx, cy]) - lin @ np.array([src_w / 2, src_h / 2]))[:, None]])


def _tilted(m: np.ndarray, src_w: int, src_h: int, yaw: float, pitch: float) -> np.ndarray:
    """The 3x3 homography that first tilts a (src_h, src_w) image's plane by ``yaw`` (about its
    vertical axis) and ``pitch`` (horizontal axis), in degrees, as a pinhole camera 3 half-sizes away
    sees it, then applies the 2x3 affine ``m``; the plane's centre stays where ``m`` puts it."""
    a, b = np.deg2rad(yaw), np.deg2rad(pitch)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    x = corners[:, 0] * np.cos(a)
    z = corners[:, 0] * np.sin(a)
    y = corners[:, 1] * np.cos(b) - z * np.sin(b)
    z = corners[:, 1] * np.sin(b) + z * np.cos(b)
    depth = 3.0 / (3.0 + z)
    src = (corners + 1) / 2 * [src_w, src_h]
    seen = np.stack([(x * depth + 1) / 2 * src_w, (y * depth + 1) / 2 * src_h], 1)
    dst = seen @ m[:, :2].T + m[:, 2]
    return cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32))


def _wall(rng: np.random.Generator, W: int, H: int) -> np.ndarray:
    """A plain wall: one colour, a soft light gradient and a little texture."""
    base = rng.uniform(60, 245) * rng.uniform(0.85, 1.0, 3)
    gy, gx = np.mgrid[0:H, 0:W].astype(np.float32)
    gradient = 1 + rng.uniform(-0.25, 0.25) * (gx / W - 0.5) + rng.uniform(-0.25, 0.25) * (gy / H - 0.5)
    texture = cv2.GaussianBlur(rng.normal(0, 4, (H, W)).astype(np.float32), (0, 0), 2)
    return np.clip(base * gradient[..., None] + texture[..., None], 0, 255).astype(np.uint8)


def _skin(rng: np.random.Generator) -> np.ndarray:
    """A skin colour (RGB float), from light to dark."""
    hsv = np.uint8([[[rng.uniform(5, 20), rng.uniform(60, 150), rng.uniform(70, 240)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _arm(rng: np.random.Generator, length: int, width: int) -> np.ndarray:
    """A forearm with a fist and often a sleeve: (h, w, 4) RGBA, pointing up, the hand at the top,
    shaded across its width."""
    hand = int(width * rng.uniform(1.2, 1.6))
    h, w = length + hand, hand + 4
    canvas = np.zeros((h, w, 4), np.uint8)
    colour = _skin(rng)
    cv2.ellipse(canvas, (w // 2, hand // 2 + 2), (hand // 2, int(hand * 0.6)), 0, 0, 360, (*colour.tolist(), 255), -1)
    cv2.rectangle(canvas, ((w - width) // 2, hand // 2), ((w + width) // 2, h - 1), (*colour.tolist(), 255), -1)
    for k in range(1, 4):  # knuckle creases
        x = (w - hand) // 2 + k * hand // 4
        cv2.line(canvas, (x, 3), (x, hand // 3), (*(colour * 0.8).tolist(), 255), max(1, hand // 24))
    if rng.random() < 0.7:  # a sleeve from some way down the forearm
        top = int(hand + rng.uniform(0.5, 2.5) * width)
        sleeve = rng.uniform(20, 235, 3).tolist()
        cv2.rectangle(canvas, (0, top), (w - 1, h - 1), (*sleeve, 255), -1)
    shade = 0.75 + 0.35 * np.sin(np.linspace(0, np.pi, w))[None, :, None]
    noise = rng.normal(1, 0.03, (h, w, 1))
    canvas[..., :3] = np.clip(canvas[..., :3] * shade * noise, 0, 255).astype(np.uint8)
    return canvas


class _Path:
    """A smooth 2-D random walk inside a box, with bounces: positions in px."""

    def __init__(self, rng: np.random.Generator, start: np.ndarray, speed: float, low: np.ndarray, high: np.ndarray):
        self.rng, self.p, self.low, self.high = rng, start.astype(np.float64), low, high
        angle = rng.uniform(0, 2 * np.pi)
        self.v = speed * np.array([np.cos(angle), np.sin(angle)])
        self.speed = speed

    def step(self) -> np.ndarray:
        self.v = 0.9 * self.v + self.rng.normal(0, 0.35 * max(self.speed, 0.3), 2)
        self.p = self.p + self.v
        for i in range(2):
            if not self.low[i] <= self.p[i] <= self.high[i]:
                self.v[i] = -self.v[i]
                self.p[i] = np.clip(self.p[i], self.low[i], self.high[i])
        return self.p.copy()


@dataclass
class _Actor:
    """A cut-out on a path, with its pose over time."""

    cutout: Cutout
    path: _Path
    size: float  # long side in px
    stretch: float  # width / height multiplier applied to the natural aspect
    angle0: float
    spin: float  # in-plane rotation amplitude (deg)
    turn: float  # out-of-plane turning rate (rad / frame); 0: none
    breathe: float  # scale amplitude
    phase: np.ndarray
    tilt: tuple[float, float] = (0.0, 0.0)  # perspective tilt amplitudes (yaw, pitch; deg); 0: none

    def pose(self, t: int) -> tuple[np.ndarray, float, float, float, bool]:
        """(centre, w, h, angle, mirror) at frame ``t``."""
        centre = self.path.step()
        ch, cw = self.cutout.rgba.shape[:2]
        s = self.size * (1 + self.breathe * np.sin(self.phase[0] + 0.05 * t))
        aspect = cw / ch * self.stretch
        w, h = (s, s / aspect) if aspect >= 1 else (s * aspect, s)
        facing = np.cos(self.phase[1] + self.turn * t)
        w *= max(abs(facing), 0.3) if self.turn else 1.0
        angle = self.angle0 + self.spin * np.sin(self.phase[2] + 0.04 * t)
        return centre, w, h, angle, bool(self.turn and facing < 0)


def _actor(rng: np.random.Generator, cutout: Cutout, W: int, H: int, size: float, speed: float) -> _Actor:
    margin = np.array([0.1 * W, 0.1 * H])
    path = _Path(rng, rng.uniform(margin * 2, [W, H] - margin * 2), speed, margin, np.array([W, H]) - margin)
    stretch = float(np.exp(rng.normal(0, 0.25))) if rng.random() < 0.5 else 1.0
    return _Actor(cutout, path, size, stretch, rng.uniform(-20, 20), rng.uniform(0, 35) if rng.random() < 0.6 else 0,
                  rng.uniform(0.01, 0.06) if rng.random() < 0.4 else 0.0, rng.uniform(0, 0.3), rng.uniform(0, 6.3, 3))


def _draw(frame: np.ndarray, actor: _Actor, t: int, previous: np.ndarray | None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Draw an actor at frame ``t``; returns (its alpha mask, its centre)."""
    centre, w, h, angle, mirror = actor.pose(t)
    ch, cw = actor.cutout.rgba.shape[:2]
    m = _affine(centre[0], centre[1], cw, ch, w, h, angle, mirror)
    if any(actor.tilt):
        m = _tilted(m, cw, ch, actor.tilt[0] * np.sin(actor.phase[0] + 0.07 * t),
                    actor.tilt[1] * np.sin(actor.phase[2] + 0.05 * t))
    blur = tuple(centre - previous) if previous is not None else (0.0, 0.0)
    return _composite(frame, actor.cutout.rgba, m, blur), centre


class _Camera:
    """A larger background seen through a window that pans, shakes and zooms."""

    def __init__(self, rng: np.random.Generator, W: int, H: int, photos: Sequence[np.ndarray]):
        margin = rng.uniform(1.15, 1.5)
        BW, BH = int(W * margin), int(H * margin)
        self.background = _wall(rng, BW, BH) if not photos or rng.random() < 0.25 \
            else _photo_crop(rng, list(photos), BW, BH)
        self.pan = rng.normal(0, 0.8, 2) if rng.random() < 0.6 else np.zeros(2)
        self.shake = rng.uniform(0, 2.5) if rng.random() < 0.5 else 0.0
        self.zoom_rate = rng.uniform(-0.002, 0.002)
        self.size, self.limit = (W, H), [BW - W, BH - H]
        self.position = np.array([(BW - W) / 2, (BH - H) / 2])

    def frame(self, rng: np.random.Generator, t: int) -> np.ndarray:
        """Move the window on (one shake drawn from ``rng`` when shaking) and return what it sees at frame ``t``."""
        self.position = self.position + self.pan + (rng.normal(0, self.shake, 2) if self.shake else 0)
        self.position = np.clip(self.position, 0, self.limit)
        z = 1 + self.zoom_rate * t
        m = np.array([[z, 0, -self.position[0] * z], [0, z, -self.position[1] * z]], np.float32)
        return cv2.warpAffine(self.background, m, self.size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _distractors(rng: np.random.Generator, target: _Actor, others: Sequence[Cutout], W: int, H: int,
                 long_side: float) -> list[tuple[_Actor, bool]]:
    """0 to 2 distractors, (actor, in front of the target); some are recoloured copies of the target."""
    distractors = []
    for _ in range(int(rng.choice(3, p=(0.35, 0.4, 0.25)))):
        if rng.random() < 0.35:  # a look-alike: the same object, recoloured
            tint = rng.uniform(0.75, 1.25, 3)
            rgba = target.cutout.rgba.copy()
            rgba[..., :3] = np.clip(rgba[..., :3] * tint, 0, 255).astype(np.uint8)
            cutout = Cutout(rgba, target.cutout.name + "~", True)
        else:
            cutout = others[int(rng.integers(len(others)))]
        distractors.append((_actor(rng, cutout, W, H, long_side * rng.uniform(0.6, 1.4), rng.uniform(0.5, 4.0)),
                            rng.random() < 0.4))  # in front of the target?
    return distractors


def _draw_distractors(frame: np.ndarray, distractors: list[tuple[_Actor, bool]], front: bool, t: int,
                      previous: dict[int, np.ndarray]) -> np.ndarray:
    """Draw the distractors behind (``front`` False) or in front of the target; returns the (H, W) bool
    union of their masks."""
    covered = np.zeros(frame.shape[:2], bool)
    for k, (actor, in_front) in enumerate(distractors):
        if in_front == front:
            alpha, previous[k] = _draw(frame, actor, t, previous.get(k))
            covered |= alpha > 0.5
    return covered


@dataclass
class _Arm:
    """A forearm that holds the target (it follows it) or crosses the frame once."""

    image: np.ndarray  # RGBA, see :func:`_arm`
    holding: bool
    angle: float  # degrees
    reach: float  # where the fist is, in target long sides below (holding) or beside the target's centre
    start: int  # frame the crossing starts on

    @staticmethod
    def maybe(rng: np.random.Generator, odds: float, long_side: float, W: int, H: int, frames: int) -> _Arm | None:
        """An arm with probability ``odds`` (holding the target 65 % of the time), else None."""
        if rng.random() >= odds:
            return None
        width = int(np.clip(long_side * rng.uniform(0.3, 0.55), 10, None))
        return _Arm(_arm(rng, int(max(W, H) * 1.2), width), rng.random() < 0.65, rng.uniform(-60, 60),
                    rng.uniform(0.2, 0.45), int(rng.integers(0, max(1, frames))))

    def draw(self, frame: np.ndarray, t: int, target: np.ndarray, long_side: float, frames: int) -> np.ndarray:
        """Draw the arm at frame ``t`` by the target's centre ``target``; returns its (H, W) bool mask."""
        if self.holding:  # the fist on the target's lower part, the arm towards the bottom of the frame
            centre = target + [0, long_side * self.reach]
        else:  # crossing: sweeps from one side to the other, once
            progress = (t - self.start) / max(frames / 3, 10)
            centre = np.array([(-0.3 + 1.6 * progress) * frame.shape[1], target[1] + long_side * (self.reach - 0.3)])
        ah, aw = self.image.shape[:2]
        top = centre - np.array([aw / 2, self.image.shape[1] * 0.35])
        rot = cv2.getRotationMatrix2D((aw / 2, aw / 2), self.angle, 1.0)
        rot[:, 2] += top
        return _composite(frame, self.image, rot) > 0.5


class _Look:
    """What the camera adds: lighting drift (and a colour cast), defocus and sensor noise."""

    def __init__(self, rng: np.random.Generator):
        self.light = (rng.uniform(0, 0.25), rng.uniform(0.01, 0.05), rng.uniform(0, 6.3), rng.uniform(0.9, 1.1, 3))
        self.noise = rng.uniform(0, 7)
        self.defocus = rng.uniform(0.6, 1.6) if rng.random() < 0.25 else 0.0

    def apply(self, frame: np.ndarray, rng: np.random.Generator, t: int) -> np.ndarray:
        """The frame as the camera records it at ``t`` (the noise drawn from ``rng``)."""
        amount, rate, phase, cast = self.light
        if amount:
            gain = (1 + amount * np.sin(phase + rate * t)) * cast
            frame = np.clip(frame * gain, 0, 255).astype(np.uint8)
        if self.defocus:
            frame = cv2.GaussianBlur(frame, (0, 0), self.defocus)
        if self.noise:
            frame = np.clip(frame + rng.normal(0, self.noise, frame.shape), 0, 255).astype(np.uint8)
        return frame


def _visible_box(visible: np.ndarray, hidden: np.ndarray) -> tuple[tuple[int, int, int, int] | None, bool]:
    """(0-based (x, y, w, h) of the visible mask, fully occluded); (None, False) when under 16 px show."""
    ys, xs = np.nonzero(visible)
    if len(xs) < 16:
        return None, False
    box = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
    return box, bool((visible & ~hidden).sum() < 0.1 * visible.sum())


def make_clip(rng: np.random.Generator, frames: int, targets: Sequence[Cutout], others: Sequence[Cutout],
              photos: Sequence[np.ndarray], size: tuple[int, int] | None = None, arm_odds: float = 0.6,
              variety: Variety = Variety()
              ) -> Iterator[tuple[np.ndarray, tuple[int, int, int, int] | None, bool]]:
    """Yield ``(frame_rgb, box, fully_occluded)`` for one clip; ``box`` is 0-based ``(x, y, w, h)``
    of the target's visible mask, or None when the target is out of the frame.

    Args:
        targets: cut-outs the target is drawn from (photographs).
        others: cut-outs for distractors (anything).
        photos: RGB photographs for backgrounds.
        size: (W, H); default one of :data:`SIZES`.
        arm_odds: probability of a forearm holding (65 %) or crossing the target.
        variety: the optional kinds of target and footage (:class:`Variety`).
    """
    W, H = size or SIZES[int(rng.choice(len(SIZES), p=SIZE_ODDS))]
    camera = _Camera(rng, W, H, photos)
    # the target: 50 px at least, up to 60 % of the frame's short side
    long_side = float(np.clip(rng.uniform(0.15, 0.6) * min(W, H), 40, None))
    cutout = targets[int(rng.integers(len(targets)))]
    if variety.salient and others and rng.random() < variety.salient:
        cutout = _with_part(rng, cutout, others)
    target = _actor(rng, cutout, W, H, long_side, rng.uniform(0.3, 5.0))
    if variety.aspect is not None:  # width / height as asked: the long side grows so the short one stays >= 12 px
        aspect = float(np.exp(rng.uniform(*np.log(variety.aspect))))
        ch, cw = cutout.rgba.shape[:2]
        target.stretch = aspect / (cw / ch)
        target.size = float(min(max(target.size, 12 * max(aspect, 1 / aspect)), 0.9 * (W if aspect >= 1 else H)))
    if variety.spin is not None:
        target.spin = float(rng.uniform(variety.spin / 2, variety.spin))
    if variety.tilt:
        yaw, pitch = rng.uniform(variety.tilt / 2, variety.tilt, 2)  # one draw of two, as two draws of one
        target.tilt = (float(yaw), float(pitch))
    # the light comes from a stream of its own: a grey or dark clip has the motion (and boxes) of the bright one
    light = np.random.default_rng(int(hashlib.sha256(repr(rng.bit_generator.state).encode()).hexdigest()[:16], 16)) \
        if variety.grey or variety.dark or variety.lowres else None
    grey = bool(variety.grey and light.random() < variety.grey)
    dark = (light.uniform(0.12, 0.4), light.uniform(2, 4)) if variety.dark and light.random() < variety.dark else None
    shrink = light.uniform(2.5, 5) if variety.lowres and light.random() < variety.lowres else None
    distractors = _distractors(rng, target, others, W, H, long_side)
    arm = _Arm.maybe(rng, arm_odds, long_side, W, H, frames)
    look = _Look(rng)
    previous: dict[int, np.ndarray] = {}  # the actors' centres on the previous frame (motion blur); -1: target
    for t in range(frames):
        frame = camera.frame(rng, t)
        _draw_distractors(frame, distractors, False, t, previous)
        alpha, previous[-1] = _draw(frame, target, t, previous.get(-1))
        hidden = _draw_distractors(frame, distractors, True, t, previous)
        if arm is not None:
            hidden |= arm.draw(frame, t, previous[-1], long_side, frames)
        frame = look.apply(frame, rng, t)
        if dark is not None:  # little light: a low gain, then the sensor's noise, amplified
            gain, noise = dark
            frame = np.clip(frame * gain + light.normal(0, noise * max(look.noise, 2), frame.shape), 0, 255
                            ).astype(np.uint8)
        if grey:
            frame = cv2.cvtColor(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        if shrink is not None:  # a low-resolution sensor, its picture scaled up to the frame size
            small = (max(int(W / shrink), 8), max(int(H / shrink), 8))
            frame = cv2.resize(cv2.resize(frame, small, interpolation=cv2.INTER_AREA), (W, H),
                               interpolation=cv2.INTER_LINEAR)
        yield (frame, *_visible_box(alpha > 0.5, hidden))


def write_dataset(out: Path, sequences: int, frames: int, targets: Sequence[Cutout], others: Sequence[Cutout],
                  photos: Sequence[np.ndarray], seed: int = 0, category: str = "cutout", progress: bool = True,
                  arm_odds: float = 0.6, variety: Variety = Variety()) -> list[Path]:
    """Write ``sequences`` clips in the LaSOT layout (1-based ``groundtruth.txt``; absent: ``0,0,0,0``
    with ``out_of_view`` 1). JPEG quality varies by clip (40-92). Returns the clip folders."""
    folders = []
    for k in tqdm(range(1, sequences + 1), desc="clips", unit="clip", disable=not progress):
        rng = np.random.default_rng([seed, k])
        quality = int(rng.uniform(40, 92))
        clip = make_clip(rng, frames, targets, others, photos, arm_odds=arm_odds, variety=variety)
        folders.append(write_clip(out / category / f"{category}-{k}", clip, quality))
    return folders


def _range(text: str) -> tuple[float, float]:
    """``MIN,MAX`` -> two floats."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {text!r}") from None
    return low, high


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorat.data.cutouts",
                                     description="Write a LaSOT-layout dataset of clips of real cut-out objects.")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--stamps", action="append", type=Path, required=True, metavar="DIR",
                        help="folder of RGBA .png cut-outs (searched recursively); repeatable")
    parser.add_argument("--photos", action="append", type=Path, default=[], metavar="DIR",
                        help="folder of photographs for backgrounds; repeatable (without: plain walls)")
    parser.add_argument("--sequences", type=int, default=20)
    parser.add_argument("--frames", type=int, default=60, help="frames per clip (1: still images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--category", default="cutout", help="category folder name")
    parser.add_argument("--holdout", type=float, default=0.1, metavar="SHARE",
                        help="share of the photographic cut-outs kept out of training clips (by name; default 0.1)")
    parser.add_argument("--use", choices=("train", "heldout"), default="train",
                        help="draw targets from the training or the held-out cut-outs")
    parser.add_argument("--arm-odds", type=float, default=0.6, metavar="P",
                        help="probability that a forearm holds or crosses the target (default 0.6)")
    parser.add_argument("--aspect", type=_range, metavar="MIN,MAX",
                        help="the target's width / height, drawn log-uniformly in [MIN, MAX] (e.g. 3,8: wide, flat)")
    parser.add_argument("--grey", type=float, default=0.0, metavar="P", help="odds of a greyscale clip")
    parser.add_argument("--dark", type=float, default=0.0, metavar="P", help="odds of a low-light clip")
    parser.add_argument("--salient", type=float, default=0.0, metavar="P",
                        help="odds that a small distinctive part (a logo) rides on the target")
    parser.add_argument("--spin", type=float, metavar="DEG", help="in-plane rotation amplitude, degrees")
    parser.add_argument("--tilt", type=float, metavar="DEG",
                        help="perspective tilt amplitude, degrees (the target's plane swings towards the camera)")
    parser.add_argument("--lowres", type=float, default=0.0, metavar="P",
                        help="odds of low-detail footage (a 2.5-5x smaller picture scaled up)")
    args = parser.parse_args(argv)
    variety = Variety(args.aspect, args.grey, args.dark, args.salient, args.spin, args.tilt, args.lowres)
    if args.sequences < 1 or args.frames < 1:
        raise LoratError("--sequences and --frames must be at least 1")
    if not 0 <= args.arm_odds <= 1:
        raise LoratError(f"--arm-odds must be in [0, 1], got {args.arm_odds}")
    if not 0 <= args.holdout < 1:
        raise LoratError(f"--holdout must be in [0, 1), got {args.holdout}")
    cutouts = load_cutouts(args.stamps)
    keep_heldout = args.use == "heldout"
    targets = [c for c in cutouts if c.photo and held_out(c.name, args.holdout) == keep_heldout]
    if not targets:
        raise LoratError(f"no photographic cut-out for --use {args.use} among {len(cutouts)} in {args.stamps}")
    others = [c for c in cutouts if not (c.photo and held_out(c.name, args.holdout))]
    photos = load_photos(args.photos) if args.photos else []
    write_dataset(args.out, args.sequences, args.frames, targets, others, photos, args.seed, args.category,
                  arm_odds=args.arm_odds, variety=variety)
    print(f"wrote {args.sequences} clips of {args.frames} frames to {args.out} "
          f"({len(targets)} target cut-outs, {len(others)} distractors, {len(photos)} photos)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
