"""LoRAT: Tracking Meets LoRA (ECCV 2024), a faithful and fast implementation.

Public API::

    from lorat import load_model, load_config, build_lorat
"""

from lorat.checkpoint import build_lorat, load_model, save_model
from lorat.config import Config, load_config
from lorat.errors import ConfigError, LoratError, WeightsError
from lorat.model import LoRAT

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "LoRAT",
    "LoratError",
    "WeightsError",
    "__version__",
    "build_lorat",
    "load_config",
    "load_model",
    "save_model",
]
