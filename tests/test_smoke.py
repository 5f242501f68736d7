import pycrdt

from collab.client import CollabClient


async def test_two_clients_sync(server):
    a = await CollabClient(server.ws_url, "ds-1", hello=True).connect()
    b = await CollabClient(server.ws_url, "ds-1").connect()
    a.doc.get("config", type=pycrdt.Map)["host"] = "db.internal"
    mb = b.doc.get("config", type=pycrdt.Map)
    await b.until(lambda: mb.get("host") == "db.internal", 5, "edit from a")
    await a.wait_saved()
    assert a.updates_saved >= 1
    await a.close()
    await b.close()
