"""Segment Anything (SAM) checkpoints: detected, checked, then loaded, before SAM takes any memory.

The masks of the VOT integration (:mod:`lorat.vot.masks`) come from a SAM checkpoint
(``pip install segment-anything``). Like the weight formats of :mod:`lorat.checkpoint.formats`,
a file goes through three steps:

* **detect** (:func:`read_sam_state`): read safely (safetensors, or ``torch.load(weights_only=True)``;
  ``{"model": ...}`` is unwrapped) and look for the tensors every SAM has;
* **check** (:func:`check_sam`), before any model is built: no zero-size dimension, no tensor that
  declares more values than the file stores (expanded or shared storage), an architecture read
  from the shapes that is consistent (:func:`sam_architecture`) and within what SAM's own models
  need at run time, an implied size the file's values can fill, then every name and shape against a
  shape-only build (the meta device) of that architecture (:func:`sam_shapes`);
* **load** (:func:`sam_from_state`): the model is built on the meta device and takes the file's
  tensors as they are (no random initialisation, no second copy).

The variants segment-anything knows (ViT-B/L/H, the official files ``sam_vit_b_01ec64.pth``,
``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``) are recognised by comparing the file's
architecture with shape-only builds of ``segment_anything.sam_model_registry`` and are built by
those builders; a file of another size (a small SAM for tests) is built from its shapes with SAM's
layers and the same checks. Every problem is a one-line :class:`~lorat.errors.WeightsError`
naming the file.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorat.checkpoint.files import torch_load_safely
from lorat.errors import LoratError, WeightsError, first_line, listed

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

__all__ = ["OFFICIAL_FILES", "SamArchitecture", "require_segment_anything", "official_variants", "sam_architecture",
           "sam_shapes", "check_sam", "build_sam", "read_sam_state", "sam_from_state", "load_sam"]

OFFICIAL_FILES = ("sam_vit_h_4b8939.pth", "sam_vit_l_0b3195.pth", "sam_vit_b_01ec64.pth")  # Meta's releases

_ENCODER = "image_encoder."
_DETECT_KEYS = ("image_encoder.patch_embed.proj.weight", "image_encoder.pos_embed", "image_encoder.neck.0.weight",
                "prompt_encoder.no_mask_embed.weight", "mask_decoder.iou_token.weight")  # every SAM has these
_BLOCK = re.compile(r"image_encoder\.blocks\.(\d+)\.")

StateDict = Mapping[str, torch.Tensor]


def require_segment_anything() -> Any:
    """The ``segment_anything`` module, or a :class:`LoratError` that says how to install it."""
    try:
        import segment_anything
    except ImportError:
        raise LoratError("masks from SAM need the segment-anything package: pip install 'lorat[sam]' "
                         "(or pip install segment-anything)") from None
    return segment_anything


@dataclass(frozen=True)
class SamArchitecture:
    """The SAM a checkpoint holds, read from its tensor shapes.

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
    def grid(self) -> int:
        """Tokens per side of the image encoder."""
        return self.image_size // self.patch

    @property
    def official(self) -> str | None:
        """``vit_b`` / ``vit_l`` / ``vit_h`` when segment-anything builds exactly this architecture."""
        return next((name for name, (arch, _) in official_variants().items() if arch == self), None)

    @property
    def name(self) -> str:
        """``vit_b`` / ``vit_l`` / ``vit_h``, or a description of another size."""
        return self.official or f"ViT width {self.width}, depth {self.depth}"


# ----------------------------------------------------------------------------- the official variants


@functools.cache
def official_variants() -> dict[str, tuple[SamArchitecture, dict[str, torch.Size]]]:
    """segment-anything's own variants: name -> (architecture, tensor shapes), read from shape-only
    builds (meta device) of ``sam_model_registry`` -- nothing of theirs is declared here."""
    registry = require_segment_anything().sam_model_registry
    variants = {}
    for name in sorted(k for k in registry if k != "default"):
        with torch.device("meta"):
            state = registry[name]().state_dict()
        variants[name] = (sam_architecture(state, f"segment-anything's {name}"), {k: v.shape for k, v in state.items()})
    return variants


def _limits() -> tuple[int, int]:
    """(largest input size, largest global attention: heads x tokens^2) of SAM's own models: what a
    file of another size may ask for at run time."""
    archs = [arch for arch, _ in official_variants().values()]
    return max(a.image_size for a in archs), max(a.heads * a.grid ** 4 for a in archs)


# ----------------------------------------------------------------------------- detect


def read_sam_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a SAM checkpoint safely: its tensors by name (CPU); nothing is unpickled freely.

    Raises:
        WeightsError: missing, unreadable, not a state dict, or without the tensors every SAM has.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"SAM checkpoint {path} not found (the official ones are {', '.join(OFFICIAL_FILES)})")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                state: object = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise WeightsError(f"cannot read the SAM checkpoint {path}: {first_line(err)}") from None
    else:
        try:
            state = torch_load_safely(path)
        except WeightsError as err:
            raise WeightsError(f"cannot read the SAM checkpoint {err}") from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a SAM state dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = [k for k in _DETECT_KEYS if k not in tensors]
    if missing:
        raise WeightsError(f"{path} is not a Segment Anything (SAM) model: it has no {missing[0]}")
    return tensors


# ----------------------------------------------------------------------------- check


def _check_values_held(state: StateDict, source: object) -> int:
    """Refuse zero-size dimensions and tensors that declare more values than the file stores (an
    expanded view, or tensors sharing one storage); return the number of values the file holds."""
    empty = [f"{k} {list(v.shape)}" for k, v in state.items() if 0 in v.shape]
    if empty:
        raise WeightsError(f"{source}: {len(empty)} tensor(s) with a zero-size dimension ({listed(empty, 3)}): "
                           f"not a usable SAM checkpoint")
    other = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state.items() if not v.is_floating_point()]
    if other:
        raise WeightsError(f"{source}: a SAM's tensors are floating point, not {listed(other, 3)}")
    storages = {}
    for tensor in state.values():
        storage = tensor.untyped_storage()
        storages[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
    declared = sum(v.numel() * v.element_size() for v in state.values())
    if declared > sum(storages.values()):
        raise WeightsError(f"{source}: its tensors declare {declared:,} bytes but the file stores "
                           f"{sum(storages.values()):,} (expanded or shared tensors): not a SAM checkpoint")
    return sum(v.numel() for v in state.values())


def _shape(state: StateDict, key: str, rank: int, source: object) -> torch.Size:
    if key not in state:
        raise WeightsError(f"{source} is not a Segment Anything (SAM) model: it has no {key}")
    shape = state[key].shape
    if len(shape) != rank or 0 in shape:
        raise WeightsError(f"{source}: {key} has shape {list(shape)}, not that of a SAM ({rank} non-zero dimensions)")
    return shape


def _encoder_blocks(state: StateDict, grid: int, width: int, source: object) -> tuple[int, int, tuple[int, ...], int]:
    """(depth, heads, global blocks, window) from the blocks' relative position tables."""
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    if depth == 0:
        raise WeightsError(f"{source} is not a Segment Anything (SAM) model: its image encoder has no blocks")
    rel = [_shape(state, f"image_encoder.blocks.{i}.attn.rel_pos_h", 2, source) for i in range(depth)]
    head_dims = {shape[1] for shape in rel}
    if len(head_dims) > 1 or width % rel[0][1]:
        raise WeightsError(f"{source}: the encoder's attention head sizes {sorted(head_dims)} do not divide its "
                           f"width {width}")
    if any(shape[0] % 2 == 0 for shape in rel):
        raise WeightsError(f"{source}: relative position tables of even length ({[s[0] for s in rel]}): not a SAM")
    global_blocks = tuple(i for i, shape in enumerate(rel) if shape[0] == 2 * grid - 1)
    windows = {(shape[0] + 1) // 2 for i, shape in enumerate(rel) if i not in global_blocks}
    if len(windows) > 1 or max(windows, default=0) > grid:
        raise WeightsError(f"{source}: the windowed encoder blocks have windows {sorted(windows)} (one window, at "
                           f"most the {grid}-token grid, expected)")
    return depth, width // rel[0][1], global_blocks, windows.pop() if windows else 14


def sam_architecture(state: StateDict, source: object = "the SAM checkpoint") -> SamArchitecture:
    """Read the SAM architecture from a state dict's shapes (see :class:`SamArchitecture`), with the
    checks that make it buildable. Reads shapes only (meta tensors are fine).

    Raises:
        WeightsError: the tensors are not those of a Segment Anything model, or disagree with each other.
    """
    missing = [k for k in _DETECT_KEYS if k not in state]
    if missing:
        raise WeightsError(f"{source} is not a Segment Anything (SAM) model: it has no {missing[0]}")
    width, channels, patch, patch_w = _shape(state, "image_encoder.patch_embed.proj.weight", 4, source)
    one, grid, grid_w, pos_width = _shape(state, "image_encoder.pos_embed", 4, source)
    if channels != 3 or patch != patch_w or (one, grid_w, pos_width) != (1, grid, width):
        raise WeightsError(f"{source}: the patch embedding {[width, channels, patch, patch_w]} and the position "
                           f"embedding {[one, grid, grid_w, pos_width]} are not those of a SAM image encoder")
    depth, heads, global_blocks, window = _encoder_blocks(state, grid, width, source)
    hidden = _shape(state, "image_encoder.blocks.0.mlp.lin1.weight", 2, source)[0]
    prompt_dim = _shape(state, "image_encoder.neck.0.weight", 4, source)[0]
    decoder_mlp = _shape(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight", 2, source)[0]
    if prompt_dim % 16:  # the mask decoder's 8 heads attend at half its width
        raise WeightsError(f"{source}: prompt width {prompt_dim} is not a multiple of 16, as a SAM's is")
    return SamArchitecture(width=width, depth=depth, heads=heads, global_blocks=global_blocks, window=window,
                           patch=patch, image_size=grid * patch, mlp_ratio=hidden / width, prompt_dim=prompt_dim,
                           decoder_mlp=decoder_mlp)


def _check_cost(arch: SamArchitecture, values: int, source: object) -> None:
    """The architecture must be one the file's values can fill, and cost no more to run than SAM's own."""
    encoder = (arch.depth * (4 + 2 * arch.mlp_ratio) * arch.width ** 2 + (arch.grid ** 2 + 3 * arch.patch ** 2
               + arch.prompt_dim) * arch.width + 4 * arch.prompt_dim * arch.decoder_mlp)  # a lower bound
    if encoder > values:
        raise WeightsError(f"{source}: declares a SAM of width {arch.width}, depth {arch.depth} ({arch.image_size} "
                           f"px), at least {int(encoder):,} parameters, but holds {values:,} values")
    if arch.official is not None:
        return
    image, attention = _limits()
    if arch.image_size > image or arch.heads * arch.grid ** 4 > attention:
        raise WeightsError(f"{source}: a SAM of {arch.image_size} px images, {arch.grid}x{arch.grid} tokens and "
                           f"{arch.heads} heads needs more than SAM's own models (at most {image} px, the attention "
                           f"of {', '.join(OFFICIAL_FILES)})")


def sam_shapes(arch: SamArchitecture) -> dict[str, torch.Size]:
    """Tensor names and shapes of a SAM of this architecture (a shape-only build: no memory)."""
    if arch.official is not None:
        return dict(official_variants()[arch.official][1])
    with torch.device("meta"):
        return {k: v.shape for k, v in build_sam(arch).state_dict().items()}


def _check_fit(state: StateDict, expected: Mapping[str, torch.Size], source: object, name: str) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (file {list(state[k].shape)}, model {list(expected[k])})"
              for k in expected if k in state and state[k].shape != expected[k]]
    problems = ([f"wrong shapes: {listed(shapes, 3)}"] if shapes else []) + \
        ([f"missing keys: {listed(missing)}"] if missing else []) + \
        ([f"unexpected keys: {listed(unexpected)}"] if unexpected else [])
    if problems:
        raise WeightsError(f"{source} does not fit a SAM {name}: {'; '.join(problems)}")


def check_sam(state: StateDict, source: object = "the SAM checkpoint") -> SamArchitecture:
    """Everything :func:`sam_from_state` needs to know before it builds a model (see the module docstring).

    Returns:
        The architecture the file holds.

    Raises:
        WeightsError: the first problem found.
    """
    values = _check_values_held(state, source)
    arch = sam_architecture(state, source)
    _check_cost(arch, values, source)
    try:
        expected = sam_shapes(arch)
    except (AssertionError, ValueError, RuntimeError) as err:  # SAM's layers refusing these sizes
        raise WeightsError(f"{source}: a SAM of {arch} cannot be built: {first_line(err)}") from None
    _check_fit(state, expected, source, arch.name)
    return arch


# ----------------------------------------------------------------------------- load


def _generic_sam(arch: SamArchitecture) -> Sam:
    """A SAM of another size, from SAM's layers (the other settings are those of segment-anything's builders)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    return Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.depth, embed_dim=arch.width, img_size=arch.image_size, mlp_ratio=arch.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=arch.heads, patch_size=arch.patch,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=arch.global_blocks, window_size=arch.window,
            out_chans=arch.prompt_dim),
        prompt_encoder=PromptEncoder(embed_dim=arch.prompt_dim, image_embedding_size=(arch.grid, arch.grid),
                                     input_image_size=(arch.image_size, arch.image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=arch.prompt_dim, mlp_dim=arch.decoder_mlp,
                                          num_heads=8),
            transformer_dim=arch.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256),
    )  # pixel_mean / pixel_std: Sam's defaults, those of the official models


def build_sam(arch: SamArchitecture) -> Sam:
    """A randomly initialised SAM of this architecture (on the default device; use ``torch.device("meta")``
    for shapes only): segment-anything's own builder for its variants, SAM's layers for other sizes."""
    segment_anything = require_segment_anything()
    builder: Callable[[], Sam] = (segment_anything.sam_model_registry[arch.official] if arch.official is not None
                                  else partial(_generic_sam, arch))
    return builder().eval()


def sam_from_state(state: StateDict, source: object = "the SAM checkpoint") -> Sam:
    """Check a SAM state dict (:func:`check_sam`), then build the model around its tensors (float32, CPU).

    Raises:
        WeightsError: the state dict is not a SAM checkpoint that can be loaded safely.
    """
    arch = check_sam(state, source)
    with torch.device("meta"):
        sam = build_sam(arch)
    try:
        sam.load_state_dict(state, assign=True)  # the file's tensors become the model's: no second copy
        if any(t.is_meta for t in [*sam.parameters(), *sam.buffers()]):  # a constant made on the meta device
            sam = build_sam(arch)
            sam.load_state_dict(state)
    except RuntimeError as err:  # not expected after the check: "Error(s) in loading state_dict ...:" then details
        lines = str(err).splitlines()
        raise WeightsError(f"{source} does not fit a SAM {arch.name}: "
                           f"{(lines[1] if len(lines) > 1 else lines[0]).strip()}") from None
    return sam.float().eval()


def load_sam(path: str | Path, device: str | torch.device = "cpu") -> Sam:
    """Load a Segment Anything checkpoint (``.pth`` or ``.safetensors``) onto ``device``: read, checked, then
    built (ViT-B/L/H by segment-anything's builders; another size from the file's shapes).

    Raises:
        LoratError: segment-anything is not installed.
        WeightsError: the file is missing, unreadable, not a SAM model, or one that cannot be loaded safely.
    """
    require_segment_anything()
    path = Path(path)
    state = read_sam_state(path)
    return sam_from_state(state, path).to(device)
