"""Weight files: from a path (or a model name) to a checked, ready model, and back to one file.

* :mod:`lorat.checkpoint.formats` -- every format the loader knows, each with detect -> check -> load.
* :mod:`lorat.checkpoint.loader` -- :func:`~lorat.checkpoint.loader.load_model` (one file or name to
  a merged model), :func:`~lorat.checkpoint.loader.load` (the command-line model options to a ready
  model or ONNX backend) and :func:`~lorat.checkpoint.loader.save_model`.
* :mod:`lorat.checkpoint.files` -- reading files safely, writing byte-stable safetensors.
* :mod:`lorat.checkpoint.check` -- does a state dict fit a config? (before anything is allocated)
* :mod:`lorat.checkpoint.keys` -- tensor names of the official code and DINOv2 -> ours.
* :mod:`lorat.checkpoint.build` -- models from a config: random, with a pretrained backbone, for training.
* :mod:`lorat.checkpoint.hub` -- named models (``LoRAT-B-224``) and checked downloads.
* :mod:`lorat.checkpoint.onnx` -- ONNX export and the ONNX Runtime backend.
* :mod:`lorat.checkpoint.sam` -- Segment Anything checkpoints (masks for the VOT toolkit).
"""
