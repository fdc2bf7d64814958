"""Training with the official recipe, on one process or under torchrun (DDP).

* :mod:`lorat.training.trainer` -- :class:`~lorat.training.trainer.TrainingRun` and
  :func:`~lorat.training.trainer.run_training`: the loop, validation, logs, checkpoints.
* :mod:`lorat.training.optim` -- parameter groups, AdamW, the cosine schedule, the training step.
* :mod:`lorat.training.loss` -- the official losses (varifocal + GIoU).
* :mod:`lorat.training.run_folder` -- what a run folder holds: config, arguments, state, checkpoints.

The training pairs come from :mod:`lorat.data`.
"""
