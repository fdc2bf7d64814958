"""One training step: the forward pass and its loss (shared with validation), then the optimiser update."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from lorat.training.loss import lorat_loss

if TYPE_CHECKING:
    from lorat.config import TrainConfig

__all__ = ["training_amp", "precision", "forward_loss", "update"]

_AMP = {"float16": torch.float16, "bfloat16": torch.bfloat16, "none": None}


def training_amp(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training (None: float32). ``train.amp: auto`` is float16 on CUDA (the
    official recipe), bfloat16 on a CPU with native bfloat16 (AVX-512 BF16 or AMX: about 2x the
    samples per second of float32), float32 elsewhere; ``none`` is always float32."""
    if cfg.amp != "auto":
        return _AMP[cfg.amp]
    if device.type == "cuda":
        return torch.float16
    from lorat.runtime import cpu_has_bf16

    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None


def precision(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler, Callable]:
    """(autocast dtype, gradient scaler, autocast context factory) for training on ``device``: the
    scaler is on for float16 only (bfloat16 has float32's range)."""
    amp = training_amp(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    return amp, scaler, (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext


def forward_loss(net: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Callable,
                 num_positive: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
    """The network on ``batch`` (on its device) and the loss of its outputs, under ``autocast()``.

    ``num_positive`` is the loss's normaliser: in training the number of positive cells averaged
    over the processes; None (validation) counts this batch's positive cells. Returns ``loss`` (the
    total, to backpropagate) and its detached parts ``cls`` and ``reg`` (:func:`lorat_loss`).
    """
    with autocast():
        x = [batch["x_ref"], batch["x"]] if "x_ref" in batch else batch["x"]  # LoRATv2 phase 2: reference first
        outputs = net(batch["z"], x, batch["z_feat_mask"])
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
