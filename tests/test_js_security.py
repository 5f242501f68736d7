"""The stock Yjs client (y-websocket under node) against a jwt-mode server.

The browser client can only put the token in the URL; a viewer's stock client
must converge back after its edits are refused, without seeing anything it
can't handle.
"""

from __future__ import annotations

import pycrdt
import pytest

from collab.client import CollabClient
from tests.security_support import jwt_env, make_token
from tests.test_js_client import NODE, WAIT, node_clients  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(NODE is None, reason="`node` is not on PATH")


def room_with_token(room: str, token: str) -> str:
    # WebsocketProvider builds serverUrl + "/" + room + params: a room name that
    # carries the query string gives the same URL as `params: {token}`.
    return f"{room}?token={token}"


async def test_stock_clients_authenticate_with_a_query_token_and_viewers_converge_back(
    server_factory, node_clients  # noqa: F811
):
    srv = server_factory(env=jwt_env())
    editor = CollabClient(srv.ws_url, "ds-js", hello=True, token=make_token("ed", {"ds-js": "editor"}))
    await editor.connect()
    editor.doc.get("config", type=pycrdt.Map)["host"] = "db"
    editor.doc.get("text", type=pycrdt.Text).insert(0, "hello")
    await editor.wait_saved()

    writer = await node_clients(srv.ws_url, room_with_token("ds-js", make_token("wr", {"ds-js": "editor"})), "w")
    viewer = await node_clients(srv.ws_url, room_with_token("ds-js", make_token("vi", {"ds-js": "viewer"})), "v")
    assert viewer.synced_docs[-1] == {"config": {"host": "db"}, "text": "hello"}

    await writer.command("set", map="config", key="port", value=5432)
    await editor.until(lambda: editor.doc.get("config", type=pycrdt.Map).get("port") == 5432, WAIT, "stock edit")

    seen: list[bytes] = []
    editor.on_update = seen.append
    await viewer.command("set", map="config", key="host", value="evil")
    await viewer.command("text_insert", text="text", index=5, content=" SECRET")
    await viewer.until(
        lambda: viewer.doc == {"config": {"host": "db", "port": 5432}, "text": "hello"}, WAIT, "viewer reverted"
    )
    # The editor carries on; the viewer follows; the refused content never reached the editor.
    editor.doc.get("text", type=pycrdt.Text).insert(0, ">")
    await viewer.until(lambda: viewer.doc["text"] == ">hello", WAIT, "editor's edit at the viewer")
    assert all(b"SECRET" not in u and b"evil" not in u for u in seen)
    assert str(editor.doc.get("text", type=pycrdt.Text)) == ">hello"
    for node in (writer, viewer):
        node.assert_clean()
    await editor.close()


async def test_stock_client_without_a_token_is_refused_with_4401(server_factory, node_clients):  # noqa: F811
    srv = server_factory(env=jwt_env(COLLAB_PREAUTH_TIMEOUT="0.5"))
    anonymous = await node_clients(srv.ws_url, "ds-js", "anon", wait_synced=False)
    await anonymous.until(
        lambda: any(e.get("event") == "connection-close" and e.get("code") == 4401 for e in anonymous.events),
        WAIT,
        "close 4401",
    )
    assert not anonymous.synced_docs
    expired = await node_clients(
        srv.ws_url, room_with_token("ds-js", make_token("old", {"ds-js": "editor"}, ttl=-10)), "exp", wait_synced=False
    )
    await expired.until(
        lambda: any(
            e.get("event") == "connection-close" and e.get("code") == 4401 and "expired" in (e.get("reason") or "")
            for e in expired.events
        ),
        WAIT,
        "close 4401 token expired",
    )
