"""ONNX export of the merged model, and an ONNX Runtime backend for :class:`lorat.Tracker`.

The exported graph is the network only: (template ``z`` (B, 3, Ht, Wt) float32, search ``x``
(B, 3, Hs, Ws) float32, template mask (B, Hz, Wz) int64) -> (``score_map`` (B, H, W) logits,
``boxes`` (B, H, W, 4) normalised xyxy), with a dynamic batch axis. The model config travels in the
file's metadata (key ``lorat.config``), so an ``.onnx`` file is all the tracker needs: crops and
post-processing stay the same torch code. Needs the optional extra ``pip install lorat[onnx]``
(onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from lorat.checkpoint.files import CONFIG_KEY
from lorat.config import Config, config_from_dict, config_to_dict
from lorat.errors import ConfigError, LoratError, WeightsError
from lorat.model.vit import LoRAT

__all__ = ["export_onnx", "OnnxModel", "load_onnx"]

INPUTS = ("z", "x", "z_feat_mask")
OUTPUTS = ("score_map", "boxes")
TOLERANCE = 1e-4  # largest |ONNX Runtime - PyTorch float32| accepted on export


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise LoratError(f"the ONNX backend needs {module}: pip install 'lorat[onnx]'") from None


class _Outputs(torch.nn.Module):
    """The model with tuple outputs (what an ONNX graph returns)."""

    def __init__(self, model: LoRAT):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(z, x, mask)
        return out["score_map"], out["boxes"]


def _example(config: Config, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    m = config.model
    z = torch.randn(batch, 3, m.template_size[1], m.template_size[0], generator=generator)
    x = torch.randn(batch, 3, m.search_size[1], m.search_size[0], generator=generator)
    mask = torch.randint(0, 2, (batch, *m.template_grid), generator=generator)
    return z, x, mask


def export_onnx(model: LoRAT, config: Config, path: str | Path) -> float:
    """Write the merged inference ``model`` as ONNX (dynamic batch, config in the metadata) and check
    ONNX Runtime against PyTorch float32 at batch 1 and 3.

    Returns:
        The largest absolute difference of the outputs.

    Raises:
        LoratError: the optional packages are missing, the file cannot be written, or the check fails.
    """
    onnx = _require("onnx")
    _require("onnxscript")
    path = Path(path)
    wrapped = _Outputs(model.float().cpu().eval()).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter's progress lines
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(wrapped, _example(config, 2), str(path), input_names=list(INPUTS),
                              output_names=list(OUTPUTS), dynamic_shapes={"z": {0: batch}, "x": {0: batch},
                                                                          "mask": {0: batch}}, dynamo=True)
        proto = onnx.load(str(path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = CONFIG_KEY, json.dumps(config_to_dict(config))
        onnx.save(proto, str(path))
    except OSError as err:
        raise LoratError(f"cannot write {path}: {err.strerror or err}") from None
    session = OnnxModel(path, config)
    worst = 0.0
    for n in (1, 3):
        inputs = _example(config, n, seed=n)
        with torch.no_grad():
            expected = wrapped(*inputs)
        got = session(*inputs)
        worst = max(worst, *(float((got[k] - e).abs().max()) for k, e in zip(OUTPUTS, expected, strict=True)))
    if worst > TOLERANCE:
        raise LoratError(f"{path}: ONNX Runtime differs from PyTorch by {worst:.2e} (> {TOLERANCE:g})")
    return worst


class OnnxModel:
    """An exported model run by ONNX Runtime on the CPU, called like :class:`lorat.LoRAT`.

    ``model(z, x, mask)`` takes and returns torch tensors (``score_map``, ``boxes``), so
    :class:`lorat.Tracker` and the batched functions of :mod:`lorat.tracking.tracker` use it unchanged.
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, config: Config):
        ort = _require("onnxruntime")
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # --threads applies here too
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own error types
            raise WeightsError(f"{path}: not a readable ONNX model ({str(err).splitlines()[0]})") from None
        self.cfg = config.model
        self.device = torch.device("cpu")

    def eval(self) -> OnnxModel:
        return self

    def __call__(self, z: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {"z": z.float().cpu().numpy(), "x": x.float().cpu().numpy(),
                "z_feat_mask": mask.to(torch.int64).cpu().numpy()}
        outputs = self.session.run(list(OUTPUTS), feed)
        return {name: torch.from_numpy(np.asarray(value)) for name, value in zip(OUTPUTS, outputs, strict=True)}


def load_onnx(path: str | Path) -> tuple[OnnxModel, Config]:
    """Open an ``.onnx`` file written by :func:`export_onnx`: (model, its config).

    Raises:
        WeightsError: missing file, not ONNX, or no (valid) embedded config.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    onnx = _require("onnx")
    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as err:  # onnx raises DecodeError and others
        raise WeightsError(f"{path}: not a readable ONNX model ({str(err).splitlines()[0] if str(err) else err})") \
            from None
    if CONFIG_KEY not in meta:
        raise WeightsError(f"{path}: an ONNX model without lorat's config; export it with "
                           f"python -m lorat.export --onnx")
    try:
        config = config_from_dict(json.loads(meta[CONFIG_KEY]), where=f"{path} metadata")
    except (json.JSONDecodeError, ConfigError) as err:
        raise WeightsError(f"{path}: the embedded config is invalid: {err}") from None
    return OnnxModel(path, config), config
