"""The bundled demo model, shipped inside the package as ``lorat.weights`` (see ``lorat/files.py``)."""
