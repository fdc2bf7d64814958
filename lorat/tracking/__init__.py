"""The tracking loop of the official inference pipeline, batched and on the model's device.

* :mod:`lorat.tracking.tracker` -- :class:`~lorat.tracking.tracker.Tracker`: ``init`` / ``track`` /
  ``stream`` for one target or several.
* :mod:`lorat.tracking.step` -- the stateless, batched step: state, crops, forward pass, decoding.
* :mod:`lorat.tracking.cuda_graph` -- the whole step replayed as one CUDA graph.
* :mod:`lorat.tracking.crop` -- pixel-aligned crops on any device.
* :mod:`lorat.tracking.boxes` -- box formats and the official rasterisation.
* :mod:`lorat.tracking.assignment` -- keeping look-alike targets apart (``lap``).
* :mod:`lorat.tracking.constants` -- small device constants without host synchronisation.
"""
