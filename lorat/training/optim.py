"""The official optimisation recipe: AdamW parameter groups, warm-up + cosine schedule.

The step that uses them (forward, loss, clipped AMP update) is :func:`lorat.training.step.update`.
"""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler

from lorat.config import TrainConfig

__all__ = ["parameter_groups", "make_optimizer", "make_scheduler", "learning_rate", "lr_for_step"]


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for matrices; none for 1-D (after squeeze) / norm parameters and embeddings.

    Officially: LoRA A/B, head ``layers.{0,1}.weight`` and ``head.reg_mlp.layers.2.weight`` decay;
    head biases, ``head.cls_mlp.layers.2.weight`` (1 x C) and ``token_type_embed`` do not.
    """
    decay, no_decay, embed = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "embed" in name:
            embed.append(p)
        elif p.squeeze().ndim <= 1 or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": embed, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (betas 0.9/0.999, eps 1e-8), peak lr ``cfg.lr``."""
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, iters_per_epoch: int) -> CosineLRScheduler:
    """timm's ``CosineLRScheduler`` stepped per update, with the warm-up as a prefix (official settings).

    The optimizer's lr is the peak; the cosine runs over ``epochs * iters_per_epoch`` updates after
    the warm-up and ends near ``min_lr``.
    """
    return CosineLRScheduler(optimizer, t_initial=cfg.epochs * iters_per_epoch, lr_min=cfg.min_lr,
                             warmup_t=int(cfg.warmup_epochs * iters_per_epoch), warmup_lr_init=cfg.warmup_lr,
                             warmup_prefix=True, t_in_epochs=False)


def learning_rate(t: int, cfg: TrainConfig, iters_per_epoch: int) -> float:
    """The scheduler's lr after ``t`` updates (:func:`make_scheduler` on a throw-away optimizer)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    make_scheduler(optimizer, cfg, iters_per_epoch).step_update(t)
    return optimizer.param_groups[0]["lr"]


def lr_for_step(step: int, cfg: TrainConfig, iters_per_epoch: int) -> float:
    """The lr used by optimiser step ``step``: the scheduler is stepped after each update, so
    steps 0 and 1 both use the initial value and step k >= 1 uses ``learning_rate(k - 1)``."""
    return learning_rate(max(step - 1, 0), cfg, iters_per_epoch)

