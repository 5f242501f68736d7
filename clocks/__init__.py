"""Time as a dependency: the one clock leases, presence and rooms read.

Code that expires, renews or rate-limits by time takes a :class:`Clock`
instead of calling ``time.time()``, ``time.monotonic()``, ``asyncio.sleep`` or
``loop.call_later`` itself. ``create_app`` builds one :class:`SystemClock` and
passes it down; tests pass a :class:`ManualClock` and move time with
``await clock.advance(seconds)``, so a 30-second lease lapses in a
microsecond, exactly when it should, on a loaded machine too.

This package imports nothing of the project (it sits at the bottom of the
import graph, next to ``codec``).
"""

from clocks.base import Clock, SystemClock, Timer, wait_for
from clocks.manual import ManualClock

__all__ = ["Clock", "SystemClock", "Timer", "ManualClock", "wait_for"]
