"""Weight files on disk: reading them safely, naming their format, writing byte-stable safetensors.

The formats are listed in :mod:`lorat.checkpoint.formats`.
Files are read with safetensors or ``torch.load(weights_only=True)``; nothing is unpickled
freely, and tensors holding NaN or inf are refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorat.errors import WeightsError, listed
from lorat.files import write_atomic

__all__ = ["CONFIG_KEY", "FORMAT_KEY", "FORMAT_VERSION", "read_weights", "detect_format", "save_safetensors",
           "load_state_for_info", "torch_load_safely"]


CONFIG_KEY = "lorat.config"


FORMAT_KEY = "lorat.format"


FORMAT_VERSION = "1"


# First bytes of files people pass by mistake, and of the two PyTorch containers.
_MAGIC = [(b"PK\x03\x04", 0, "pytorch"), (b"\x80", 0, "pytorch"),  # zip (torch >= 1.6), legacy pickle
          (b"ftyp", 4, "a video file"), (b"RIFF", 0, "a video file"), (b"\x1aE\xdf\xa3", 0, "a video file"),
          (b"\x89PNG", 0, "an image file"), (b"\xff\xd8\xff", 0, "an image file"), (b"GIF8", 0, "an image file")]


def _sniff(path: Path) -> str | None:
    """What a non-safetensors file's first bytes say it is: ``"pytorch"``, ``"a video file"``, ... or None."""
    with open(path, "rb") as f:
        head = f.read(16)
    return next((kind for magic, at, kind in _MAGIC if head[at:at + len(magic)] == magic), None)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


def embeds_config(path: str | Path) -> bool:
    """Whether ``path`` is our single file (a safetensors file with the config in its metadata); reads
    the header only. False for any other file, missing or unreadable ones included."""
    path = Path(path)
    try:
        if not (path.is_file() and _is_safetensors(path)):
            return False
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return CONFIG_KEY in (f.metadata() or {})
    except (OSError, SafetensorError):
        return False


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def torch_load_safely(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, its failures as one-line WeightsErrors.

    A file holding Python objects is refused by naming what it holds, never with advice to load it
    unsafely (torch's own message suggests ``weights_only=False``: that runs the file's code).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _UNSAFE_GLOBAL.search(str(err))
        holds = f" ({found.group(1)})" if found else ""
        raise WeightsError(f"{path}: holds Python objects besides tensors{holds}; refusing to unpickle it: only "
                           f"tensors are read from .pth files (a safetensors file avoids the question)") from None
    except Exception as err:  # zip / pickle errors of every kind
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        first = first.split(". ")[0].removesuffix(".")  # torch's first sentence; the rest is advice
        raise WeightsError(f"{path}: not a readable safetensors or PyTorch file (truncated or corrupt?): "
                           f"{first}") from None


def _state_dict_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or one wrapped as {"model": ...} / {"state_dict": ...}."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping) and len(obj) <= 4:
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: contains no tensors")
    return tensors


def _check_stored(sd: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse tensors that declare more values than the file stores (expanded views, one storage shared
    by many tensors): a small file must not stand for a huge state dict."""
    stored = {}
    for tensor in sd.values():
        storage = tensor.untyped_storage()
        stored[storage.data_ptr()] = storage.nbytes()
    declared = sum(v.numel() * v.element_size() for v in sd.values())
    if declared > sum(stored.values()):
        raise WeightsError(f"{path}: its tensors declare {declared:,} bytes but the file stores "
                           f"{sum(stored.values()):,} (expanded or shared tensors): refused")


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weight file safely into CPU tensors.

    Returns:
        (state dict, safetensors metadata or {}). ``module.`` / ``_orig_mod.`` prefixes
        (DDP, torch.compile) are stripped.

    Raises:
        WeightsError: missing, empty, truncated or corrupt file, not a weight file at all (a video, an
            image, random bytes), one holding Python objects, or one with NaN / inf values.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: file is empty")
    meta: dict[str, str] = {}
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise WeightsError(f"{path}: unreadable safetensors file (truncated or corrupt?): {err}") from None
    else:
        kind = _sniff(path)
        if kind is None:
            raise WeightsError(f"{path}: not a safetensors or PyTorch weight file (unrecognised content)")
        if kind != "pytorch":
            raise WeightsError(f"{path}: is {kind}, not weights; pass a .safetensors or .pth weight file")
        obj = torch_load_safely(path)
        sd = _state_dict_of(obj, path)
        _check_stored(sd, path)
    sd = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}
    damaged = sorted(k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if damaged:
        raise WeightsError(f"{path}: non-finite values (NaN or inf) in {len(damaged)} tensors: {listed(damaged)}; "
                           f"the file is damaged (or saved from a diverged training run)")
    return sd, meta


def detect_format(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None) -> str:
    """Name the format of a state dict: see the module docstring (or ``"unknown"``)."""
    if meta and CONFIG_KEY in meta:
        return "lorat"
    keys = list(sd)
    has_lora = any(k.endswith((".lora.A", ".lora.B")) for k in keys)
    has_base = any(k.startswith("patch_embed.") for k in keys)
    has_head = any(k.startswith(("head.cls_mlp.", "heads.")) for k in keys)  # LoRAT, LoRATv2
    if has_lora:
        return "official-full" if has_base else "official-trainable"
    if has_base and has_head:
        return "merged"
    if has_base and any(k.startswith("blocks.") for k in keys):
        return "dinov2"
    if any(k.startswith("features.0.") for k in keys) and not has_base:
        return "mobilenetv2"
    return "unknown"


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """``safetensors.save_file``, byte-stable and atomic (:func:`lorat.files.write_atomic`).

    safetensors keeps the metadata in a hash map, so its order in the header (and the file's
    bytes) varies from process to process; the header is rewritten with the metadata sorted, so
    identical inputs give identical files.
    """
    write_atomic(path, lambda tmp: _save_sorted_metadata(tensors, tmp, metadata))


def _save_sorted_metadata(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    save_file(dict(tensors), str(path), metadata=dict(metadata))
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        if len(text) == n:  # the usual case: same length, rewrite the header in place
            f.seek(8)
            f.write(text)
            return
        copy = path.with_name(path.name + "2")
        with open(copy, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            shutil.copyfileobj(f, out, 1 << 24)
    os.replace(copy, path)


def load_state_for_info(path: str | Path) -> tuple[str, int]:
    """(format, number of tensors) of a weight file, for reports."""
    sd, meta = read_weights(path)
    return detect_format(sd, meta), len(sd)
