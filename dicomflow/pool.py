"""A small thread pool for I/O-bound fan-out (Storage reads, listings)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Threads per fan-out. Each holds one Storage connection at a time (the client's pool is
# sized for a few of these at once: see runtime.STORAGE_POOL_SIZE).
THREADS = 16


def pmap(fn: Callable[[T], R], items: Iterable[T], threads: int = THREADS) -> list[R]:
    """``fn`` over ``items`` in a pool of at most ``threads``, results in order."""
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="pool") as pool:
        return list(pool.map(fn, items))
