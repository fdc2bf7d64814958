"""ONNX export of the merged model, and an ONNX Runtime backend for :class:`lorat.Tracker`.

The exported graph is the network only: (template ``z`` (B, 3, Ht, Wt) float32, search ``x``
(B, 3, Hs, Ws) float32, template mask (B, Hz, Wz) int64) -> (``score_map`` (B, H, W) logits,
``boxes`` (B, H, W, 4) normalised xyxy), with a dynamic batch axis. The model config travels in the
file's metadata (key ``lorat.config``), so an ``.onnx`` file is all the tracker needs: crops and
post-processing stay the same torch code. Needs the optional extra ``pip install lorat[onnx]``
(onnx, onnxscript, onnxruntime).

:func:`load_onnx` follows the detect -> check -> load order of the other weight files
(:mod:`lorat.checkpoint.formats`): the graph is read without its external data, the embedded config
is validated (:func:`lorat.config.config_from_dict`) and its crop sizes bounded
(:data:`MAX_CROP_SIZE`), and the graph's declared inputs and outputs must be the network's, with
the config's sizes (:func:`check_onnx_graph`) -- all before an inference session or a tensor exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lorat.checkpoint.files import CONFIG_KEY
from lorat.config import Config, config_from_dict, config_to_dict
from lorat.errors import ConfigError, LoratError, WeightsError, first_line

if TYPE_CHECKING:
    from lorat.model.vit import LoRAT

__all__ = ["export_onnx", "OnnxModel", "load_onnx", "open_bundled_onnx", "check_onnx_graph", "MAX_CROP_SIZE"]

INPUTS = ("z", "x", "z_feat_mask")
OUTPUTS = ("score_map", "boxes")
TOLERANCE = 1e-4  # largest |ONNX Runtime - PyTorch float32| accepted on export
MAX_CROP_SIZE = 4096  # px per side of a template or search crop in an embedded config (the paper's largest: 378)
_FLOAT, _INT64 = 1, 7  # onnx.TensorProto.FLOAT / INT64
_TYPES = {_FLOAT: "float32", _INT64: "int64", 10: "float16", 11: "float64", 6: "int32"}


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


_SINGLE_FILE_LIMIT = 2**31 - 2**26  # protobuf caps one file at 2 GB; larger networks keep their weights beside it


def export_onnx(model: LoRAT, config: Config, path: str | Path) -> float:
    """Write the merged inference ``model`` as ONNX (dynamic batch, config in the metadata) and check
    ONNX Runtime against PyTorch float32 at batch 1 and 3.

    The file is made and checked in a temporary folder beside ``path`` and moved into place only when it
    passes, so a failed export leaves nothing behind. Networks under 2 GB are one self-contained file;
    larger ones (ViT-g) keep their weights in ``<path>.data``, which must not be someone else's file.

    Returns:
        The largest absolute difference of the outputs.

    Raises:
        LoratError: the optional packages are missing, the file cannot be written, ``<path>.data`` would
            replace a file this export did not write, or the check fails.
    """
    if config.model.family == "loratv2":  # its step is stateful (a key-value cache): torch only, for now
        raise LoratError(f"ONNX export covers LoRAT; {config.model.variant} is a LoRATv2 model, which runs with "
                         f"torch (--backend torch)")
    onnx = _require("onnx")
    _require("onnxscript")
    path = Path(path)
    if path.is_dir():
        raise LoratError(f"{path} is a folder; give a file name, e.g. {path / 'model.onnx'}")
    wrapped = _Outputs(model.float().cpu().eval()).eval()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            staged = Path(tmp) / path.name
            data = _write_checked_onnx(onnx, wrapped, config, Path(tmp) / "exported.onnx", staged, path)
            worst = _compare_with_torch(wrapped, staged, config)
            if data is not None:
                os.replace(Path(tmp) / data.name, data)
            os.replace(staged, path)
    except OSError as err:
        raise LoratError(f"cannot write {path}: {err.strerror or err}") from None
    return worst


def _write_checked_onnx(onnx, wrapped: torch.nn.Module, config: Config, exported: Path, staged: Path,
                        path: Path) -> Path | None:
    """Export ``wrapped`` to ``exported``, then write it with our metadata as ``staged`` (weights beside it
    as ``<path>.data`` only past 2 GB). Returns that data file's final path, or None."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter's progress lines
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(wrapped, _example(config, 2), str(exported), input_names=list(INPUTS),
                          output_names=list(OUTPUTS), dynamic_shapes={"z": {0: batch}, "x": {0: batch},
                                                                      "mask": {0: batch}}, dynamo=True)
    proto = onnx.load(str(exported))  # with its external data, if the exporter wrote any
    # the exporter's per-node debug notes name source files, line numbers and the install folder:
    # dropped, so the bytes depend on the network alone (a re-export anywhere gives the same file)
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        del node.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = CONFIG_KEY, json.dumps(config_to_dict(config))
    if proto.ByteSize() <= _SINGLE_FILE_LIMIT:
        onnx.save(proto, str(staged))
        return None
    data = path.with_name(f"{path.name}.data")
    _refuse_foreign_data_file(onnx, data, path)
    onnx.save(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return data


def _refuse_foreign_data_file(onnx, data: Path, path: Path) -> None:
    """``data`` may be replaced only when it is missing or belongs to the ONNX file at ``path`` (a re-export)."""
    if not data.exists():
        return
    try:
        graph = onnx.load(str(path), load_external_data=False).graph if path.is_file() else None
    except Exception:  # not an ONNX file: the data file is not its
        graph = None
    ours = graph is not None and any(item.key == "location" and item.value == data.name
                                     for tensor in graph.initializer for item in tensor.external_data)
    if not ours:
        raise LoratError(f"{data} exists and does not belong to {path}; the export would replace it with the "
                         f"network's weights: move it or choose another --onnx name")


def _compare_with_torch(wrapped: torch.nn.Module, path: Path, config: Config) -> float:
    """Largest |ONNX Runtime - PyTorch float32| at batch 1 and 3; raises past :data:`TOLERANCE`."""
    session = OnnxModel(path, config)
    worst = 0.0
    for n in (1, 3):
        inputs = _example(config, n, seed=n)
        with torch.no_grad():
            expected = wrapped(*inputs)
        got = session(*inputs)
        worst = max(worst, *(float((got[k] - e).abs().max()) for k, e in zip(OUTPUTS, expected, strict=True)))
    if worst > TOLERANCE:
        raise LoratError(f"{path.name}: ONNX Runtime differs from PyTorch by {worst:.2e} (> {TOLERANCE:g}); "
                         f"nothing was written")
    return worst


class OnnxModel:
    """An exported model run by ONNX Runtime on the CPU, called like :class:`lorat.LoRAT`.

    ``model(z, x, mask)`` takes and returns torch tensors (``score_map``, ``boxes``), so
    :class:`lorat.Tracker` and the batched functions of :mod:`lorat.tracking.tracker` use it unchanged.

    Each call runs on as many threads as torch uses at that moment (``torch.get_num_threads()``: the
    ``--threads`` count, or the one :mod:`lorat.tracking.threads` chose), with one session per count,
    opened on first use (an ONNX Runtime session keeps the thread count it was made with). The
    sessions' threads sleep instead of spinning between calls, which would take cores from other
    programs. The outputs are the same on any number of threads.
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, config: Config | None = None):
        self._ort = _require("onnxruntime")
        self.path = Path(path)
        self.device = torch.device("cpu")
        self._sessions: dict[int, object] = {}
        self.session = self._session(torch.get_num_threads())
        self.config = config if config is not None else self._embedded_config()
        self.cfg = self.config.model

    def _embedded_config(self) -> Config:
        """The config in the file's metadata, read through the open session."""
        meta = self.session.get_modelmeta().custom_metadata_map
        return _embedded_config(meta, self.path)

    def _session(self, threads: int):
        """The session that runs on ``threads`` threads (opened now if it is the first call with them)."""
        session = self._sessions.get(threads)
        if session is not None:
            return session
        ort = self._ort
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1  # one graph at a time: no second pool
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own error types
            raise WeightsError(f"{self.path}: not a readable ONNX model ({first_line(err)})") from None
        self._sessions[threads] = session
        return session

    def eval(self) -> OnnxModel:
        return self

    def __call__(self, z: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {"z": z.float().cpu().numpy(), "x": x.float().cpu().numpy(),
                "z_feat_mask": mask.to(torch.int64).cpu().numpy()}
        try:
            outputs = self._session(torch.get_num_threads()).run(list(OUTPUTS), feed)
        except Exception as err:  # onnxruntime's own error types: the graph failed on these inputs
            if not type(err).__module__.startswith("onnxruntime"):
                raise
            raise WeightsError(f"{self.path}: ONNX Runtime failed: {first_line(err)}") from None
        out = {name: torch.from_numpy(np.asarray(value)) for name, value in zip(OUTPUTS, outputs, strict=True)}
        grid = (z.shape[0], *self.cfg.search_grid)
        if out["score_map"].shape != grid or out["boxes"].shape != (*grid, 4):
            raise WeightsError(f"{self.path}: the graph returned score_map {list(out['score_map'].shape)} and boxes "
                               f"{list(out['boxes'].shape)}, not {list(grid)} and {[*grid, 4]}")
        return out


def _embedded_config(meta: dict[str, str], path: Path) -> Config:
    """The config an export keeps in its metadata (``lorat.config``), validated.

    Raises:
        WeightsError: no config (not our export) or an invalid one.
    """
    if CONFIG_KEY not in meta:
        raise WeightsError(f"{path}: an ONNX model without lorat's config; export it with "
                           f"python -m lorat.export --onnx")
    try:
        config = config_from_dict(json.loads(meta[CONFIG_KEY]), where=f"{path} metadata")
    except (json.JSONDecodeError, ConfigError, RecursionError) as err:
        raise WeightsError(f"{path}: the embedded config is invalid: {first_line(err)}") from None
    if config.model.family == "loratv2":
        raise WeightsError(f"{path}: names a LoRATv2 model; ONNX Runtime runs LoRAT networks only")
    return config


def _declared(values, kind: str, path: Path) -> dict[str, tuple[int, list[int | str]]]:
    """A graph's inputs or outputs: name -> (element type, dims: an int when static, its name when not)."""
    declared = {}
    for value in values:
        if not value.type.HasField("tensor_type"):
            raise WeightsError(f"{path}: {kind} {value.name!r} is not a tensor; not a LoRAT network")
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim] \
            if tensor.HasField("shape") else None
        declared[value.name] = (tensor.elem_type, dims)
    return declared


def _expected_io(config: Config) -> dict[str, tuple[int, list[int]]]:
    """The network's inputs and outputs without the batch axis: name -> (element type, dims)."""
    m = config.model
    (tw, th), (sw, sh), (hz, wz), (hx, wx) = m.template_size, m.search_size, m.template_grid, m.search_grid
    return {"z": (_FLOAT, [3, th, tw]), "x": (_FLOAT, [3, sh, sw]), "z_feat_mask": (_INT64, [hz, wz]),
            "score_map": (_FLOAT, [hx, wx]), "boxes": (_FLOAT, [hx, wx, 4])}


def _check_crop_sizes(config: Config, path: Path) -> None:
    m = config.model
    for name, size in (("template_size", m.template_size), ("search_size", m.search_size)):
        if max(size) > MAX_CROP_SIZE:
            raise WeightsError(f"{path}: the embedded config's model.{name} {list(size)} exceeds {MAX_CROP_SIZE} px "
                               f"per side; not a LoRAT export")


def check_onnx_graph(graph, config: Config, path: Path) -> None:
    """The graph must be the network :func:`export_onnx` writes for ``config``: inputs ``z``, ``x``,
    ``z_feat_mask`` and outputs ``score_map``, ``boxes`` of the config's sizes, a dynamic batch axis
    first. Reads the declarations only (nothing runs, nothing is allocated).

    Raises:
        WeightsError: naming the file and the first mismatch.
    """
    initialised = {t.name for t in graph.initializer}  # older exporters list the weights as inputs too
    inputs = {k: v for k, v in _declared(graph.input, "input", path).items() if k not in initialised}
    outputs = _declared(graph.output, "output", path)
    if sorted(inputs) != sorted(INPUTS) or not set(OUTPUTS) <= set(outputs):
        raise WeightsError(f"{path}: not a LoRAT network: its inputs are {sorted(inputs)} and outputs "
                           f"{sorted(outputs)} (expected inputs {list(INPUTS)}, outputs {list(OUTPUTS)})")
    for name, (elem_type, dims) in _expected_io(config).items():
        got_type, got = inputs[name] if name in inputs else outputs[name]
        if got is None or len(got) != 1 + len(dims) or isinstance(got[0], int):
            raise WeightsError(f"{path}: {name} is declared with shape {got}, expected [batch, "
                               f"{', '.join(map(str, dims))}] with a dynamic batch axis (export it with "
                               f"python -m lorat.export --onnx)")
        if got_type != elem_type or got[1:] != dims:
            raise WeightsError(f"{path}: {name} is declared as {_TYPES.get(got_type, got_type)} {got}, but the "
                               f"embedded config ({config.model.variant}) makes it {_TYPES[elem_type]} "
                               f"[batch, {', '.join(map(str, dims))}]")


def open_bundled_onnx(path: Path, sha256: str) -> tuple[OnnxModel, Config] | None:
    """Open the bundled demo model's ONNX file if it is exactly the file the package was built with.

    A file whose SHA-256 is ``sha256`` is our own export (checked by the test suite against the
    bundled safetensors file), so the graph check of :func:`load_onnx`, whose ``onnx`` package takes
    about 1 s to import, is not needed; the config comes from the session's metadata.

    Returns:
        (model, config), or None where onnxruntime is not installed or the file is missing or differs.
    """
    try:
        import onnxruntime  # noqa: F401  (only whether it is installed)
    except ImportError:
        return None
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    if digest.hexdigest() != sha256:
        return None
    model = OnnxModel(path)
    return model, model.config


def load_onnx(path: str | Path) -> tuple[OnnxModel, Config]:
    """Open an ``.onnx`` file written by :func:`export_onnx`: (model, its config). The embedded config and
    the graph's inputs and outputs are checked before ONNX Runtime opens the file.

    Raises:
        WeightsError: missing file, not ONNX, no (valid) embedded config, crop sizes past
            :data:`MAX_CROP_SIZE`, or a graph whose inputs and outputs are not those of the config's network.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    onnx = _require("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and others
        raise WeightsError(f"{path}: not a readable ONNX model ({first_line(err)})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    config = _embedded_config(meta, path)
    _check_crop_sizes(config, path)
    check_onnx_graph(proto.graph, config, path)
    del proto
    return OnnxModel(path, config), config
