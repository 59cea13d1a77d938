"""Device selection shared by the demo models: CUDA when present, else CPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """Return `prefer` when given, else CUDA when available, else CPU."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op CPU thread count (process-wide; None leaves it alone).

    Small models train fastest on one thread, and on a shared, oversubscribed CPU extra OpenMP threads
    spin at barriers and can make training many times slower.
    """
    if threads is None or threads <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
