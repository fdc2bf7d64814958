"""Files: writing them so that readers, resumed runs and a kill mid-write never see half a file, and
finding the ones shipped with the package (the model configs and the bundled demo model).

The shipped files live at the top of the checkout (``configs/``, ``weights/``) and inside an installed
wheel as the packages ``lorat.configs`` and ``lorat.weights`` (``pyproject.toml`` maps one onto the
other), so both are found through the import system (:func:`importlib.util.find_spec`) from any folder.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path

from lorat.errors import LoratError

# Image files read as frames (image folders, datasets, photos); lower-case suffixes.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
# The official rasterisation rule: a pixel counts when a box covers more than this much of it.
RASTER_EPS = 1e-4

__all__ = ["write_atomic", "natural_key", "natural_sorted", "bundled_weights", "bundled_config", "config_names"]


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


DEMO_WEIGHTS = "lorat_demo.safetensors"
DEMO_ONNX = "lorat_demo.onnx"
"""The same network exported for ONNX Runtime (end of ``weights/train_demo.sh``): the default backend on a CPU."""
DEMO_ONNX_SHA256 = "e2222812161051d817e40b624b0c9ced550379c05225a6c410d5a535a5724afd"
"""The bundled ONNX file's SHA-256: only a file that matches is opened without the ``onnx`` package's graph check."""


def _folder(package: str) -> Path | None:
    """The folder of a data package (also when it is found as a namespace package), or None."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:  # lorat/ copied without its data
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def bundled_weights() -> Path:
    """The bundled demo model's file (it may be missing from a partial install: check ``is_file()``)."""
    folder = _folder("lorat.weights")
    return (folder or Path(__file__).resolve().parent.parent / "weights") / DEMO_WEIGHTS


def bundled_onnx() -> Path:
    """The bundled demo model's ONNX export (it may be missing: check ``is_file()``)."""
    return bundled_weights().with_name(DEMO_ONNX)


def config_names() -> list[str]:
    """Names of the bundled configs (``b224``, ``demo``, ...)."""
    folder = _folder("lorat.configs")
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def bundled_config(name: str) -> Path | None:
    """The bundled config called ``name`` (``b224``, ``b224.yaml`` or ``configs/b224.yaml``), or None."""
    folder = _folder("lorat.configs")
    stem = Path(name).name.removesuffix(".yaml").removesuffix(".yml")
    if folder is None or Path(name).parent.name not in ("", "configs"):
        return None
    path = folder / f"{stem}.yaml"
    return path if path.is_file() else None


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key of a file name with its runs of digits compared as numbers: ``frame2`` < ``frame10``."""
    return tuple(int(part) if odd else part for odd, part in zip(itertools.cycle((0, 1)), _DIGITS.split(name)))


def natural_sorted(paths: Iterable[Path]) -> list[Path]:
    """``paths`` in natural order of their names (see :func:`natural_key`).

    Raises:
        LoratError: two names that differ only in leading zeros (``frame01``, ``frame1``): their order is unknown.
    """
    ordered = sorted(paths, key=lambda p: natural_key(p.name))
    for a, b in itertools.pairwise(ordered):
        if natural_key(a.name) == natural_key(b.name):
            first, second = sorted((a.name, b.name))
            raise LoratError(f"{a.parent}: {first} and {second} have the same number (frames are read in natural "
                             f"order, frame2 before frame10); rename or remove one")
    return ordered
