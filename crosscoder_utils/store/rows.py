"""Row arithmetic shared by reading and streaming: which unit (shard, record batch) a row falls in,
a rank's share of a batch, and batches cut from shuffled windows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def rank_share(indices: np.ndarray, process: tuple[int, int]) -> np.ndarray:
    """The sorted rows of ``indices`` that fall to rank ``process[0]`` of ``process[1]``: a contiguous range
    of them (sorted, so reads stay in order on disk)."""
    rank, world = process
    return np.array_split(np.sort(indices), world)[rank]


def groups(ordered: np.ndarray, starts: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Split sorted row numbers by the unit (shard, record batch) they fall in, given each unit's first row:
    [(unit, rows counted from the unit's start), ...]."""
    edges = np.append(np.searchsorted(ordered, starts), len(ordered))
    return [(u, ordered[edges[u] : edges[u + 1]] - starts[u]) for u in np.flatnonzero(edges[1:] > edges[:-1])]


def index_batches(windows: Iterable[np.ndarray], tokens_per_batch: int) -> Iterator[np.ndarray]:
    """Cut a stream of index windows into batches of exactly ``tokens_per_batch``."""
    pending = np.empty(0, dtype=np.int64)
    for window in windows:
        pending = np.concatenate([pending, window])
        while len(pending) >= tokens_per_batch:
            yield pending[:tokens_per_batch]
            pending = pending[tokens_per_batch:]
