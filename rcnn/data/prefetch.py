"""Reading the next images while this one computes: a per-image loop's host work (decoding a JPEG, reading
an image's records) done ahead by one background thread, so that a GPU does not wait on it.

Decoding with OpenCV, reading HDF5 and numpy's larger operations release Python's lock, and a process that
waits on a GPU holds none; the thread therefore runs beside the device's work, not between it. The results
come back in the order of the items, and an item's error is raised when the caller reaches that item, after
everything before it: what a stage computed before a bad image is written as it would be without the thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(fn: Callable[[T], R], items: Iterable[T], depth: int = 2) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` for each of ``items`` in order, ``fn`` called by one background thread up to
    ``depth`` items before the caller asks for them (``depth`` 0: called in turn, in the caller's thread).

    ``fn`` must not share unlocked state with what the caller does meanwhile. Closing the iterator early (a
    ``break``, an exception in the loop) cancels what has not started and waits for the call under way, so
    nothing ``fn`` reads is closed under it.
    """
    if depth < 1:
        for item in items:
            yield item, fn(item)
        return
    source = iter(items)
    pending: deque[tuple[T, Future]] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="rcnn-read-ahead") as pool:
        try:
            for item in source:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= depth:
                    break
            while pending:
                item, future = pending.popleft()
                result = future.result()  # fn's error, raised at its item
                for following in source:  # keep the thread ``depth`` items ahead while the caller works
                    pending.append((following, pool.submit(fn, following)))
                    break
                yield item, result
        finally:
            for _, future in pending:
                future.cancel()
