"""``python -m lorat.vot``: see :mod:`lorat.vot.server`."""

from lorat.errors import run_cli
from lorat.vot.server import main

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
