"""Training pairs: sampling, jittered SiamFC crops, augmentation, labels.

The recipe of the paper (Lin et al., ECCV 2024) as the official code implements it
(``trackit/data/methods/siamese_tracker_train/``).

Sample ``k`` of epoch ``e`` is a pure function of ``(seed, e, k)``: the epoch's sequence picker is
drawn from ``(seed, e)`` and every random choice of the sample from ``(seed, e, k)``. So any
number of worker processes, any number of training processes, and a resumed run all see exactly
the same pairs.

One sample (``PairDataset[k]``) is a dict of tensors:
    ``z`` (3, Ht, Wt) and ``x`` (3, Hs, Ws) float32 ImageNet-normalised crops;
    ``x_ref`` (3, Hr, Wr), LoRATv2 phase 2 only: the reference frame, cropped as a search region;
    ``z_feat_mask`` (Hz, Wz) int64 template foreground mask;
    ``target_box`` (4,) float32 normalised x1y1x2y2 of the target in the search crop;
    ``positive`` (Hx, Wx) bool, the response cells overlapping the target (labels of ``x`` only);
    ``skipped`` int64, unreadable images met (and replaced) while making it.

A sample that meets :data:`MAX_UNREADABLE` unreadable images, or finds no usable pair in
:data:`MAX_ATTEMPTS` tries, raises :class:`UnusableDataError` (a :class:`DatasetError`) rather
than training on nothing: a dataset whose images are all unreadable stops at its first sample.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lorat.config import ModelConfig, TrackingConfig, TrainConfig
from lorat.data.augment import color_jitter, deit3, hflip
from lorat.data.sequences import DatasetError, TrackingSequence
from lorat.tracking.boxes import rasterize
from lorat.tracking.crop import box_to_crop, crop_frames, nominal_crop_params, normalize_crops, template_mask
from lorat.video import read_rgb

__all__ = ["Source", "PairDataset", "UnusableDataError", "epoch_picker", "jittered_search_params", "search_labels"]

_MAX_TRIES = 12  # official: counter from -1, gives up past 10
MAX_ATTEMPTS = 1000  # pairs tried for one sample (each failure draws a random replacement sequence)
MAX_UNREADABLE = 100  # unreadable images one sample may meet before the data is declared unusable
_PICKER_STREAM = 0x5EED  # seeds the per-epoch dataset picker apart from the per-sample streams


class UnusableDataError(DatasetError):
    """No training pair could be made: the images are unreadable, or no box gives a valid crop.

    Raised in a DataLoader worker, it reaches the main process as ``UnusableDataError(text)``
    where ``text`` holds the worker's whole traceback; only the original one-line message is
    kept, so the user still sees one clear line.
    """

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


@dataclass
class Source:
    """A named dataset in the mixture."""

    name: str
    sequences: list[TrackingSequence]
    weight: float


def epoch_picker(sizes: list[int], weights: list[float], samples: int, rng: np.random.Generator) -> np.ndarray:
    """(samples, 2) array of (dataset, sequence) for one epoch, the official picker.

    Dataset d gets ``int(w_d * samples)`` slots (the last one the remainder), filled with
    concatenated random permutations of its sequences; all slots are then shuffled together.
    """
    total = sum(weights)
    quotas = [int(w / total * samples) for w in weights[:-1]]
    quotas.append(samples - sum(quotas))
    parts = []
    for d, (n, quota) in enumerate(zip(sizes, quotas, strict=True)):
        if quota <= 0:
            continue
        reps = math.ceil(quota / n)
        seqs = np.concatenate([rng.permutation(n) for _ in range(reps)])[:quota]
        parts.append(np.stack([np.full(quota, d), seqs], axis=1))
    picked = np.concatenate(parts)
    return picked[rng.permutation(len(picked))]


def jittered_search_params(box: np.ndarray, size: tuple[int, int], factor: float, train: TrainConfig,
                           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Nominal parameters of a ``size`` (w, h) search crop with scale and translation jitter (up to 12 tries).

    scale / exp(N(0,1) * scale_jitter) per axis; centre moved by U(-1, 1) * 0.5 * translation_jitter
    * (w * sx + h * sy) per axis; accepted when the mapped box overlaps the crop and, clipped to
    it, is at least ``min_object_size`` px on both sides. None if every try fails.
    """
    b = torch.from_numpy(box[None].astype(np.float64))
    scale, _ = nominal_crop_params(b, factor, size)
    out = np.array(size, dtype=np.float64)
    centre = (box[:2] + box[2:]) / 2
    wh = box[2:] - box[:2]
    for _ in range(_MAX_TRIES):
        s = scale[0].numpy() / np.exp(rng.standard_normal(2) * train.scale_jitter)
        t = out / 2 - centre * s
        t = t + rng.uniform(-1, 1, 2) * 0.5 * train.translation_jitter * float(wh[0] * s[0] + wh[1] * s[1])
        mapped = np.concatenate([box[:2] * s + t, box[2:] * s + t])
        clipped = np.clip(mapped, 0, np.concatenate([out, out]))
        size = clipped[2:] - clipped[:2]
        if (size >= train.min_object_size).all():
            return torch.from_numpy(s[None]), torch.from_numpy(t[None])
    return None


def search_labels(box: np.ndarray, search_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(Hx, Wx) bool: response cells whose footprint overlaps the xyxy crop box (official rule)."""
    hx, wx = grid
    scale = np.array([wx / search_size[0], hx / search_size[1]] * 2)
    c = rasterize(torch.from_numpy(box * scale)).numpy()
    c = np.clip(c, 0, [wx, hx, wx, hx])
    positive = np.zeros((hx, wx), dtype=bool)
    positive[c[1]:c[3], c[0]:c[2]] = True
    return positive


def _clean_box(box: np.ndarray, image: np.ndarray) -> np.ndarray | None:
    """Clip to the image; None if the box does not intersect it (the official data cleaning)."""
    h, w = image.shape[:2]
    b = np.clip(box, 0, [w, h, w, h])
    return b if b[0] < b[2] and b[1] < b[3] else None


class PairDataset(Dataset):
    """Map-style dataset of training pairs for one epoch at a time (call :meth:`set_epoch`)."""

    def __init__(self, sources: list[Source], model_cfg: ModelConfig, tracking: TrackingConfig,
                 train_cfg: TrainConfig, samples: int, seed: int, augment: bool = True):
        self.sources = [s for s in sources if s.weight > 0 and s.sequences]
        if not self.sources:
            raise ValueError("no dataset with a positive weight")
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.template_factor, self.search_factor = tracking.template_area_factor, tracking.search_area_factor
        self.reference_factor = tracking.reference_area_factor
        self.samples, self.seed, self.augment = samples, seed, augment
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.epoch = 0
        self.picker = np.zeros((0, 2), dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch, _PICKER_STREAM])
        self.picker = epoch_picker([len(s.sequences) for s in self.sources], list(self.weights), self.samples, rng)

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if len(self.picker) != self.samples:
            self.set_epoch(self.epoch)
        rng = np.random.default_rng([self.seed, self.epoch, int(k)])
        d, s = (int(v) for v in self.picker[k])
        skipped = 0
        for _ in range(MAX_ATTEMPTS):
            sample, unreadable = self._make(self.sources[d].sequences[s], rng)
            if sample is not None:
                sample["skipped"] = torch.tensor(skipped)
                return sample
            if unreadable is not None:
                skipped += 1
                if skipped >= MAX_UNREADABLE:
                    raise UnusableDataError(f"could not make training pair {k}: {skipped} images were unreadable "
                                            f"(the last: {unreadable}); check the dataset's image files")
            d = int(rng.choice(len(self.sources), p=self.weights))  # official: random replacement
            s = int(rng.integers(len(self.sources[d].sequences)))
        names = ", ".join(source.name for source in self.sources)
        raise UnusableDataError(f"could not make training pair {k} in {MAX_ATTEMPTS} attempts from {names}: no "
                                f"frame gives a target box that fits a crop (boxes outside the images or too small?)")

    def _make(self, seq: TrackingSequence, rng: np.random.Generator) -> tuple[dict | None, str | None]:
        """One try: (the sample, None), (None, path of an unreadable image) or (None, None).

        LoRATv2 phase 2 (a reference stream) makes triplets as the official ``increased_difficulty``
        sampler does: the pair's first frame becomes the reference, cropped as a search region, and the
        template comes from any other frame of the whole track holding the target.
        """
        track = seq.tracks[int(rng.integers(len(seq.tracks)))]
        z, x = _pick_frames(track.present, self.train_cfg.max_gap, rng)
        frames = (_aux_frame(track.present, z, rng), z, x) if self.model_cfg.reference_size else (z, x)
        images = _read_frames(seq, frames)
        if not isinstance(images, list):  # the path of an unreadable image
            return None, str(images)
        boxes = [_clean_box(track.boxes[f], image) for f, image in zip(frames, images, strict=True)]
        if any(b is None for b in boxes):
            return None, None
        params = []
        for box, (size, factor) in zip(boxes[1:], self._search_regions(), strict=True):
            jittered = jittered_search_params(box, size, factor, self.train_cfg, rng)
            if jittered is None:
                return None, None
            params.append(jittered)
        crops = self._crops(images, boxes, params)
        if self.augment:
            crops = self._augmented(crops, rng)
        return self._sample(crops), None

    def _search_regions(self) -> list[tuple[tuple[int, int], float]]:
        """(crop size, area factor) of each search region, in stream order (phase 2: reference, search)."""
        cfg, last = self.model_cfg, (self.model_cfg.search_size, self.search_factor)
        return [(cfg.reference_size, self.reference_factor), last] if cfg.reference_size else [last]

    def _crops(self, images: list[np.ndarray], boxes: list[np.ndarray],
               params: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, np.ndarray]]:
        """(crop, box) of the template, cropped with the nominal parameters, then of each search region,
        cropped with its ``params``; crops as (3, H, W) images in [0, 1], boxes xyxy in crop pixels."""
        def crop(image: np.ndarray, box: np.ndarray, scale: torch.Tensor, translation: torch.Tensor,
                 size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
            t = torch.from_numpy(image).permute(2, 0, 1)
            out, s, tr = crop_frames([t], scale, translation, size, t.float().mean((1, 2))[None])
            return out[0] / 255.0, box_to_crop(torch.from_numpy(box[None]), s, tr)[0].numpy()

        size = self.model_cfg.template_size
        nominal = nominal_crop_params(torch.from_numpy(boxes[0][None]), self.template_factor, size)
        out = [crop(images[0], boxes[0], *nominal, size)]
        for image, box, p, (size, _) in zip(images[1:], boxes[1:], params, self._search_regions(), strict=True):
            out.append(crop(image, box, *p, size))
        return out

    def _augmented(self, crops: list[tuple[torch.Tensor, np.ndarray]], rng: np.random.Generator
                   ) -> list[tuple[torch.Tensor, np.ndarray]]:
        """Flips, then colour jitter (each image on its own, template first), then DeiT-III (all alike):
        :mod:`lorat.data.augment`, in the official pipeline's order."""
        train = self.train_cfg
        out = [hflip(image, box) if rng.random() < train.flip_prob else (image, box) for image, box in crops]
        if train.color_jitter > 0:
            out = [(color_jitter(image, rng, train.color_jitter), box) for image, box in out]
        if train.deit3:
            out = list(zip(deit3([image for image, _ in out], rng), [box for _, box in out], strict=True))
        return out

    def _sample(self, crops: list[tuple[torch.Tensor, np.ndarray]]) -> dict | None:
        """The sample's tensors (labels of the last search region); None when a box, clipped to its crop,
        is empty."""
        cfg = self.model_cfg
        sizes = [cfg.template_size] + [size for size, _ in self._search_regions()]
        boxes = [np.clip(box, 0, list(size) * 2) for (_, box), size in zip(crops, sizes, strict=True)]
        if not all(b[0] < b[2] and b[1] < b[3] for b in boxes):
            return None
        images = [normalize_crops(image[None] * 255.0)[0] for image, _ in crops]
        xb = boxes[-1]
        sample = {
            "z": images[0],
            "x": images[-1],
            "z_feat_mask": template_mask(torch.from_numpy(boxes[0][None]), cfg.template_size, cfg.template_grid)[0],
            "target_box": torch.from_numpy((xb / np.array(list(cfg.search_size) * 2)).astype(np.float32)),
            "positive": torch.from_numpy(search_labels(xb, cfg.search_size, cfg.search_grid)),
        }
        if cfg.reference_size:
            sample["x_ref"] = images[1]
        return sample


def _pick_frames(present: np.ndarray, max_gap: int, rng: np.random.Generator) -> tuple[int, int]:
    """(template frame, search frame): any frame with the target present, and another one at most ``max_gap``
    frames away (the template frame itself when there is none)."""
    frames = np.flatnonzero(present)
    z = int(rng.choice(frames))
    near = frames[(np.abs(frames - z) <= max_gap) & (frames != z)]
    return z, int(rng.choice(near)) if len(near) else z


def _aux_frame(present: np.ndarray, z: int, rng: np.random.Generator) -> int:
    """LoRATv2 phase 2's template frame: any frame of the track holding the target other than ``z``
    (``z`` itself when there is none)."""
    frames = np.flatnonzero(present)
    others = frames[frames != z]
    return int(rng.choice(others)) if len(others) else z


def _read_frames(seq: TrackingSequence, frames: Sequence[int]) -> list[np.ndarray] | Path:
    """The RGB images of ``frames`` (each read once), or the path of one that cannot be read (with a warning)."""
    images: dict[int, np.ndarray] = {}
    for f in frames:
        if f not in images:
            image = read_rgb(seq.frames[f])
            if image is None:
                warnings.warn(f"unreadable image skipped: {seq.frames[f]}", stacklevel=3)
                return seq.frames[f]
            images[f] = image
    return [images[f] for f in frames]
