"""One training step: the forward pass and its loss (shared with validation), then the optimiser update."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorat.training.loss import lorat_loss

__all__ = ["forward_loss", "update"]


def forward_loss(net: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Callable,
                 num_positive: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
    """The network on ``batch`` (on its device) and the loss of its outputs, under ``autocast()``.

    ``num_positive`` is the loss's normaliser: in training the number of positive cells averaged
    over the processes; None (validation) counts this batch's positive cells. Returns ``loss`` (the
    total, to backpropagate) and its detached parts ``cls`` and ``reg`` (:func:`lorat_loss`).
    """
    with autocast():
        outputs = net(batch["z"], batch["x"], batch["z_feat_mask"])
        return lorat_loss(outputs, batch["target_box"], batch["positive"], num_positive)


def update(net: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
           batch: dict[str, torch.Tensor], num_pos: torch.Tensor, autocast: Callable, grad_clip: float
           ) -> dict[str, torch.Tensor]:
    """One optimiser step on ``batch`` (on the model's device): AMP, global-norm clipping; the losses.

    ``num_pos`` is the number of positive cells averaged over the processes (the loss's normaliser).
    """
    losses = forward_loss(net, batch, autocast, num_pos)
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return losses
