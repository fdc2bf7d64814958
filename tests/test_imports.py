"""``import lorat`` stays light: heavy optional libraries load only where they are used."""

import subprocess
import sys

import pytest

from .conftest import ROOT

HEAVY = ("peft", "transformers", "gradio", "matplotlib")


def _loaded(code: str, modules: tuple[str, ...]) -> list[str]:
    """The ``modules`` that a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint('loaded:', *(m for m in {modules!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return result.stdout.splitlines()[-1].split()[1:]


def test_import_lorat_loads_no_heavy_library():
    assert _loaded("import lorat", HEAVY + ("torch", "timm")) == []


def test_loading_and_tracking_load_neither_peft_gradio_nor_matplotlib():
    assert _loaded("import lorat; from lorat.checkpoint.loader import load_model; lorat.Tracker", HEAVY) == []


@pytest.mark.parametrize("command", ["lorat.track", "lorat.evaluate", "lorat.train"])
def test_help_is_printed_before_torch_is_imported(command):
    code = f"from {command} import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert _loaded(code, ("torch", "timm", *HEAVY)) == []
