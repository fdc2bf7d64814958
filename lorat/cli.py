"""Console scripts (``lorat-track``, ``lorat-train``, ``lorat-evaluate``, ``lorat-app``, ``lorat-vot``, ...): each is
the ``python -m`` command of the same name, with the same error handling (one ``error:`` line, exit 2)."""

from __future__ import annotations

import importlib

from lorat.errors import run_cli

__all__ = ["track", "train", "evaluate", "app", "export", "bench", "vot"]


def _run(module: str) -> int:
    """Import ``module`` only now (``--help`` of one command loads no other) and run its ``main``."""
    return run_cli(importlib.import_module(module).main)


def track() -> int:
    return _run("lorat.track")


def train() -> int:
    return _run("lorat.train")


def evaluate() -> int:
    return _run("lorat.evaluate")


def export() -> int:
    return _run("lorat.export")


def bench() -> int:
    return _run("lorat.bench")


def app() -> int:
    return _run("lorat.apps.gradio_app")


def vot() -> int:
    return _run("lorat.vot")
