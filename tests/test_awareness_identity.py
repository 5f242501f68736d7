"""Awareness identity with stock y-websocket clients: the server stamps what it
knows (id, role), and name / colour only when the authenticator vouches for
them, so editor bindings keep the cursor labels a stock app sets."""

from __future__ import annotations

from typing import Any

import pytest

from tests.security_support import jwt_env, make_token
from tests.test_js_client import NODE, WAIT, node_clients  # noqa: F401  (fixture)
from tests.test_js_security import room_with_token

pytestmark = pytest.mark.skipif(NODE is None, reason="`node` is not on PATH")


def user_of(client, other) -> dict[str, Any] | None:
    state = client.peer_states().get(other.client_id)
    return state.get("user") if isinstance(state, dict) else None


def seen_users(client, other) -> list[dict[str, Any]]:
    """Every ``user`` of ``other`` that ``client`` ever held."""
    key = str(other.client_id)
    return [
        event["states"][key]["user"]
        for event in client.events
        if event.get("event") == "awareness" and isinstance(event["states"].get(key), dict)
    ]


async def test_development_mode_keeps_the_stock_clients_names_and_colors(server, node_clients):  # noqa: F811
    alice = await node_clients(server.ws_url, "ds-aw-dev", "alice")
    bob = await node_clients(server.ws_url, "ds-aw-dev", "bob")
    await alice.command("awareness_field", field="user", value={"name": "Alice", "color": "#ff0000"})
    await bob.command("awareness_field", field="user", value={"name": "Bob", "color": "#00ff00"})

    await bob.until(lambda: (user_of(bob, alice) or {}).get("name") == "Alice", WAIT, "Alice at Bob")
    await alice.until(lambda: (user_of(alice, bob) or {}).get("name") == "Bob", WAIT, "Bob at Alice")
    at_bob, at_alice = user_of(bob, alice), user_of(alice, bob)
    assert at_bob["color"] == "#ff0000" and at_alice["color"] == "#00ff00"
    # What the server knows is stamped: the (made-up) user id and the role.
    assert at_bob["id"].startswith("anonymous-") and at_bob["role"] == "editor"
    assert at_alice["id"].startswith("anonymous-") and at_alice["id"] != at_bob["id"]


async def test_jwt_mode_the_tokens_name_wins_and_the_clients_color_stays(server_factory, node_clients):  # noqa: F811
    srv = server_factory(env=jwt_env())
    room = "ds-aw-jwt"
    alice_token = make_token("alice", {room: "editor"}, name="Alice (SSO)")
    carol_token = make_token("carol", {room: "viewer"}, name="Carol (SSO)", color="#123456")
    alice = await node_clients(srv.ws_url, room_with_token(room, alice_token), "alice")
    carol = await node_clients(srv.ws_url, room_with_token(room, carol_token), "carol")
    observer = await node_clients(srv.ws_url, room_with_token(room, make_token("obs", {room: "viewer"})), "obs")

    await alice.command("awareness_field", field="user", value={"name": "Mallory", "color": "#ff0000"})
    await carol.command("awareness_field", field="user", value={"name": "Carol", "color": "#00ff00"})
    await observer.until(lambda: user_of(observer, alice) and user_of(observer, carol), WAIT, "both at the observer")
    assert user_of(observer, alice) == {"name": "Alice (SSO)", "color": "#ff0000", "id": "alice", "role": "editor"}
    assert user_of(observer, carol) == {"name": "Carol (SSO)", "color": "#123456", "id": "carol", "role": "viewer"}

    # A claim of someone else's id is refused, as before; the next honest state passes.
    await alice.command("awareness", state={"user": {"id": "carol", "name": "Carol"}, "cursor": 1})
    await alice.command("awareness", state={"user": {"name": "A"}, "cursor": 2})
    await observer.until(
        lambda: (observer.peer_states().get(alice.client_id) or {}).get("cursor") == 2, WAIT, "the honest state"
    )
    assert all(user["id"] == "alice" for user in seen_users(observer, alice))
    assert user_of(observer, alice)["name"] == "Alice (SSO)"
    for node in (alice, carol, observer):
        node.assert_clean()
