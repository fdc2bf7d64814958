"""LoRAT: Tracking Meets LoRA (ECCV 2024), a faithful and fast implementation.

Public API::

    from lorat import Tracker, TrackResult, load_model, load_config, build_lorat

    tracker = Tracker.from_pretrained("weights/lorat_b224.safetensors")
    tracker.init(first_frame_rgb, (x, y, w, h))
    result = tracker.track(next_frame_rgb)      # TrackResult(box=(x, y, w, h), score=...)
"""

from lorat.checkpoint import build_lorat, load_model, save_model
from lorat.config import Config, load_config
from lorat.errors import ConfigError, LoratError, WeightsError
from lorat.model import LoRAT
from lorat.tracker import Tracker, TrackResult

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
