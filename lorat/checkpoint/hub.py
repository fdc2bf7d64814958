"""Named models: ``--weights LoRAT-B-224`` means the official checkpoint plus its DINOv2 backbone.

* DINOv2 comes from Meta's public URLs (the ones the official code gives
  ``torch.hub.load_state_dict_from_url``) into torch hub's cache (``$TORCH_HOME/hub/checkpoints``),
  so a file the official code already downloaded is reused.
* The LoRAT checkpoints are published in a Google Drive folder without stable per-file URLs: they
  are used from ``$LORAT_HOME/<name>/model.safetensors`` (default ``~/.cache/lorat``); when missing,
  the error says which file to download and where to put it.
* ``$LORAT_MIRROR`` (a base URL) serves both: ``<mirror>/dinov2/dinov2_vitb14/...`` (Meta's paths)
  and ``<mirror>/LoRAT-B-224/model.safetensors``. ``LORAT_OFFLINE=1`` never touches the network.

A download shows progress, goes to a ``.partial`` file (resumed with an HTTP range request when
interrupted) and is checked (it loads; the expected keys and shapes) before it is moved into the
cache; a file that fails the check is removed. Nothing is downloaded when the cache has the file.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lorat.errors import LoratError, WeightsError

__all__ = ["NamedModel", "MODELS", "named_model", "lorat_home", "dinov2_cache", "fetch", "dinov2_weights",
           "dinov2_release", "dinov2_path",
           "resolve_named", "DINOV2_BASE", "LORAT_FOLDER"]

DINOV2_BASE = "https://dl.fbaipublicfiles.com"
LORAT_FOLDER = "https://drive.google.com/drive/folders/1FvViP0MCSiAu2FSrNjg7XEORn74yOBdD"
MIRROR_VARIABLE, HOME_VARIABLE, OFFLINE_VARIABLE = "LORAT_MIRROR", "LORAT_HOME", "LORAT_OFFLINE"
_CHUNK = 1 << 20
_ATTEMPTS = 3  # per download: the first try and two resumptions
_DINOV2 = {(384, 12): "dinov2_vits14", (768, 12): "dinov2_vitb14", (1024, 24): "dinov2_vitl14",
           (1536, 40): "dinov2_vitg14"}  # (embed_dim, depth) of each release


@dataclass(frozen=True)
class NamedModel:
    """An official LoRAT model: its name, its config (a bundled name or a path) and checkpoint file."""

    name: str
    config: str
    checkpoint: str = "model.safetensors"
    sha256: str | None = None  # none published; never invented


MODELS: dict[str, NamedModel] = {m.name.lower(): m for m in (
    NamedModel(f"LoRAT-{size}-{res}", f"{size.lower()}{res}") for size in ("S", "B", "L", "g") for res in (224, 378))}


def named_model(weights: str | os.PathLike) -> NamedModel | None:
    """The named model ``weights`` stands for (case-insensitive), unless it is an existing file."""
    text = str(weights)
    if Path(text).exists():
        return None
    return MODELS.get(text.lower())


def lorat_home() -> Path:
    """Where the LoRAT checkpoints are kept: ``$LORAT_HOME`` or ``~/.cache/lorat``."""
    return Path(os.environ.get(HOME_VARIABLE) or Path.home() / ".cache" / "lorat").expanduser()


def dinov2_cache() -> Path:
    """torch hub's checkpoint folder (where ``load_state_dict_from_url`` keeps DINOv2)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _offline() -> bool:
    return os.environ.get(OFFLINE_VARIABLE, "").lower() in ("1", "true", "yes")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, part: Path, what: str, progress: bool) -> None:
    """Download ``url`` into ``part``, resuming what ``part`` already holds; raise if incomplete."""
    for _ in range(_ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                resumed = response.status == 206
                length = int(response.headers.get("Content-Length") or 0)
                total = have + length if resumed else length
                with open(part, "ab" if resumed else "wb") as out, tqdm(
                        total=total or None, initial=have if resumed else 0, unit="B", unit_scale=True,
                        unit_divisor=1024, desc=f"downloading {part.name.replace('.partial', '')}",
                        disable=not progress, dynamic_ncols=True) as bar:
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        out.write(block)
                        bar.update(len(block))
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # nothing left to send: the partial file is complete
                return
            raise WeightsError(f"cannot download {what} from {url}: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError) as err:  # refused, DNS, timeout, or cut off mid-way
            if not part.exists() or part.stat().st_size == have:
                reason = getattr(err, "reason", err)
                raise WeightsError(f"cannot download {what} from {url} ({reason})") from None
            continue  # got some bytes: resume
        if not total or part.stat().st_size >= total:
            return
    size = part.stat().st_size / 2**20 if part.exists() else 0
    raise WeightsError(f"the download of {what} from {url} was interrupted {_ATTEMPTS} times ({size:.1f} MB "
                       f"kept in {part}); run again to resume")


def fetch(url: str, dest: Path, check: Callable[[Path], None], what: str, sha256: str | None = None,
          progress: bool = True) -> Path:
    """``dest`` if it exists (no network), else download ``url`` to it, checked.

    Args:
        check: raises :class:`lorat.errors.LoratError` when the downloaded file is not what is expected.
        what: the file in messages ("the DINOv2 ViT-B/14 backbone").

    Raises:
        WeightsError: offline and not cached, a network or HTTP error, an interrupted download, or a
            file that fails the check (removed) -- each message says what to put where instead.
    """
    if dest.is_file():
        return dest
    instead = f"download it yourself and put it at {dest}"
    if _offline():
        raise WeightsError(f"{what} is not cached and {OFFLINE_VARIABLE} is set: {instead} (from {url})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.stem}.partial{dest.suffix}")
    try:
        _download(url, part, what, progress)
    except WeightsError as err:
        raise WeightsError(f"{err}; or {instead}") from None
    try:
        if sha256 is not None and _sha256(part) != sha256:
            raise WeightsError(f"sha256 differs from the published {sha256}")
        check(part)
    except LoratError as err:
        part.unlink(missing_ok=True)
        raise WeightsError(f"the file downloaded from {url} is not {what} and was removed ({err}); {instead}") from None
    os.replace(part, dest)
    return dest


def _mirrored(url: str) -> str:
    mirror = os.environ.get(MIRROR_VARIABLE)
    return mirror.rstrip("/") + url.removeprefix(DINOV2_BASE) if mirror else url


def dinov2_release(model_cfg) -> str | None:
    """The DINOv2 release (``dinov2_vitb14``) a model config's backbone comes from, or None."""
    b = model_cfg.backbone
    return _DINOV2.get((b.embed_dim, b.depth)) if b.stem == "patch" and b.patch_size == 14 else None


def dinov2_path(name: str) -> Path:
    """Where torch hub's cache keeps the DINOv2 release ``name`` (``dinov2_vitb14``)."""
    return dinov2_cache() / f"{name}_pretrain.pth"


def dinov2_weights(model_cfg, progress: bool = True) -> Path:
    """The DINOv2 backbone file for a model config, from torch hub's cache or downloaded (checked).

    Raises:
        WeightsError: the config's width has no DINOv2 release, or see :func:`fetch`.
    """
    from lorat.checkpoint.build import check_backbone_file

    name = dinov2_release(model_cfg)
    if name is None:
        raise WeightsError(f"model {model_cfg.variant} has no DINOv2 release to download "
                           f"(embed_dim {model_cfg.backbone.embed_dim}, depth {model_cfg.backbone.depth}, "
                           f"stem {model_cfg.backbone.stem})",
                           missing="backbone_weights")
    url = _mirrored(f"{DINOV2_BASE}/dinov2/{name}/{name}_pretrain.pth")
    return fetch(url, dinov2_path(name), lambda p: check_backbone_file(model_cfg, p),
                 f"the DINOv2 {name} backbone", progress=progress)


def resolve_named(model: NamedModel, backbone_weights: str | os.PathLike | None = None, progress: bool = True):
    """(LoRAT checkpoint path, config, DINOv2 path) of a named model, fetched where needed
    (``backbone_weights``, when given, is used instead of the DINOv2 download).

    Raises:
        WeightsError: the checkpoint is neither cached nor on a mirror (the message says which file
            to download from the Google Drive folder and where to put it), or see :func:`fetch`.
    """
    from lorat.checkpoint.formats import check_official_checkpoint
    from lorat.config import load_config

    config = load_config(model.config)
    dest = lorat_home() / model.name / model.checkpoint
    if not dest.is_file() and not os.environ.get(MIRROR_VARIABLE):
        raise WeightsError(f"{model.name}: the checkpoint is not cached. Download {model.name}/{model.checkpoint} "
                           f"from {LORAT_FOLDER} and put it at {dest} (or pass its path with --weights FILE and "
                           f"--config {model.config})")
    url = f"{os.environ.get(MIRROR_VARIABLE, '').rstrip('/')}/{model.name}/{model.checkpoint}"
    checkpoint = fetch(url, dest, lambda p: check_official_checkpoint(config.model, p),
                       f"the {model.name} checkpoint", model.sha256, progress)
    return checkpoint, config, Path(backbone_weights) if backbone_weights else dinov2_weights(config.model, progress)
