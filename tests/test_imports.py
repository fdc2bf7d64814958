"""``import lorat`` stays light: heavy optional libraries load only where they are used."""

import subprocess
import sys

from .conftest import ROOT


def test_import_lorat_loads_neither_peft_gradio_nor_matplotlib():
    code = ("import sys, lorat; from lorat.checkpoint import load_model; "
            "print(' '.join(m for m in ('peft', 'transformers', 'gradio', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
