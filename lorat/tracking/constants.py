"""Small constant tensors on the model's device, made without a host synchronisation.

The crop geometry and the step need a few constants per frame (sizes, ImageNet statistics). Made
with :func:`const`, they are copied without waiting for queued kernels; while a CUDA graph is
captured (:mod:`lorat.tracking.cuda_graph`), :func:`static_constants` keeps them in a store that
lives as long as the graph, because a graph cannot copy from host memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["const", "static_constants"]


_STATIC: ContextVar[dict | None] = ContextVar("lorat_static_constants", default=None)


def const(values, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A small constant tensor on ``device`` without a host-device synchronisation.

    ``torch.tensor(..., device="cuda")`` copies synchronously; a non-blocking copy from pageable
    memory is staged by CUDA at once and does not wait for queued kernels. Inside
    :func:`static_constants` equal values give one shared tensor (never modify it).
    """
    store = _STATIC.get()
    key = (repr(values), dtype, torch.device(device))
    if store is not None and key in store:
        return store[key]
    tensor = torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
    if store is not None:
        store[key] = tensor
    return tensor


@contextmanager
def static_constants(store: dict) -> Iterator[dict]:
    """Within this block :func:`const` keeps each distinct constant in ``store`` and reuses it.

    A CUDA graph cannot copy from host memory while it is captured: run the step once inside this
    block (the constants are uploaded), then capture it inside the same block (they are reused).
    The graph reads them at every replay, so keep ``store`` as long as the graph.
    """
    token = _STATIC.set(store)
    try:
        yield store
    finally:
        _STATIC.reset(token)
