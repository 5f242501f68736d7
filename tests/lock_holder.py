"""A lock-holding client in its own process, so tests can SIGSTOP or SIGKILL it.

    python -m tests.lock_holder WS_URL WORKSPACE USER KEEPALIVE_SECONDS

Commands are JSON lines on stdin, answers JSON lines on stdout:

    {"cmd": "acquire", "path": "connection", "ttl": 1}  -> the server's reply
    {"cmd": "set", "path": ["connection"], "key": "host", "value": "x"}
                                                        -> {"sent": true} once sent
    {"cmd": "wait_rejected", "timeout": 10}             -> the first `rejected` message
    {"cmd": "wait_config", "path": ["connection", "host"], "value": "db2", "timeout": 10}
                                                        -> {"config": ...} once it holds
    {"cmd": "control"}                                  -> {"control": [every control message so far]}

The process exits when stdin closes, and by itself after 120 s.
"""

from __future__ import annotations

import asyncio
import json
import sys

import pycrdt

from collab.client import CollabClient


def _get(config: dict, path: list[str]):
    node = config
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


async def main(url: str, workspace: str, user: str, keepalive: float) -> None:
    client = await CollabClient(url, workspace, hello=True, query=f"user={user}&name={user}").connect()
    if keepalive > 0:
        client.keepalive(keepalive)
    config = client.doc.get("config", type=pycrdt.Map)
    loop = asyncio.get_running_loop()

    def out(obj) -> None:
        print(json.dumps(obj), flush=True)

    out({"ready": True})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        kind = cmd["cmd"]
        if kind == "acquire":
            out(await client.acquire_lock(cmd["path"], ttl=cmd.get("ttl"), wait=cmd.get("wait")))
        elif kind == "set":
            target = config
            for key in cmd.get("path", []):
                target = target[key]
            target[cmd["key"]] = cmd["value"]
            await client.flush()
            out({"sent": True})
        elif kind == "wait_rejected":
            await client.until(lambda: any(m["type"] == "rejected" for m in client.control), cmd["timeout"], "rejected")
            out(next(m for m in client.control if m["type"] == "rejected"))
        elif kind == "wait_config":
            await client.until(
                lambda c=cmd: _get(config.to_py() or {}, c["path"]) == c["value"], cmd["timeout"], "config value"
            )
            out({"config": config.to_py()})
        elif kind == "control":
            out({"control": client.control})
    await client.close()


if __name__ == "__main__":
    url, workspace, user, keepalive = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    try:
        asyncio.run(asyncio.wait_for(main(url, workspace, user, keepalive), 120))
    except TimeoutError:
        sys.exit(3)
