"""Test helpers for events: a real webhook receiver, a Redis Stream consumer group, an SSE reader."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import redis

from events.envelope import problems
from tests.support import free_port

SECRET = "whsec_" + base64.b64encode(b"events-test-secret-0123456789abcdef").decode()


def verify_standard_webhook(secret: str, headers: Any, body: bytes, tolerance: float = 300) -> str | None:
    """Standard Webhooks verification, written from the spec (not with the server's code): None if valid."""
    msg_id, stamp, signatures = (headers.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and signatures):
        return "missing webhook-id / webhook-timestamp / webhook-signature"
    if abs(time.time() - int(stamp)) > tolerance:
        return "timestamp outside tolerance"
    key = base64.b64decode(secret.split("_", 1)[1])
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()).decode()
    for part in signatures.split(" "):
        version, _, value = part.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return None
    return "no matching v1 signature"


class WebhookReceiver:
    """A real HTTP server (threads) that checks every request's signature and keeps the events.

    ``stop()`` closes the port (senders get connection refused) and
    ``start()`` opens it again on the same port: a receiver that is down.
    """

    def __init__(self, secret: str = SECRET, port: int | None = None) -> None:
        self.secret = secret
        self.port = port or free_port()
        self.events: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.bad: list[str] = []
        self.received_at: list[float] = []
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None
        self.status = 204
        self.delay = 0.0  # seconds each answer takes (a slow receiver)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if receiver.delay:
                    time.sleep(receiver.delay)
                error = verify_standard_webhook(receiver.secret, self.headers, body)
                with receiver.lock:
                    if error is not None:
                        receiver.bad.append(error)
                    else:
                        event = json.loads(body)
                        if event.get("id") != self.headers["webhook-id"]:
                            receiver.bad.append("webhook-id differs from the event id")
                        receiver.events.append(event)
                        receiver.headers.append(dict(self.headers))
                        receiver.received_at.append(time.time())
                self.send_response(receiver.status if error is None else 401)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e["type"] == event_type]

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)


class StreamReader:
    """A consumer group on the events stream (XREADGROUP, XACK), as a platform service would read it."""

    def __init__(self, url: str, stream: str, group: str = "tests", consumer: str = "c1") -> None:
        self.client = redis.Redis.from_url(url)
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.events: list[dict[str, Any]] = []
        try:
            self.client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self) -> list[dict[str, Any]]:
        """What arrived since the last read (acknowledged)."""
        got = []
        while True:
            reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=500, block=10)
            if not reply:
                return got
            for entry_id, fields in reply[0][1]:
                event = json.loads(fields[b"event"])
                assert fields[b"id"].decode() == event["id"]
                assert fields[b"type"].decode() == event["type"]
                got.append(event)
                self.events.append(event)
                self.client.xack(self.stream, self.group, entry_id)

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        self.read()
        return [e for e in self.events if e["type"] == event_type]

    def of_type_all(self) -> list[dict[str, Any]]:
        self.read()
        return list(self.events)

    def close(self) -> None:
        self.client.close()


class SSEReader:
    """Reads ``GET /api/events?workspace=`` in a thread; keeps (sse id, event) pairs."""

    def __init__(self, base_url: str, workspace: str, last_event_id: str | None = None, query: str = "") -> None:
        self.url = f"{base_url}/api/events?workspace={workspace}{query}"
        self.headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self.items: list[tuple[str | None, dict[str, Any]]] = []
        self.status: int | None = None
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SSEReader:
        self.thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("SSE stream did not open")
        return self

    def _run(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers=self.headers, timeout=httpx.Timeout(5, read=None)) as response:
                self.status = response.status_code
                self._ready.set()
                if response.status_code != 200:
                    return
                sse_id, data = None, None
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith("id: "):
                        sse_id = line[4:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                    elif line == "" and data is not None:
                        with self.lock:
                            self.items.append((sse_id, data))
                        sse_id, data = None, None
        except httpx.HTTPError:
            pass
        finally:
            self._ready.set()

    def stop(self) -> None:
        self._stop.set()

    @property
    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [event for _, event in self.items]

    def last_id(self) -> str | None:
        with self.lock:
            ids = [i for i, _ in self.items if i]
        return ids[-1] if ids else None

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == event_type]


def assert_valid(events: list[dict[str, Any]]) -> None:
    for event in events:
        assert problems(event) == [], (event, problems(event))
