"""Masks from boxes, for benchmarks that score segmentation masks (the VOTS stacks).

LoRAT predicts boxes. Where masks are asked for, a box-to-mask step turns each predicted box into
a frame-sized mask:

* :func:`filled_boxes`: the box itself, filled (no model; what ``python -m lorat.vot`` answers
  without ``--sam-weights``);
* :class:`SamMasker`: Segment Anything (``pip install segment-anything``) prompted with the boxes,
  one image embedding per frame for all of them, one mask per box (SAM's single-mask output,
  logits thresholded at 0). :func:`~lorat.checkpoint.sam.load_sam` reads, checks and loads a SAM
  checkpoint (the official ``sam_vit_{b,l,h}_*.pth``, or a smaller SAM's): see :mod:`lorat.checkpoint.sam`.

Boxes are continuous xyxy in frame pixels, ``(N, 4)`` float; masks are ``(N, H, W)`` bool, the
size of the frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from lorat.checkpoint.sam import load_sam, require_segment_anything, sam_architecture
from lorat.tracking.boxes import rasterize

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

__all__ = ["BoxMasker", "filled_boxes", "SamMasker"]


class BoxMasker(Protocol):
    """Turns one frame's boxes into masks: ``(frame (H, W, 3) uint8 RGB, boxes (N, 4) xyxy) -> (N, H, W) bool``."""

    def __call__(self, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray: ...


def filled_boxes(frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The pixels each box covers, as masks: ``(N, H, W)`` bool.

    A pixel column c belongs to a box [x1, x2) when c >= floor(x1) and c < floor(x2 + 1 - 1e-4), the
    official rasterisation (same for rows); boxes are clipped to the frame, an empty box gives an
    empty mask.
    """
    height, width = frame.shape[:2]
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    masks = np.zeros((len(b), height, width), dtype=bool)
    for mask, box, (c1, r1, c2, r2) in zip(masks, b, rasterize(b).tolist(), strict=True):
        if box[2] > box[0] and box[3] > box[1]:
            mask[max(r1, 0):min(r2, height), max(c1, 0):min(c2, width)] = True
    return masks


# ----------------------------------------------------------------------------- Segment Anything


class SamMasker:
    """Box-prompted SAM masks (a :class:`BoxMasker`): one image embedding per frame, shared by all boxes.

    Args:
        sam: a Segment Anything model (see :func:`load_sam`); it runs in float32 on its device.
    """

    def __init__(self, sam: Sam):
        require_segment_anything()
        from segment_anything import SamPredictor

        self.sam = sam.eval()
        self.predictor = SamPredictor(self.sam)

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> SamMasker:
        """The masker of a SAM checkpoint, read, checked and loaded by :func:`~lorat.checkpoint.sam.load_sam`."""
        return cls(load_sam(path, device))

    @property
    def name(self) -> str:
        """``vit_b`` / ``vit_l`` / ``vit_h``, or the size of another SAM."""
        return sam_architecture(self.sam.state_dict(), "the SAM model").name

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``frame``: (H, W, 3) uint8 RGB; ``boxes``: (N, 4) xyxy pixels -> (N, H, W) bool masks.

        Empty boxes (a target that left the frame) get empty masks and are not given to SAM.
        """
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        height, width = frame.shape[:2]
        masks = np.zeros((len(b), height, width), dtype=bool)
        keep = np.flatnonzero((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
        if len(keep) == 0:
            return masks
        self.predictor.set_image(np.ascontiguousarray(frame), image_format="RGB")  # the frame's one embedding
        prompts = torch.as_tensor(b[keep], dtype=torch.float32, device=self.predictor.device)
        prompts = self.predictor.transform.apply_boxes_torch(prompts, (height, width))
        predicted, _, _ = self.predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)
        masks[keep] = predicted[:, 0].cpu().numpy()
        self.predictor.reset_image()
        return masks
