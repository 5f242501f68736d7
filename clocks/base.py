"""The clock protocol and the real clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


@runtime_checkable
class Timer(Protocol):
    """A callback scheduled by ``Clock.call_later``; ``asyncio.TimerHandle`` is one."""

    def cancel(self) -> None: ...


@runtime_checkable
class Clock(Protocol):
    """Where time comes from.

    ``now()`` is wall time (unix seconds: what goes on the wire, e.g. a lease's
    ``expires_at``); ``monotonic()`` measures intervals (liveness, rate limits);
    ``sleep`` and ``call_later`` wait on the same time line as ``monotonic()``.
    """

    def now(self) -> float: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer: ...


class SystemClock:
    """The real thing: ``time.time``, the running loop's time, ``asyncio.sleep``."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback, *args)

    def __repr__(self) -> str:
        return "SystemClock()"


async def wait_for(clock: Clock, aw: Awaitable[T], timeout: float | None) -> T:
    """``asyncio.wait_for`` on ``clock``'s time line: TimeoutError after ``timeout`` seconds of it."""
    if timeout is None or isinstance(clock, SystemClock):
        return await asyncio.wait_for(aw, timeout)
    task = asyncio.ensure_future(aw)
    expired = False

    def expire() -> None:
        nonlocal expired
        if not task.done():
            expired = True
            task.cancel()

    timer = clock.call_later(max(0.0, timeout), expire)
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if expired and (current is None or not current.cancelling()):
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()
        if not task.done():
            task.cancel()
