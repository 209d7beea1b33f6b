"""Work spread over threads (`--jobs`): the shards of a directory read, or written, a few at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_in_threads(task: Callable[[T], R], items: Sequence[T], threads: int, name: str = "ckptsurgeon") -> list[R]:
    """`task` of every item, in `threads` threads (in this one for one thread or one item); the
    results in the items' order. The first failure in the items' order is raised once every
    started task has ended (tasks not started yet are cancelled): nothing is left running."""
    if threads <= 1 or len(items) <= 1:
        return [task(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix=name) as pool:
        futures = [pool.submit(task, item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
