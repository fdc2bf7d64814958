"""The model configs, shipped inside the package as ``lorat.configs`` (see ``lorat/files.py``)."""
