"""Validation rule, outbox transaction and audit records, without a backend (rooms in-process)."""

from __future__ import annotations

import pycrdt
import pytest
from pydantic import BaseModel, ConfigDict, Field

import persistence.sqlite as sqlite_store
from codec import protocol as p
from collab.auth import Identity
from forwarding.extension import ForwardingExtension
from forwarding.forwarder import coalesce
from forwarding.model import DataSourceConfig, cron_problem
from forwarding.settings import ForwardingSettings
from forwarding.validation import ConfigValidator, load_model
from persistence.outbox import OutboxRow
from persistence.sqlite import SQLiteDocumentStore
from rooms.config import MISSING
from rooms.room import Room
from tests.support import eventually
from tests.test_config_guards import Sink

V = ConfigValidator(DataSourceConfig)


def paths(errors):
    return [(e["path"], e["type"]) for e in errors]


# ------------------------------------------------------------------ the model


def test_drafts_are_valid():
    assert V.errors({}) == []
    assert V.errors({"name": "Sales"}) == []
    assert V.errors({"connection": {"host": "db.internal"}}) == []  # port, database... not filled in yet
    assert V.errors({"connection": {"host": "", "port": None}, "description": ""}) == []  # cleared inputs
    assert V.errors({"ui": {"collapsed": ["schedule"]}, "host": "x"}) == []  # unknown top-level keys: allowed


def test_present_fields_must_be_valid():
    assert paths(V.errors({"connection": {"port": 0}})) == [("connection.port", "greater_than_equal")]
    assert paths(V.errors({"connection": {"port": 65536.0}})) == [("connection.port", "less_than_equal")]
    assert V.errors({"connection": {"port": 5432.0}}) == []  # pycrdt numbers are floats
    assert paths(V.errors({"connection": {"host": "bad host"}})) == [("connection.host", "hostname")]
    assert V.errors({"connection": {"host": "10.0.0.7"}}) == [] and V.errors({"connection": {"host": "[::1]"}}) == []
    assert paths(V.errors({"type": "excel"})) == [("type", "literal_error")]
    assert paths(V.errors({"connection": {"ssl_mode": "maybe"}})) == [("connection.ssl_mode", "literal_error")]
    assert paths(V.errors({"connection": {"hots": "typo"}})) == [("connection.hots", "extra_forbidden")]
    assert paths(V.errors({"schedule": {"timezone": "Mars/Olympus"}})) == [("schedule.timezone", "timezone")]
    assert paths(V.errors({"credentials": {"secret_ref": "hunter2"}})) == [("credentials.secret_ref", "secret_ref")]
    assert V.errors({"credentials": {"secret_ref": "vault://kv/data/sales#password"}}) == []
    assert paths(V.errors({"tags": ["ok", "not ok"]})) == [("tags.1", "string_pattern_mismatch")]


def test_cron_expressions():
    for good in ("*/5 * * * *", "0 2 * * MON-FRI", "0 0 1 JAN,JUL *", "@daily", "15,45 8-18/2 * * 0"):
        assert cron_problem(good) is None, good
    for bad in ("* * * *", "61 * * * *", "* 24 * * *", "*/0 * * * *", "5-1 * * * *", "x * * * *"):
        assert cron_problem(bad), bad
    errors = V.errors({"schedule": {"cron": "61 * * * *"}})
    assert paths(errors) == [("schedule.cron", "cron")] and "minute" in errors[0]["msg"]


def test_secrets_are_never_stored_in_clear():
    for config in ({"password": "hunter2"}, {"connection": {"password": "x"}}, {"extra": {"api_key": "k"}}):
        assert [e["type"] for e in V.errors(config)] == ["secret_in_clear"], config
        assert all(e["input"] == "***" for e in V.errors(config))
    assert V.errors({"password": ""}) == []  # nothing in it


def test_an_enabled_data_source_must_be_complete():
    complete = {
        "type": "postgresql",
        "connection": {"host": "db", "port": 5432, "database": "sales", "username": "etl"},
        "credentials": {"secret_ref": "env://SALES_DB_PASSWORD"},
    }
    assert V.errors({**complete, "enabled": True}) == []
    errors = V.errors({"enabled": True, "type": "mysql"})
    assert {e["path"] for e in errors} == {
        "connection.host",
        "connection.port",
        "connection.database",
        "connection.username",
        "credentials.secret_ref",
    }
    assert {e["type"] for e in errors} == {"required_when_enabled"}


def test_errors_already_there_do_not_block_other_edits():
    old = {"connection": {"port": 99999}}  # invalid before (e.g. seeded by the backend)
    other = {"connection": {"port": 99999}, "name": "x"}
    assert V.introduced(old, other, {"name": (MISSING, "x")}) == []
    still_bad = {"connection": {"port": 88888}}
    assert paths(V.introduced(old, still_bad, {"connection.port": (99999, 88888)})) == [
        ("connection.port", "less_than_equal")
    ]
    assert V.introduced(old, {"connection": {"port": 5432}}, {"connection.port": (99999, 5432)}) == []
    # Enabling an incomplete configuration is refused although it changes only `enabled`.
    assert V.introduced({}, {"enabled": True}, {"enabled": (MISSING, True)})


class ShortNames(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = Field(None, max_length=5)


def test_the_model_is_pluggable():
    assert load_model("tests.test_validation:ShortNames") is ShortNames
    assert load_model("") is None
    with pytest.raises(ValueError):
        load_model("no-colon")
    with pytest.raises(TypeError):
        load_model("tests.test_validation:paths")
    ext = ForwardingExtension(ForwardingSettings(config_model="tests.test_validation:ShortNames", backend_url=None))
    assert ext.validator.model is ShortNames
    assert ForwardingExtension(ForwardingSettings(config_model="", backend_url=None)).guards() == []


def test_coalesce_keeps_the_net_change_per_path():
    def row(seq, changes, who="alice"):
        return OutboxRow("w", seq, f"k{seq}", 0.0, {"id": who}, changes, {}, None, "pending", None, None, 0, None)

    rows = [
        row(1, [{"path": "a", "old": 1, "new": 2}, {"path": "b", "new": "x"}]),
        row(2, [{"path": "a", "old": 2, "new": 3}, {"path": "b", "old": "x"}], who="bob"),
        row(3, [{"path": "c", "old": 5, "new": 6}]),
        row(4, [{"path": "c", "old": 6, "new": 5}]),
    ]
    # b was created and removed, c changed and changed back: neither is a change.
    assert coalesce(rows) == [{"path": "a", "old": 1, "new": 3, "by": "bob", "op": "set"}]


# ----------------------------------------------------- rooms with a real store


async def _room(tmp_path, **settings):
    store = SQLiteDocumentStore(tmp_path / "db.sqlite3")
    await store.open()
    ext = ForwardingExtension(ForwardingSettings(backend_url=None, **settings))
    ext.store, ext.recording = store, True
    room = Room("ws-1", store, guards=ext.guards(), listeners=ext.listeners())
    await room.load()
    return store, room


def _update(doc: pycrdt.Doc, fn) -> bytes:
    before = doc.get_state()
    with doc.transaction():
        fn(doc.get("config", type=pycrdt.Map))
    return doc.get_update(before)


async def test_accepted_and_rejected_changes_are_recorded_with_the_update(tmp_path):
    store, room = await _room(tmp_path)
    sink = Sink()
    ps = room.join(sink, Identity("alice", "Alice", "#000"))
    room.receive(ps, p.Control("hello", {"type": "hello"}))
    doc = pycrdt.Doc()
    room.receive(ps, p.SyncUpdate(_update(doc, lambda c: c.__setitem__("connection", pycrdt.Map({"port": 5432})))))
    room.receive(ps, p.SyncUpdate(_update(doc, lambda c: c["connection"].__setitem__("port", 70000))))
    await room.drain()

    assert room.doc.get("config", type=pycrdt.Map).to_py() == {"connection": {"port": 5432.0}}
    rejected = [c for c in sink.controls() if c["type"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["reason"] == "invalid" and rejected[0]["paths"] == ["connection.port"]
    assert paths(rejected[0]["errors"]) == [("connection.port", "less_than_equal")]
    assert rejected[0]["errors"][0]["input"] == 70000

    entries = list(reversed(await store.history("ws-1", None, 10)))
    assert [(e["kind"], e["seq"], e["paths"]) for e in entries] == [
        ("accepted", 1, ["connection.port"]),
        ("rejected", None, ["connection.port"]),
    ]
    assert entries[0]["author"]["id"] == "alice" and entries[0]["changes"] == [{"path": "connection.port", "new": 5432}]
    assert entries[0]["forward_status"] == "pending"
    assert entries[1]["changes"] == [{"path": "connection.port", "old": 5432, "new": 70000}]
    assert entries[1]["details"]["rejections"][0]["errors"][0]["type"] == "less_than_equal"
    pending = await store.outbox_pending("ws-1", 10)
    assert [(r.seq, r.config) for r in pending] == [(1, {"connection": {"port": 5432}})]

    # A refused secret does not land in the audit trail in clear.
    room.receive(ps, p.SyncUpdate(_update(doc, lambda c: c["connection"].__setitem__("password", "hunter2"))))
    await room.drain()
    latest = (await store.history("ws-1", None, 1))[0]
    assert latest["kind"] == "rejected" and latest["changes"] == [{"path": "connection.password", "new": "***"}]
    assert "hunter2" not in str(await store.history("ws-1", None, 10)) and "hunter2" not in str(sink.controls())
    await store.close()


async def test_outbox_rows_commit_in_the_same_transaction_as_the_update(tmp_path, monkeypatch):
    store, room = await _room(tmp_path)
    ps = room.join(Sink())
    doc = pycrdt.Doc()

    def broken(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sqlite_store, "write_batch", broken)
    room.receive(ps, p.SyncUpdate(_update(doc, lambda c: c.__setitem__("name", "Sales"))))
    await room.drain()
    assert room.failed  # the store refused the append: neither the update nor its outbox row exists
    monkeypatch.undo()
    stored = await store.load("ws-1")
    assert stored.updates == [] and stored.last_seq == 0
    assert await store.outbox_pending("ws-1", 10) == [] and await store.history("ws-1", None, 10) == []

    # And the healthy path: the update and its row land together.
    room2 = Room("ws-1", store, guards=room.guards, listeners=room.listeners)
    await room2.load()
    ps2 = room2.join(Sink())
    room2.receive(ps2, p.SyncUpdate(_update(pycrdt.Doc(), lambda c: c.__setitem__("name", "Sales"))))
    await room2.drain()
    stored = await store.load("ws-1")
    assert len(stored.updates) == 1
    assert [r.seq for r in await store.outbox_pending("ws-1", 10)] == [1]
    await store.close()


async def test_pluggable_model_through_the_environment(server_factory):
    from collab.client import CollabClient

    server = server_factory(env={"COLLAB_CONFIG_MODEL": "tests.test_validation:ShortNames"})
    client = await CollabClient(server.ws_url, "ds-model", hello=True).connect()
    config = client.doc.get("config", type=pycrdt.Map)
    config["name"] = "far too long"
    await client.until(lambda: any(m["type"] == "rejected" for m in client.control), 10, "rejected")
    await eventually(lambda: "name" not in config.to_py(), 10, what="name removed again")
    config["name"] = "short"
    config["type"] = "anything goes with this model"
    await client.wait_saved()
    assert config.to_py() == {"name": "short", "type": "anything goes with this model"}
    await client.close()


async def test_a_viewers_refused_edit_is_in_the_audit_trail_without_its_values(tmp_path):
    store, room = await _room(tmp_path)
    ps = room.join(Sink(), Identity("vera", "Vera", "#000", role="viewer"))
    room.receive(ps, p.SyncUpdate(_update(pycrdt.Doc(), lambda c: c.__setitem__("name", "not allowed"))))
    await room.drain()
    assert room.doc.get("config", type=pycrdt.Map).to_py() == {}
    entries = await store.history("ws-1", None, 10)
    assert [(e["kind"], e["reason"], e["paths"], e["changes"]) for e in entries] == [
        ("rejected", "read-only", ["name"], [{"path": "name"}])
    ]
    assert entries[0]["author"]["id"] == "vera" and await store.outbox_pending("ws-1", 10) == []
    await store.close()


def test_validating_only_the_touched_sections_finds_what_validating_everything_finds():
    """DataSourceConfig.validation_scope: the same introduced errors as a whole-configuration validation."""
    import itertools

    scoped = ConfigValidator(DataSourceConfig)
    whole = ConfigValidator(DataSourceConfig)
    whole._scope = None
    complete = {
        "type": "postgresql",
        "connection": {"host": "db.internal", "port": 5432, "database": "orders", "username": "svc"},
        "credentials": {"secret_ref": "vault://kv/orders"},
    }
    bases = [{}, {"w0": "x"}, {**complete, "enabled": True}, {**complete, "enabled": False, "type": "postgres"}]
    edits = [
        {"w0": "y"},
        {"ui": {"password": "hunter2"}},
        {"password": "hunter2"},
        {"token": ""},
        {"type": "postgres"},
        {"type": MISSING},
        {"connection": {"host": "db.internal"}},
        {"enabled": True},
        {"name": ""},
        {"schedule": {"cron": "61 * * * *"}},
        {"tags": ["ok", "not ok!"]},
    ]
    for base, first, second in itertools.product(bases, edits, [None, *edits]):
        new = dict(base)
        for edit in (first, second or {}):
            for key, value in edit.items():
                if value is MISSING:
                    new.pop(key, None)
                else:
                    new[key] = value
        changes = {k: (base.get(k, MISSING), new.get(k, MISSING)) for k in base.keys() | new.keys()}
        changes = {k: v for k, v in changes.items() if v[0] != v[1]}
        found = scoped.introduced(base, new, changes)
        expected = whole.introduced(base, new, changes)
        assert sorted((e["path"], e["type"]) for e in found) == sorted((e["path"], e["type"]) for e in expected), (
            base,
            new,
        )


def test_the_recorded_configuration_is_re_encoded_only_where_it_changed_and_stays_exact():
    import json

    from forwarding.extension import ConfigEncoder, jsonable

    encoder = ConfigEncoder()
    view = {"type": "postgresql", "connection": {"host": "a", "port": 5432.0}, "tags": ["x", 1.0], "é": "ü"}
    for step in range(4):
        plain, text = encoder.encode(view)
        assert plain == jsonable(view) and json.loads(text) == jsonable(view)
        view = {**view, "connection": {**view["connection"], "port": 5433.0 + step}}  # copy-on-write, as the view
    del view["tags"]
    assert json.loads(encoder.encode(view)[1]) == jsonable(view)
