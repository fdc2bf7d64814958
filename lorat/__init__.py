"""LoRAT: Tracking Meets LoRA (ECCV 2024), a faithful and fast implementation.

Public API::

    from lorat import Tracker, TrackResult, load_model, load_config, build_lorat

    tracker = Tracker.from_pretrained("LoRAT-B-224")  # or a weight file; None: the bundled demo model
    tracker.init(first_frame_rgb, (x, y, w, h))
    result = tracker.track(next_frame_rgb)      # TrackResult(box=(x, y, w, h), score=...)
"""

import importlib
from typing import TYPE_CHECKING

from lorat.errors import ConfigError, LoratError, WeightsError

if TYPE_CHECKING:  # the public API below is imported on first use, so ``import lorat`` stays light
    from lorat.checkpoint.build import build_lorat
    from lorat.checkpoint.loader import load_model, save_model
    from lorat.config import Config, load_config
    from lorat.model.vit import LoRAT
    from lorat.tracking.tracker import Tracker, TrackResult

_LAZY = {"build_lorat": "lorat.checkpoint.build", "load_model": "lorat.checkpoint.loader",
         "save_model": "lorat.checkpoint.loader", "Config": "lorat.config", "load_config": "lorat.config",
         "LoRAT": "lorat.model.vit", "Tracker": "lorat.tracking.tracker", "TrackResult": "lorat.tracking.tracker"}

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "LoRAT",
    "LoratError",
    "TrackResult",
    "Tracker",
    "WeightsError",
    "__version__",
    "build_lorat",
    "load_config",
    "load_model",
    "save_model",
]


def __getattr__(name: str):
    """Import a public name from its module on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorat' has no attribute {name!r}")
