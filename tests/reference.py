"""A literal, slow re-statement of the official tracking loop (template mask, SiamFC crop, post-processing).

Written straight from the official code's arithmetic with numpy float64 geometry and ``F.interpolate`` on integer
slices, one frame at a time, so the device-side batched implementation in ``lorat`` can be
checked against it for any grid, crop size or area factor.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def raster(v: np.ndarray) -> np.ndarray:
    return np.array([math.floor(v[0]), math.floor(v[1]), math.floor(v[2] + 1 - 1e-4),
                     math.floor(v[3] + 1 - 1e-4)])


def crop(image: np.ndarray, box: np.ndarray, factor: float, out: tuple[int, int], bg: np.ndarray,
         min_size: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image (H, W, 3) float 0-255 -> (crop (Oh, Ow, 3), s', t')."""
    h, w = image.shape[:2]
    ow, oh = out
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    bw, bh = max(box[2] - box[0], min_size), max(box[3] - box[1], min_size)
    pad = (factor - 1) * (bw + bh) / 2
    s = math.sqrt(ow * oh / ((bw + pad) * (bh + pad)))
    t = np.array([ow / 2 - cx * s, oh / 2 - cy * s])
    r = np.array([t[0], t[1], w * s + t[0], h * s + t[1]])
    r = np.array([min(max(r[0], 0), ow), min(max(r[1], 0), oh), min(max(r[2], 0), ow), min(max(r[3], 0), oh)])
    o = raster(r)
    i = raster(np.array([(o[0] - t[0]) / s, (o[1] - t[1]) / s, (o[2] - t[0]) / s, (o[3] - t[1]) / s]))
    i = np.array([min(max(i[0], 0), w), min(max(i[1], 0), h), min(max(i[2], 0), w), min(max(i[3], 0), h)])
    result = np.empty((oh, ow, 3), dtype=np.float32)
    result[:] = bg
    scale, trans = np.array([s, s]), t
    if o[2] > o[0] and o[3] > o[1] and i[2] > i[0] and i[3] > i[1]:
        src = torch.from_numpy(np.ascontiguousarray(image[i[1]:i[3], i[0]:i[2]])).permute(2, 0, 1)[None].float()
        dst = F.interpolate(src, size=(int(o[3] - o[1]), int(o[2] - o[0])), mode="bilinear", align_corners=False)
        result[o[1]:o[3], o[0]:o[2]] = dst[0].permute(1, 2, 0).numpy()
        scale = np.array([(o[2] - o[0]) / (i[2] - i[0]), (o[3] - o[1]) / (i[3] - i[1])])
        trans = np.array([o[0] - i[0] * scale[0], o[1] - i[1] * scale[1]])
    return result, scale, trans


def to_input(crop_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((crop_hwc / 255.0 - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)[None]


def track(model, cfg, frames: list[np.ndarray], init_xywh) -> tuple[np.ndarray, np.ndarray]:
    """Run the official loop on RGB uint8 frames; returns (xywh boxes (T, 4), scores (T,))."""
    m, tr = cfg.model, cfg.tracking
    first = frames[0].astype(np.float32)
    bg = first.mean(axis=(0, 1))
    box = np.array([init_xywh[0], init_xywh[1], init_xywh[0] + init_xywh[2], init_xywh[1] + init_xywh[3]], float)
    z, zs, zt = crop(first, box, tr.template_area_factor, m.template_size, bg)
    zb = np.concatenate([box[:2] * zs + zt, box[2:] * zs + zt])
    hz, wz = m.template_grid
    stride = np.array([m.template_size[0] / wz, m.template_size[1] / hz] * 2)
    c = raster(zb / stride)
    c = np.array([min(max(c[0], 0), wz), min(max(c[1], 0), hz), min(max(c[2], 0), wz), min(max(c[3], 0), hz)])
    mask = torch.zeros(1, hz, wz, dtype=torch.long)
    mask[0, c[1]:c[3], c[0]:c[2]] = 1
    z = to_input(z)
    hx, wx = m.search_grid
    window = np.outer(np.hanning(hx), np.hanning(wx)).reshape(-1)
    boxes, scores = [np.array(init_xywh, float)], [1.0]
    for frame in frames[1:]:
        image = frame.astype(np.float32)
        x, s, t = crop(image, box, tr.search_area_factor, m.search_size, bg, tr.min_object_size)
        with torch.no_grad():
            out = model(z, to_input(x), mask)
        p = torch.sigmoid(out["score_map"][0]).reshape(-1).double().numpy()
        q = (1 - tr.window_penalty) * p + tr.window_penalty * window
        k = int(np.argmax(q))
        b = out["boxes"][0].reshape(-1, 4)[k].double().numpy() * np.array(list(m.search_size) * 2)
        b = np.concatenate([(b[:2] - t) / s, (b[2:] - t) / s])
        h, w = frame.shape[:2]
        b = np.clip(b, 0, [w, h, w, h])
        if b[0] < b[2] and b[1] < b[3]:
            box = b
        boxes.append(np.concatenate([b[:2], b[2:] - b[:2]]))
        scores.append(float(p[k]))
    return np.array(boxes), np.array(scores)
