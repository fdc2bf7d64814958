"""Masks from boxes, for benchmarks that score segmentation masks (the VOTS stacks).

LoRAT predicts boxes. Where masks are asked for, a box-to-mask step turns each predicted box into
a frame-sized mask:

* :func:`filled_boxes`: the box itself, filled (no model; what ``python -m lorat.vot`` answers
  without ``--sam-weights``);
* :class:`SamMasker`: Segment Anything (``pip install segment-anything``) prompted with the boxes,
  one image embedding per frame for all of them, one mask per box (SAM's single-mask output,
  logits thresholded at 0). :func:`load_sam` reads an official SAM checkpoint
  (``sam_vit_{b,l,h}_*.pth``) and builds the variant it holds from the shapes in the file.

Boxes are continuous xyxy in frame pixels, ``(N, 4)`` float; masks are ``(N, H, W)`` bool, the
size of the frame.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from lorat.errors import LoratError, WeightsError
from lorat.tracking.boxes import rasterize

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

__all__ = ["BoxMasker", "filled_boxes", "SamMasker", "SamArchitecture", "sam_architecture", "build_sam", "load_sam"]

_SAM_KEYS = ("image_encoder.patch_embed.proj.weight", "image_encoder.pos_embed", "image_encoder.neck.0.weight",
             "prompt_encoder.no_mask_embed.weight", "mask_decoder.iou_token.weight")  # a SAM has these at least
SAM_VARIANTS = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}  # (width, depth) -> name


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


@dataclass(frozen=True)
class SamArchitecture:
    """The SAM variant a checkpoint holds, read from its tensor shapes.

    Attributes:
        width, depth, heads: the image encoder's ViT.
        global_blocks: indices of the encoder blocks with global attention (the others are windowed).
        window: the windowed blocks' window size (tokens).
        patch, image_size: patch size and input size (pixels).
        mlp_ratio: the encoder's MLP hidden size / width.
        prompt_dim: the prompt encoder / mask decoder width (256 in SAM).
        decoder_mlp: the mask decoder transformer's MLP size (2048 in SAM).
    """

    width: int
    depth: int
    heads: int
    global_blocks: tuple[int, ...]
    window: int
    patch: int
    image_size: int
    mlp_ratio: float
    prompt_dim: int
    decoder_mlp: int

    @property
    def name(self) -> str:
        """``vit_b`` / ``vit_l`` / ``vit_h``, or a description of another size."""
        return SAM_VARIANTS.get((self.width, self.depth), f"ViT width {self.width}, depth {self.depth}")


def sam_architecture(state: Mapping[str, torch.Tensor], source: str = "the SAM checkpoint") -> SamArchitecture:
    """Read the SAM variant from a state dict's shapes (see :class:`SamArchitecture`).

    Raises:
        WeightsError: the tensors are not those of a Segment Anything model.
    """
    missing = [k for k in _SAM_KEYS if k not in state]
    if missing:
        raise WeightsError(f"{source} is not a Segment Anything (SAM) model: it has no {missing[0]}")
    try:
        width, _, patch, _ = state["image_encoder.patch_embed.proj.weight"].shape
        grid = state["image_encoder.pos_embed"].shape[1]
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)))
        rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
        hidden = state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
        prompt_dim = state["image_encoder.neck.0.weight"].shape[0]
        decoder_mlp = state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as err:
        raise WeightsError(f"{source} is not a Segment Anything (SAM) model: no or odd tensor {err}") from None
    global_blocks = tuple(i for i, shape in enumerate(rel) if shape[0] == 2 * grid - 1)
    windows = {(shape[0] + 1) // 2 for i, shape in enumerate(rel) if i not in global_blocks}
    if len(windows) > 1:
        raise WeightsError(f"{source}: the windowed encoder blocks disagree on their window size ({sorted(windows)})")
    return SamArchitecture(width=width, depth=depth, heads=width // rel[0][1], global_blocks=global_blocks,
                           window=windows.pop() if windows else 14, patch=patch, image_size=grid * patch,
                           mlp_ratio=hidden / width, prompt_dim=prompt_dim, decoder_mlp=decoder_mlp)


def _segment_anything():
    try:
        import segment_anything
    except ImportError:
        raise LoratError("masks from SAM need the segment-anything package: pip install 'lorat[sam]' "
                         "(or pip install segment-anything)") from None
    return segment_anything


def build_sam(arch: SamArchitecture) -> Sam:
    """A randomly initialised SAM of the given architecture (SAM's own layers and constants)."""
    _segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    embedding = arch.image_size // arch.patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.depth, embed_dim=arch.width, img_size=arch.image_size, mlp_ratio=arch.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=arch.heads, patch_size=arch.patch,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=arch.global_blocks, window_size=arch.window,
            out_chans=arch.prompt_dim),
        prompt_encoder=PromptEncoder(embed_dim=arch.prompt_dim, image_embedding_size=(embedding, embedding),
                                     input_image_size=(arch.image_size, arch.image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=arch.prompt_dim, mlp_dim=arch.decoder_mlp,
                                          num_heads=8),
            transformer_dim=arch.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of every kind: not a torch checkpoint
        raise WeightsError(f"cannot read the SAM checkpoint {path}: {str(err).splitlines()[0]}") from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a SAM state dict")
    return dict(state)


def load_sam(path: str | Path, device: str | torch.device = "cpu") -> Sam:
    """Load a Segment Anything checkpoint (``.pth`` or ``.safetensors``) onto ``device``; the variant
    (ViT-B/L/H or another size) comes from the file.

    Raises:
        LoratError: segment-anything is not installed.
        WeightsError: the file is missing, unreadable or not a SAM model.
    """
    path = Path(path)
    _segment_anything()
    if not path.is_file():
        raise WeightsError(f"SAM checkpoint {path} not found (the official ones are sam_vit_h_4b8939.pth, "
                           f"sam_vit_l_0b3195.pth, sam_vit_b_01ec64.pth)")
    state = _read_state(path)
    sam = build_sam(sam_architecture(state, str(path)))
    try:
        sam.load_state_dict(state)
    except RuntimeError as err:  # "Error(s) in loading state_dict ...:" then one line per problem
        lines = str(err).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else str(err)
        raise WeightsError(f"{path} does not fit a SAM {sam_architecture(state).name}: {detail}") from None
    return sam.to(device)


class SamMasker:
    """Box-prompted SAM masks (a :class:`BoxMasker`): one image embedding per frame, shared by all boxes.

    Args:
        sam: a Segment Anything model (see :func:`load_sam`); it runs in float32 on its device.
    """

    def __init__(self, sam: Sam):
        _segment_anything()
        from segment_anything import SamPredictor

        self.sam = sam.eval()
        self.predictor = SamPredictor(self.sam)

    @property
    def name(self) -> str:
        encoder = self.sam.image_encoder
        width, depth = encoder.patch_embed.proj.out_channels, len(encoder.blocks)
        return SAM_VARIANTS.get((width, depth), f"ViT width {width}, depth {depth}")

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
