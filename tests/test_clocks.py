"""The clocks that leases and presence read (clocks/): the manual one tests drive, and the real one."""

from __future__ import annotations

import asyncio
import time

import pytest

from clocks import Clock, ManualClock, SystemClock, wait_for


def test_both_clocks_satisfy_the_protocol():
    assert isinstance(SystemClock(), Clock)
    assert isinstance(ManualClock(), Clock)


async def test_manual_time_stands_still_until_advanced():
    clock = ManualClock(now=1000.0, monotonic=50.0)
    assert (clock.now(), clock.monotonic()) == (1000.0, 50.0)
    await asyncio.sleep(0.01)  # real time passes; manual time does not
    assert (clock.now(), clock.monotonic()) == (1000.0, 50.0)
    await clock.advance(2.5)
    assert (clock.now(), clock.monotonic()) == (1002.5, 52.5)
    with pytest.raises(ValueError):
        await clock.advance(-1)


async def test_sleepers_wake_in_due_order_each_at_its_own_instant():
    clock = ManualClock()
    start = clock.monotonic()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, *delays: float) -> None:
        for delay in delays:
            await clock.sleep(delay)
            woke.append((name, clock.monotonic() - start))

    tasks = [asyncio.create_task(sleeper("a", 3.0)), asyncio.create_task(sleeper("b", 1.0, 1.0, 1.5))]
    await clock.sleepers(2)
    await clock.advance(0.999)
    assert woke == []
    await clock.advance(10)
    # b slept again after each wake-up, inside the same advance: every wake at its exact due time.
    assert woke == [("b", 1.0), ("b", 2.0), ("a", 3.0), ("b", 3.5)]
    assert all(t.done() for t in tasks)
    assert clock.monotonic() - start == pytest.approx(10.999)


async def test_timers_fire_at_due_time_and_cancelled_ones_never():
    clock = ManualClock()
    fired: list[tuple[str, float]] = []
    t0 = clock.monotonic()
    clock.call_later(2, lambda: fired.append(("two", clock.monotonic() - t0)))
    cancelled = clock.call_later(1, lambda: fired.append(("one", clock.monotonic() - t0)))
    clock.call_later(0, lambda: fired.append(("zero", clock.monotonic() - t0)))
    assert clock.pending == 3 and clock.next_due() == 0
    cancelled.cancel()
    assert clock.pending == 2
    await clock.advance(5)
    assert fired == [("zero", 0.0), ("two", 2.0)]
    assert clock.pending == 0 and clock.next_due() is None


async def test_cancelled_sleep_leaves_no_timer_behind():
    clock = ManualClock()
    task = asyncio.create_task(clock.sleep(30))
    await clock.sleepers(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.pending == 0


async def test_run_until_idle_and_zero_sleep():
    clock = ManualClock()
    done: list[float] = []

    async def chain() -> None:
        await clock.sleep(0)  # yields, does not wait for advance
        for _ in range(3):
            await clock.sleep(10)
        done.append(clock.monotonic())

    task = asyncio.create_task(chain())
    await clock.sleepers(1)
    await clock.run_until_idle()
    assert task.done() and done == [clock.monotonic()]


async def test_wall_time_can_jump_without_moving_intervals():
    clock = ManualClock(now=100.0, monotonic=7.0)
    clock.call_later(1, lambda: None)
    clock.jump_wall(-50)  # an NTP step backwards
    assert (clock.now(), clock.monotonic(), clock.next_due()) == (50.0, 7.0, 1.0)


async def test_wait_for_times_out_on_the_clocks_time_line():
    clock = ManualClock()
    never = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(wait_for(clock, never, 5))
    await clock.sleepers(1)
    await clock.advance(4.9)
    assert not waiting.done()
    await clock.advance(0.1)
    with pytest.raises(TimeoutError):
        await waiting
    assert never.cancelled()
    # Done in time: the result, and the timer is gone.
    soon = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(wait_for(clock, soon, 5))
    await clock.sleepers(1)
    soon.set_result("ok")
    assert await waiting == "ok" and clock.pending == 0


async def test_wait_for_passes_an_outer_cancel_through():
    clock = ManualClock()
    waiting = asyncio.create_task(wait_for(clock, asyncio.sleep(3600), 5))
    await clock.sleepers(1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert clock.pending == 0


async def test_system_clock_is_real_time():
    clock = SystemClock()
    assert abs(clock.now() - time.time()) < 1
    assert abs(clock.monotonic() - time.monotonic()) < 1
    fired = asyncio.Event()
    clock.call_later(0.01, fired.set)
    await asyncio.wait_for(fired.wait(), 5)
    with pytest.raises(TimeoutError):
        await wait_for(clock, asyncio.Event().wait(), 0.01)


def test_create_app_builds_one_clock_and_hands_it_down(tmp_path):
    from collab.app import create_app
    from collab.settings import Settings

    settings = Settings(data_dir=tmp_path)
    clock = ManualClock()
    core = create_app(settings, clock=clock).state.core
    assert core.clock is clock
    users = {ext.name: ext.clock for ext in core.extensions if hasattr(ext, "clock")}
    assert set(users) >= {"presence", "locks"} and all(c is clock for c in users.values())
    assert core.extensions[[e.name for e in core.extensions].index("presence")].registry.clock is clock
    # Without one, a real clock, still one for everything.
    core = create_app(Settings(data_dir=tmp_path)).state.core
    assert isinstance(core.clock, SystemClock)
    assert all(ext.clock is core.clock for ext in core.extensions if hasattr(ext, "clock"))


@pytest.mark.parametrize("package", ["clocks", "procs"])
def test_clocks_and_procs_sit_at_the_bottom_of_the_import_graph(package):
    """Anything may use them (rooms, features, tests, loadtest); they import nothing of the project."""
    from tests.test_extension_contract import ROOT, imports_of

    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} - {package}
    assert not {m for m in imports_of(package) if m.split(".")[0] in ours}
