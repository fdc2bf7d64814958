"""Writing files so that readers, resumed runs and a kill mid-write never see half a file."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from lorat.errors import LoratError

# Image files read as frames (image folders, datasets, photos); lower-case suffixes.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
# The official rasterisation rule: a pixel counts when a box covers more than this much of it.
RASTER_EPS = 1e-4

__all__ = ["write_atomic"]


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The rename is atomic: ``path`` holds either its previous content or the whole new one. The
    temporary name carries the process id, so processes writing beside each other do not collide.
    Returns ``path``.

    Raises:
        LoratError: the folder cannot be created or the file written (names the path).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise LoratError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path
