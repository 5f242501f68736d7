"""The config map is capped in fields: every accepted change records the whole configuration."""

import pycrdt

from collab.client import CollabClient


async def test_config_map_cannot_grow_past_the_field_limit(server_factory):
    server = server_factory({"COLLAB_MAX_CONFIG_FIELDS": "20"})
    c = await CollabClient(server.ws_url, "ds-cap", hello=True).connect()
    cfg = c.doc.get("config", type=pycrdt.Map)
    with c.doc.transaction():
        for i in range(15):
            cfg[f"k{i}"] = i
    await c.wait_saved()
    with c.doc.transaction():
        for i in range(15, 30):
            cfg[f"k{i}"] = i
    await c.until(lambda: any(m["type"] == "rejected" for m in c.control), 10, "rejected")
    rejected = next(m for m in c.control if m["type"] == "rejected")
    assert rejected["reason"] == "too_many_fields" and rejected["limit"] == 20
    # The refused keys are removed for everyone, the author included; the rest stands.
    await c.until(lambda: len(cfg.to_py() or {}) == 15, 10, "compensation")
    fresh = await CollabClient(server.ws_url, "ds-cap").connect()
    assert sorted(fresh.doc.get("config", type=pycrdt.Map).to_py()) == sorted(f"k{i}" for i in range(15))
    await c.close()
    await fresh.close()
