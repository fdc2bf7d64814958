"""Training data loading: ``NAME=PATH`` arguments to datasets, and DataLoaders that resume exactly."""

from __future__ import annotations

import signal
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from lorat.config import TrainConfig
from lorat.data.pairs import Source
from lorat.data.sequences import DatasetArg, parse_dataset_arg, read_dataset

__all__ = ["parse_data", "sources", "loader", "batches"]


def parse_data(items: Sequence[str], option: str) -> list[DatasetArg]:
    """The ``NAME=PATH`` / ``NAME:SPLIT=PATH`` values of ``option`` (``--data``, ``--val-data``), checked.

    Raises:
        DatasetError: a malformed value or an unknown name (see :func:`~lorat.data.sequences.parse_dataset_arg`).
    """
    return [parse_dataset_arg(item, option) for item in items]


def sources(items, cfg: TrainConfig, default_split: str) -> list[Source]:
    sources = []
    for name, path, split in items:
        sequences = read_dataset(name, path, split or default_split)
        weight = cfg.dataset_weights.get(name, 1.0)
        sources.append(Source(name, sequences, weight))
    return sources


def _quiet_worker(_: int) -> None:
    """Data workers ignore Ctrl-C / SIGTERM (sent to the whole process group): the main process
    finishes the step, saves the state and then shuts the workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def loader(dataset, indices: list[int], batch: int, workers: int, seed: Sequence[int]) -> DataLoader:
    """A DataLoader over ``dataset[indices]``, in order, with a generator of its own seeded from ``seed``.

    Starting an iterator draws the workers' base seed from the loader's generator, which would
    otherwise be the global torch RNG that drop-path uses: a resumed run, which starts one more
    iterator than an uninterrupted one, would then be one draw off.
    """
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    return DataLoader(Subset(dataset, indices), batch_size=batch, shuffle=False, num_workers=workers,
                      collate_fn=_collate, drop_last=False, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_quiet_worker if workers else None, generator=generator,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


@contextmanager
def batches(loader: DataLoader, quiet: bool = False) -> Iterator[Iterator[dict[str, torch.Tensor]]]:
    """Iterate ``loader``, shutting its workers down on leaving, whatever the reason.

    The workers ignore SIGTERM (:func:`_quiet_worker`), so an iterator kept alive by a traceback
    (an error raised in a worker holds one) would leave them running, and the interpreter
    would wait for them forever at exit. ``quiet``: no "unreadable image" warnings (they are
    counted instead), in the workers too, which inherit the filter when they start.
    """
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", UserWarning)
        iterator = iter(loader)
        try:
            yield iterator
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
            if shutdown is not None:
                shutdown()
