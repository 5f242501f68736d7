"""Graceful shutdown: SIGTERM while clients write."""

from __future__ import annotations

import asyncio

import pycrdt
import websockets

from collab.client import CollabClient


async def test_sigterm_closes_clients_with_1012_and_loses_nothing_acknowledged(server_factory):
    srv = server_factory(env={"COLLAB_MESSAGE_RATE": "0"})  # the writers go as fast as the server acks
    writers = [await CollabClient(srv.ws_url, "ds-term", hello=True).connect() for _ in range(3)]
    bases = [w.updates_sent for w in writers]  # update-bearing messages before the first key
    written = [0, 0, 0]

    async def write(i: int, w: CollabClient) -> None:
        cfg = w.doc.get("notes", type=pycrdt.Map)  # a plain map: this is about durability
        try:
            while not w.closed.is_set() and written[i] < 400:
                cfg[f"w{i}-{written[i]}"] = written[i]
                written[i] += 1
                await w.flush()
                if w.updates_sent - w.updates_saved > 20:  # at most ~20 unacknowledged, like a real client
                    await w.until(lambda: w.updates_sent - w.updates_saved <= 10, 10, "acks")
        except (websockets.ConnectionClosed, ConnectionError):
            pass

    tasks = [asyncio.create_task(write(i, w)) for i, w in enumerate(writers)]
    for i, w in enumerate(writers):
        await w.until(lambda w=w, b=bases[i]: w.updates_saved >= b + 50, 10, "some acks before the stop")
    exit_code = await asyncio.to_thread(srv.stop, 15)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    for w in writers:
        await w.wait_closed(5)
    # uvicorn shuts down gracefully, then re-raises SIGTERM on itself.
    assert exit_code in (0, -15) and "Application shutdown complete." in srv.log()
    assert all(w.close_code == 1012 for w in writers), [(w.close_code, w.close_reason) for w in writers]
    acked = [w.updates_saved - base for w, base in zip(writers, bases)]
    assert all(a >= 50 for a in acked)

    srv.restart()
    fresh = await CollabClient(srv.ws_url, "ds-term").connect()
    stored = fresh.doc.get("notes", type=pycrdt.Map).to_py()
    missing = [f"w{i}-{n}" for i in range(3) for n in range(acked[i]) if f"w{i}-{n}" not in stored]
    assert missing == [], f"{len(missing)} acknowledged updates lost"
    # Typically everything the server had received is there too: rooms are
    # flushed at shutdown, not only what was already acknowledged.
    assert len(stored) >= sum(acked)
    await fresh.close()


async def test_sigterm_ends_event_streams_instead_of_waiting_for_them(server_factory):
    import time

    import httpx

    srv = server_factory({"COLLAB_SHUTDOWN_TIMEOUT": "20"})
    async with httpx.AsyncClient(timeout=10) as http:
        async with http.stream("GET", f"{srv.http_url}/api/workspaces/ds-sse/participants/events") as resp:
            assert resp.status_code == 200
            lines = resp.aiter_lines()
            assert (await asyncio.wait_for(lines.__anext__(), 5)).startswith("retry:")
            started = time.monotonic()
            srv.proc.terminate()
            # The stream ends (the server closes it) well before the 20 s shutdown timeout.
            async with asyncio.timeout(8):
                async for _ in lines:
                    pass
    await asyncio.wait_for(asyncio.to_thread(srv.proc.wait), 8)
    assert time.monotonic() - started < 8
    assert srv.proc.returncode in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
