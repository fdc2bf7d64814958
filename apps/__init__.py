"""The Gradio web demo, shipped inside the package as ``lorat.apps`` (``lorat-app``)."""
