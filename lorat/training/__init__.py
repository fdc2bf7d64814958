"""Training with the official recipe, on one process or under torchrun (DDP).

* :mod:`lorat.training.trainer` -- :func:`~lorat.training.trainer.run_training`: the loop,
  validation, logs, checkpoints.
* :mod:`lorat.training.step` -- forward pass + loss (shared by training and validation) and the
  optimiser step.
* :mod:`lorat.training.optim` -- parameter groups, AdamW, the warm-up + cosine schedule.
* :mod:`lorat.training.loss` -- the official losses (varifocal + GIoU).
* :mod:`lorat.training.run_folder` -- :class:`~lorat.training.run_folder.TrainingRun` (what a run
  needs) and what a run folder holds: config, arguments, data fingerprint, state, checkpoints, and
  the lock that keeps it to one training at a time.

The training pairs come from :mod:`lorat.data`.
"""
