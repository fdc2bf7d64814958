"""Training speed and memory: full steps on generated batches, and the data pipeline's pairs per second.

:func:`time_training_steps` builds the model as ``python -m lorat.train`` does (``train.finetune``:
LoRA on the frozen backbone, or full), with the trainer's optimiser, AMP and compile settings, and
times whole steps (forward, loss, backward, gradient clipping, AdamW) on one batch of random crops
with real labels (:func:`lorat.data.pairs.search_labels`). Weights do not change the speed, so the
backbone starts random. :func:`time_data_pipeline` times the training loader itself: decode, crop,
augment and collate of LaSOT-layout sequences, with N worker processes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lorat.config import Config
from lorat.runtime import dtype_name, peak_rss_mb, synchronize
from lorat.training.step import precision, update

__all__ = ["synthetic_batch", "time_training_steps", "time_data_pipeline"]


def _peak_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA, else the process's peak resident memory (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def synthetic_batch(config: Config, batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch of ``batch`` random crops (``z``, ``x`` in [-2, 2], random template masks) with
    real labels for random target boxes: ``target_box`` (B, 4) normalised xyxy, ``positive`` (B, Hx, Wx);
    LoRATv2 phase 2 adds a random reference crop ``x_ref``."""
    from lorat.data.pairs import search_labels

    m = config.model
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    (tw, th), (sw, sh) = m.template_size, m.search_size
    sizes = rng.uniform(0.15, 0.5, (batch, 2)) * (sw, sh)
    corners = rng.uniform(0, 1, (batch, 2)) * ((sw, sh) - sizes)
    boxes = np.concatenate([corners, corners + sizes], axis=1)
    out = {
        "z": (torch.rand(batch, 3, th, tw, generator=generator) * 4 - 2).to(device),
        "x": (torch.rand(batch, 3, sh, sw, generator=generator) * 4 - 2).to(device),
        "z_feat_mask": torch.randint(0, 2, (batch, *m.template_grid), generator=generator).to(device),
        "target_box": torch.from_numpy((boxes / (sw, sh, sw, sh)).astype(np.float32)).to(device),
        "positive": torch.from_numpy(np.stack([search_labels(b, m.search_size, m.search_grid) for b in boxes]))
        .to(device),
    }
    if m.reference_size:
        rw, rh = m.reference_size
        out["x_ref"] = (torch.rand(batch, 3, rh, rw, generator=generator) * 4 - 2).to(device)
    return out


def time_training_steps(config: Config, device: torch.device, batch: int, steps: int = 10, warmup: int = 3
                        ) -> dict[str, Any]:
    """Time ``steps`` training steps of batch ``batch`` after ``warmup`` untimed ones (compilation happens there).

    The settings are the config's ``train`` section as the trainer resolves it on ``device``
    (``amp``, ``compile``, ``grad_checkpointing``, ``finetune``).

    Returns:
        ``samples_per_s``, ``step_ms`` (mean), ``peak_mb`` (GPU allocated, or process RSS), ``dtype``
        (the autocast dtype, ``float32`` without), ``compile``, ``grad_checkpointing``, ``batch``,
        ``trainable`` (parameters) and ``loss`` (of the last step, finite).
    """
    from lorat.checkpoint.build import build_training_model
    from lorat.training.optim import make_optimizer

    cfg = config.train
    torch.manual_seed(cfg.seed)
    model = build_training_model(config, device=device).train()
    optimizer = make_optimizer(model, cfg)
    amp, scaler, autocast = precision(cfg, device)
    net = torch.compile(model) if cfg.compile else model
    data = synthetic_batch(config, batch, device)
    num_pos = data["positive"].sum().float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        update(net, optimizer, scaler, data, num_pos, autocast, cfg.grad_clip)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        losses = update(net, optimizer, scaler, data, num_pos, autocast, cfg.grad_clip)
    synchronize(device)
    seconds = (time.perf_counter() - started) / max(steps, 1)
    return {"samples_per_s": batch / seconds, "step_ms": seconds * 1000, "peak_mb": _peak_mb(device),
            "dtype": dtype_name(amp), "compile": cfg.compile, "grad_checkpointing": cfg.grad_checkpointing,
            "batch": batch, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "loss": float(losses["loss"].detach())}


def time_data_pipeline(config: Config, data: Sequence[tuple[str, str, str | None]], workers: int, batch: int,
                       batches: int = 20) -> dict[str, Any]:
    """Training pairs per second from the training loader (decode, crop, augment, collate) with
    ``workers`` worker processes (0: in this process), over ``batches`` batches after the first.

    ``data``: ``(name, path, split)`` items as ``python -m lorat.train --data`` takes them.
    """
    from lorat.data.loading import batches as batch_stream
    from lorat.data.loading import loader, sources
    from lorat.data.pairs import PairDataset

    cfg = dataclasses.replace(config.train, num_workers=workers)
    count = batch * (batches + 1)
    dataset = PairDataset(sources(data, cfg, "train"), config.model, config.tracking, cfg, count, cfg.seed)
    started = None
    pairs = 0
    with batch_stream(loader(dataset, list(range(count)), batch, workers, (cfg.seed, 0)), quiet=True) as stream:
        for i, item in enumerate(stream):
            if i == 0:  # the first batch pays the workers' start-up
                started = time.perf_counter()
                continue
            pairs += len(item["z"])
    seconds = time.perf_counter() - started if started is not None else float("nan")
    return {"pairs_per_s": pairs / seconds, "workers": workers, "batch": batch, "pairs": pairs}


def loss_curve(config: Config, device: torch.device, data: Sequence[dict[str, torch.Tensor]], steps: int
               ) -> list[float]:
    """Training loss at each of ``steps`` steps over the batches ``data`` (cycled), from the seeded
    start, with the config's training settings on ``device`` (what ``--amp`` changes, for instance);
    the learning rate follows the trainer's warm-up + cosine schedule over ``steps``."""
    from lorat.checkpoint.build import build_training_model
    from lorat.training.optim import make_optimizer, make_scheduler

    cfg = config.train
    torch.manual_seed(cfg.seed)
    model = build_training_model(config, device=device).train()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, dataclasses.replace(cfg, epochs=1), steps)
    _, scaler, autocast = precision(cfg, device)
    losses = []
    for step in range(steps):
        scheduler.step_update(max(step - 1, 0))
        batch = {k: v.to(device) for k, v in data[step % len(data)].items()}
        out = update(model, optimizer, scaler, batch, batch["positive"].sum().float(), autocast, cfg.grad_clip)
        losses.append(float(out["loss"].detach()))
    return losses
