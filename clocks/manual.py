"""A clock that moves only when a test says so."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any

DEFAULT_WALL = 1_800_000_000.0  # 2027-01-15: a plausible unix time, far from today's
DEFAULT_MONOTONIC = 10_000.0


class ManualTimer:
    """What ``ManualClock.call_later`` returns."""

    __slots__ = ("due", "callback", "args", "cancelled")

    def __init__(self, due: float, callback: Callable[..., Any], args: tuple) -> None:
        self.due = due
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def when(self) -> float:
        return self.due


class ManualClock:
    """A :class:`clocks.Clock` for tests: time stands still until ``advance``.

    ``await clock.advance(5)`` moves wall and monotonic time forward by 5 s,
    firing every timer and waking every sleeper that falls due, in due order
    and each at its own instant (a sleeper woken at +1 s that sleeps 1 s more
    is woken again at +2 s within the same ``advance``). After each wake-up the
    event loop gets ``settle_turns`` turns, so what the woken code does next
    without real I/O has happened when ``advance`` returns. Work that waits on
    real I/O (a SQLite thread, a socket) is waited for with ``eventually()``.
    """

    def __init__(self, now: float = DEFAULT_WALL, monotonic: float = DEFAULT_MONOTONIC, settle_turns: int = 20) -> None:
        self._wall = float(now)
        self._mono = float(monotonic)
        self.settle_turns = settle_turns
        self._heap: list[tuple[float, int, ManualTimer]] = []
        self._seq = itertools.count()

    # ------------------------------------------------------------- Clock

    def now(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> ManualTimer:
        timer = ManualTimer(self._mono + max(0.0, float(delay)), callback, args)
        heapq.heappush(self._heap, (timer.due, next(self._seq), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future = asyncio.get_running_loop().create_future()
        timer = self.call_later(seconds, _wake, future)
        try:
            await future
        finally:
            timer.cancel()

    # ------------------------------------------------------- test controls

    @property
    def pending(self) -> int:
        """Timers and sleepers not yet due (nor cancelled)."""
        return sum(1 for _, _, timer in self._heap if not timer.cancelled)

    def next_due(self) -> float | None:
        """Seconds until the earliest pending timer, or None."""
        self._drop_cancelled()
        return self._heap[0][0] - self._mono if self._heap else None

    async def advance(self, seconds: float) -> None:
        """Move time forward, firing what falls due on the way (see the class docstring)."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        target = self._mono + seconds
        await self.settle()
        while True:
            self._drop_cancelled()
            if not self._heap or self._heap[0][0] > target:
                break
            due, _, timer = heapq.heappop(self._heap)
            self._step_to(due)
            timer.callback(*timer.args)
            await self.settle()
        self._step_to(target)
        await self.settle()

    async def run_until_idle(self, limit: float = 3600.0) -> None:
        """Advance to each next timer in turn until none is left within ``limit`` seconds."""
        end = self._mono + limit
        while (delay := self.next_due()) is not None and self._mono + delay <= end:
            await self.advance(delay)

    def jump_wall(self, seconds: float) -> None:
        """Step wall time only (an NTP correction): monotonic time and timers do not move."""
        self._wall += seconds

    async def settle(self) -> None:
        """Give the event loop a few turns: woken tasks run up to their next real wait."""
        for _ in range(self.settle_turns):
            await asyncio.sleep(0)

    async def sleepers(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait (bounded, in real time) until at least ``count`` timers are pending.

        Use before ``advance`` when the code under test starts its sleep in a
        task of its own: advancing before it sleeps would move time past it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending < count:
            if loop.time() > deadline:
                raise TimeoutError(f"{self.pending} timers pending after {timeout}s, wanted {count}")
            await asyncio.sleep(0.001)

    # ------------------------------------------------------------ internals

    def _step_to(self, mono: float) -> None:
        if mono > self._mono:
            self._wall += mono - self._mono
            self._mono = mono

    def _drop_cancelled(self) -> None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)

    def __repr__(self) -> str:
        return f"ManualClock(now={self._wall:.3f}, monotonic={self._mono:.3f}, pending={self.pending})"


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
