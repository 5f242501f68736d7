"""The synchronous frame write (collab/wsserver.py): the bytes websockets would write, used by a real server."""

from __future__ import annotations

import asyncio

import pycrdt
import pytest
import websockets
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from codec import protocol as p
from collab.wsserver import binary_frame_header


@given(st.integers(min_value=0, max_value=200_000))
def test_header_matches_websockets_serialization(length):
    payload = b"\x01" * length
    expected = Frame(Opcode.BINARY, payload).serialize(mask=False)
    assert binary_frame_header(length) + payload == expected


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_frames_of_every_length_class_reach_the_client_intact(server, compression):
    """Updates of 1, 2 and 8 length bytes, with and without permessage-deflate, written by the fast path."""
    url = f"{server.ws_url}/ds-frames-{compression or 'plain'}"
    async with websockets.connect(url, compression=compression, max_size=2**22) as writer, websockets.connect(
        url, compression=compression, max_size=2**22
    ) as reader:
        doc = pycrdt.Doc()
        notes = doc.get("notes", type=pycrdt.Text)
        sent: list[bytes] = []
        doc.observe(lambda event: sent.append(event.update))
        for size in (10, 300, 70_000):
            notes += "x" * size
        for update in sent:
            await writer.send(p.encode_sync_update(update))
        mirror = pycrdt.Doc()
        mirror_text = mirror.get("notes", type=pycrdt.Text)

        async def read_until_complete() -> None:
            while len(str(mirror_text)) < 70_310:
                msg = p.decode_message(await reader.recv())
                if isinstance(msg, (p.SyncUpdate, p.SyncStep2)):
                    mirror.apply_update(msg.update)

        await asyncio.wait_for(read_until_complete(), 20)
        assert str(mirror_text) == str(notes)
