"""Console scripts (``lorat-track``, ``lorat-train``, ``lorat-evaluate``, ``lorat-app``, ``lorat-vot``, ...): each is
the ``python -m`` command of the same name, with the same error handling (one ``error:`` line, exit 2)."""

from __future__ import annotations

from lorat.errors import run_cli

__all__ = ["track", "train", "evaluate", "app", "export", "bench", "vot"]


def track() -> int:
    from lorat.track import main

    return run_cli(main)


def train() -> int:
    from lorat.train import main

    return run_cli(main)


def evaluate() -> int:
    from lorat.evaluate import main

    return run_cli(main)


def export() -> int:
    from lorat.export import main

    return run_cli(main)


def bench() -> int:
    from lorat.bench import main

    return run_cli(main)


def app() -> int:
    from lorat.apps.gradio_app import main

    return run_cli(main)


def vot() -> int:
    from lorat.vot import main

    return run_cli(main)
