"""``python -m lorat.vot_workspace``: the older name of ``python -m lorat.vot.workspace``."""

from lorat.errors import run_cli
from lorat.vot.workspace import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
