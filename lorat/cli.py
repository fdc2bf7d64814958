"""Console scripts (``lorat-track``, ``lorat-train``, ``lorat-evaluate``, ``lorat-app``, ``lorat-vot``, ...): each is
the ``python -m`` command of the same name, with the same error handling (one ``error:`` line, exit 2)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from lorat.errors import run_cli

__all__ = ["track", "train", "evaluate", "app", "export", "bench", "vot"]


def _command(module: str) -> Callable[[], int]:
    """The console script of ``python -m module``: imports the module only when run (``--help`` of one
    command loads no other) and runs its ``main``."""

    def run() -> int:
        return run_cli(importlib.import_module(module).main)

    run.__name__ = run.__qualname__ = module.rsplit(".", 1)[-1]
    return run


track = _command("lorat.track")
train = _command("lorat.train")
evaluate = _command("lorat.evaluate")
export = _command("lorat.export")
bench = _command("lorat.bench")
app = _command("lorat.apps.gradio_app")
vot = _command("lorat.vot.server")
