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
One process at a time downloads a file (a lock, ``<file>.lock``, stays beside it); another one waits
and then uses the finished file. A download stops as soon as it is larger than the config allows
(its tensors in float32 plus headers), and an empty ``.partial`` file is never left behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lorat.errors import LoratError, WeightsError

__all__ = ["NamedModel", "MODELS", "named_model", "lorat_home", "dinov2_cache", "fetch", "dinov2_weights",
           "dinov2_release", "dinov2_path", "checkpoint_limit", "dinov2_limit",
           "resolve_named", "DINOV2_BASE", "LORAT_FOLDER"]

DINOV2_BASE = "https://dl.fbaipublicfiles.com"
LORAT_FOLDER = "https://drive.google.com/drive/folders/1FvViP0MCSiAu2FSrNjg7XEORn74yOBdD"
MIRROR_VARIABLE, HOME_VARIABLE, OFFLINE_VARIABLE = "LORAT_MIRROR", "LORAT_HOME", "LORAT_OFFLINE"
_CHUNK = 1 << 20
_ATTEMPTS = 3  # per download: the first try and two resumptions
_TIMEOUT = 30.0  # seconds without a byte before a request counts as stalled
_BYTES_PER_VALUE, _HEADER_SHARE, _HEADER_BYTES = 4, 0.10, 2**20  # size limits: float32, plus 10% and 1 MB
_DINOV2_GRID = 37  # a DINOv2 release's position grid (518 / 14) besides its CLS slot
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


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range`` header (``bytes A-B/N`` or ``bytes */N``); None where absent."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if match is None:
        return None, None
    start, total = match.groups()
    return int(start) if start is not None else None, int(total) if total.isdigit() else None


def _content_length(headers) -> int | None:
    value = (headers.get("Content-Length") or "").strip()
    return int(value) if value.isdigit() else None


class _Download:
    """Download ``url`` into ``part``, resuming what ``part`` already holds, never past ``limit`` bytes."""

    def __init__(self, url: str, part: Path, what: str, limit: int | None, progress: bool):
        self.url, self.part, self.what, self.limit, self.progress = url, part, what, limit, progress
        self.received = 0  # bytes written by the current attempt

    def run(self) -> None:
        """Raises WeightsError: a network or HTTP error, a file larger than the limit, a server that
        cannot resume, or too many interruptions."""
        for _ in range(_ATTEMPTS):
            if self._attempt():
                return
        raise WeightsError(f"the download of {self.what} from {self.url} was interrupted {_ATTEMPTS} times "
                           f"({_mb(_size(self.part))} kept in {self.part}); run again to resume")

    def _attempt(self) -> bool:
        """One request; True when the file is complete, False when it was cut off after some bytes."""
        have = _size(self.part)
        self.received = 0
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
                offset, total = self._plan(response, have)
                self._receive(response, offset, total)
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:
                return self._unsatisfiable(err, have)
            reason = "too many redirects (a redirect loop)" if 300 <= err.code < 400 else _one_line(err.reason)
            raise WeightsError(f"cannot download {self.what} from {self.url}: HTTP {err.code} {reason}") from None
        except (OSError, http.client.HTTPException) as err:  # refused, DNS, timeout, or cut off mid-way
            if not self.received:
                reason = _one_line(getattr(err, "reason", None) or err) or type(err).__name__
                raise WeightsError(f"cannot download {self.what} from {self.url} ({reason})") from None
            return False  # got some bytes: resume
        return total is None or _size(self.part) >= total

    def _plan(self, response, have: int) -> tuple[int, int | None]:
        """(where the body goes in the file, the file's announced size) of an answer to a request for ``have``-."""
        length = _content_length(response.headers)
        if response.status == 206:  # a range: it must start where the file ends
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != have:
                sent = f"it sent Content-Range {response.headers.get('Content-Range')!r}" if start is None else \
                    f"it sent those from {start:,}"
                raise WeightsError(f"the server at {self.url} cannot resume the partial download {self.part} (asked "
                                   f"for the bytes from {have:,}, {sent}); delete {self.part} to download from "
                                   f"the start")
            offset = have
            total = total if total is not None else have + length if length is not None else None
        else:  # the whole file (a range ignored: start over)
            offset, total = 0, length
        if self.limit is not None and total is not None and total > self.limit:
            self.part.unlink(missing_ok=True)
            raise WeightsError(f"{self.url} announces {_mb(total)} for {self.what}, more than the {_mb(self.limit)} "
                               f"its config allows: refused" + (", and the partial download removed" if have else ""))
        return offset, total

    def _receive(self, response, offset: int, total: int | None) -> None:
        """Write the body at ``offset`` (the file is opened, truncated there, at the first byte received)."""
        out, over = None, False
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"downloading {self.part.name.replace('.partial', '')}", disable=not self.progress,
                   dynamic_ncols=True)
        try:
            while block := response.read1(_CHUNK):  # what has arrived, up to a chunk: a stall loses nothing
                if self.limit is not None and offset + self.received + len(block) > self.limit:
                    over = True
                    break
                out = out or self._open(offset)
                try:
                    out.write(block)
                except OSError as err:
                    raise self._unwritable(err) from None
                self.received += len(block)
                bar.update(len(block))
        finally:
            bar.close()
            if out is not None:
                try:
                    out.close()
                except OSError as err:  # what the buffer held could not be written
                    raise self._unwritable(err) from None
        if over:
            self.part.unlink(missing_ok=True)
            raise WeightsError(f"{self.url} sent more than {_mb(self.limit)} for {self.what}, more than its config "
                               f"allows: stopped, and the partial download removed")

    def _open(self, offset: int):
        try:
            out = open(self.part, "r+b" if offset else "wb")
            out.truncate(offset)
            out.seek(offset)
            return out
        except OSError as err:
            raise self._unwritable(err) from None

    def _unwritable(self, err: OSError) -> WeightsError:
        return WeightsError(f"cannot write {self.part} ({err.strerror or err}; {_mb(_size(self.part))} kept there)")

    def _unsatisfiable(self, err: urllib.error.HTTPError, have: int) -> bool:
        """HTTP 416 to a request for the bytes from ``have``: complete when the file is ``have`` bytes long."""
        _, total = _content_range(err.headers.get("Content-Range"))
        if total == have:
            return True
        size = f"the file has {total:,} bytes" if total is not None else "without the file's size"
        raise WeightsError(f"the server at {self.url} cannot resume the partial download {self.part} ({have:,} bytes "
                           f"kept; it answered HTTP 416, {size}); delete {self.part} to download from the start")


def _cache_folder(folder: Path, variable: str) -> None:
    """Create ``folder`` (a cache folder chosen by ``$variable``) or say how to choose another."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WeightsError(f"cannot create the cache folder {folder} ({err.strerror or err}: {err.filename}); set "
                           f"{variable} to a folder you can write to") from None


def _lock(dest: Path, what: str, variable: str):
    """The held lock of ``dest`` (``dest.lock``), waiting (with a note) while another process downloads it."""
    import filelock

    lock = filelock.FileLock(f"{dest}.lock")
    try:
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            print(f"note: another process is downloading {what} to {dest}; waiting for it", file=sys.stderr,
                  flush=True)
            lock.acquire()
    except OSError as err:
        raise WeightsError(f"cannot write in the cache folder {dest.parent} ({err.strerror or err}); set {variable} "
                           f"to a folder you can write to") from None
    return lock


def fetch(url: str, dest: Path, check: Callable[[Path], None], what: str, sha256: str | None = None,
          progress: bool = True, limit: Callable[[], int] | None = None, variable: str = HOME_VARIABLE) -> Path:
    """``dest`` if it exists (no network), else download ``url`` to it, checked.

    One process at a time downloads ``dest`` (the lock ``dest.lock``); another waits, then uses its file.

    Args:
        check: raises :class:`lorat.errors.LoratError` when the downloaded file is not what is expected.
        what: the file in messages ("the DINOv2 ViT-B/14 backbone").
        limit: the most bytes the file may have (called only when downloading); a larger download stops.
        variable: the environment variable that chooses ``dest``'s cache folder (for messages).

    Raises:
        WeightsError: offline and not cached, a cache folder that cannot be created, a network or HTTP
            error, an interrupted download, a file larger than ``limit`` or one that fails the check
            (both removed) -- each message says what to put where instead.
    """
    if dest.is_file():
        return dest
    instead = f"download it yourself and put it at {dest}"
    if _offline():
        raise WeightsError(f"{what} is not cached and {OFFLINE_VARIABLE} is set: {instead} (from {url})")
    _cache_folder(dest.parent, variable)
    lock = _lock(dest, what, variable)
    try:
        if dest.is_file():  # another process downloaded it meanwhile
            return dest
        _fetch_locked(url, dest, check, what, sha256, progress, limit() if limit else None, instead)
    finally:
        lock.release()
    return dest


def _fetch_locked(url: str, dest: Path, check: Callable[[Path], None], what: str, sha256: str | None,
                  progress: bool, limit: int | None, instead: str) -> None:
    part = dest.with_name(f"{dest.stem}.partial{dest.suffix}")
    try:
        _Download(url, part, what, limit, progress).run()
    except WeightsError as err:
        raise WeightsError(f"{err}; or {instead}") from None
    finally:
        if part.is_file() and not _size(part):  # nothing received: leave no empty file behind
            part.unlink(missing_ok=True)
    try:
        if sha256 is not None and _sha256(part) != sha256:
            raise WeightsError(f"sha256 differs from the published {sha256}")
        check(part)
    except LoratError as err:
        part.unlink(missing_ok=True)
        raise WeightsError(f"the file downloaded from {url} is not {what} and was removed ({err}); {instead}") from None
    try:
        os.replace(part, dest)
    except OSError as err:
        raise WeightsError(f"cannot move the download {part} to {dest} ({err.strerror or err})") from None


def _file_limit(values: int) -> int:
    """The most bytes a file of ``values`` numbers takes: float32 (fp16 and bf16 files are smaller) plus headers."""
    return int(values * _BYTES_PER_VALUE * (1 + _HEADER_SHARE)) + _HEADER_BYTES


def checkpoint_limit(model_cfg) -> int:
    """The most bytes an official (trainable-only) checkpoint of ``model_cfg`` takes (no memory: the meta device)."""
    import torch

    from lorat.checkpoint.build import build_lorat

    with torch.device("meta"):
        model = build_lorat(model_cfg)
    return _file_limit(sum(p.numel() for p in model.parameters() if p.requires_grad))


def dinov2_limit(model_cfg) -> int:
    """The most bytes a DINOv2 release file for ``model_cfg``'s backbone takes: the backbone's tensors and the
    release's own position grid, CLS token and mask token (no memory: the meta device)."""
    import torch

    from lorat.checkpoint.build import build_lorat

    with torch.device("meta"):
        model = build_lorat(model_cfg, lora=False)
    values = sum(v.numel() for k, v in model.state_dict().items()
                 if k != "token_type_embed" and not k.startswith("head."))
    return _file_limit(values + (1 + _DINOV2_GRID ** 2 + 2) * model_cfg.backbone.embed_dim)


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
                 f"the DINOv2 {name} backbone", progress=progress, limit=lambda: dinov2_limit(model_cfg),
                 variable="TORCH_HOME")


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
                       f"the {model.name} checkpoint", model.sha256, progress, lambda: checkpoint_limit(config.model))
    return checkpoint, config, Path(backbone_weights) if backbone_weights else dinov2_weights(config.model, progress)
