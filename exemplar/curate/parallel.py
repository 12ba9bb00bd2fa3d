"""Per-row work over a stream, on several cores, in input order, with bounded memory.

`multiprocessing.Pool.imap` reads its whole input ahead (its feeder thread has no back-pressure),
which would hold a file larger than memory; here at most `2 x workers` chunks are in flight.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def map_chunks(
    fn: Callable[[list[T]], list[R]],
    items: Iterable[T],
    workers: int,
    chunk_size: int = 256,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
) -> Iterator[tuple[list[T], list[R]]]:
    """(chunk, fn(chunk)) for consecutive chunks of `items`, in order. `fn` and `initializer` run
    in `workers` processes (in this one when workers is 1); the chunk itself stays here."""
    chunks = chunked(items, chunk_size)
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for chunk in chunks:
            yield chunk, fn(chunk)
        return
    import multiprocessing as mp

    # fork where there is one: workers start at once and inherit registered formats and imports.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp.get_context(method), initializer, initargs) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(fn, chunk)))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
