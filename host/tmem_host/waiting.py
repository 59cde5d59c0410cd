"""Waiting for a condition with a deadline: the one poll loop the tests, the
testbed and the process helpers share (a sleep is never a synchronisation)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it is true (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def all_done(futures: list[asyncio.Future[None]]) -> asyncio.Future[None]:
    """One future for several that never fail: done when all of them are (the
    future itself if they are all the same one)."""
    futures = list(dict.fromkeys(futures))
    if len(futures) == 1:
        return futures[0]
    combined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    left = len(futures)

    def one_done(_: asyncio.Future[None]) -> None:
        nonlocal left
        left -= 1
        if not left and not combined.done():
            combined.set_result(None)

    for future in futures:
        future.add_done_callback(one_done)
    return combined
