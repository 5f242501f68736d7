"""A small HTTP/1.1 client for webhook POSTs: kept-alive connections, nothing else.

httpx costs about a millisecond of CPU per request here; at a thousand
events a second that is a core. This sends one request per connection at a
time over a small pool of kept-alive connections (TLS for https URLs), reads
the status and discards the body. Redirects are not followed (a webhook
that moves must be reconfigured).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit

MAX_BODY = 1 << 20  # answer bodies read (and discarded) at most
MAX_HEADERS = 100


class HTTPError(Exception):
    """The request did not get an answer (connection refused, reset, timeout, garbage)."""


class Poster:
    def __init__(self, url: str, timeout: float, pool: int = 8, user_agent: str = "datasource-collab-events") -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default_port = self.port == (443 if self.ssl else 80)
        self.authority = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not self.host.startswith("["):
            self.authority = f"[{self.host}]" if default_port else f"[{self.host}]:{self.port}"
        self.timeout = timeout
        self.pool = pool
        self.user_agent = user_agent
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, body: bytes, headers: dict[str, str]) -> int:
        """The answer's status code; HTTPError if there was none."""
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.authority}", f"User-Agent: {self.user_agent}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        head.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        try:
            async with asyncio.timeout(self.timeout):
                while self.idle:  # a kept-alive connection the receiver may have closed meanwhile
                    conn = self.idle.pop()
                    try:
                        return await self._exchange(conn, request)
                    except (OSError, asyncio.IncompleteReadError, HTTPError):
                        continue
                conn = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
                return await self._exchange(conn, request)
        except TimeoutError:
            raise HTTPError(f"no answer within {self.timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise HTTPError(f"{type(exc).__name__}: {exc}") from None

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes) -> int:
        reader, writer = conn
        keep = False
        try:
            writer.write(request)
            await writer.drain()
            status_line = (await reader.readuntil(b"\r\n")).decode("latin-1").split(" ", 2)
            if len(status_line) < 2 or not status_line[0].startswith("HTTP/1.") or not status_line[1].isdigit():
                raise HTTPError(f"not an HTTP answer: {' '.join(status_line)[:80]!r}")
            status = int(status_line[1])
            headers: dict[str, str] = {}
            for _ in range(MAX_HEADERS):
                line = (await reader.readuntil(b"\r\n")).decode("latin-1")
                if line == "\r\n":
                    break
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            else:
                raise HTTPError("too many answer headers")
            keep = status_line[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            if status in (204, 304) or 100 <= status < 200:
                pass
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                await _skip_chunked(reader)
            elif "content-length" in headers:
                length = int(headers["content-length"])
                if length > MAX_BODY:
                    keep = False
                else:
                    await reader.readexactly(length)
            else:
                keep = False  # the body runs to the end of the connection
            return status
        except BaseException:
            keep = False
            raise
        finally:
            if keep and len(self.idle) < self.pool:
                self.idle.append(conn)
            else:
                writer.close()

    async def close(self) -> None:
        while self.idle:
            _, writer = self.idle.pop()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _skip_chunked(reader: asyncio.StreamReader) -> None:
    total = 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return
        total += size
        if total > MAX_BODY:
            raise HTTPError("answer body too large")
        await reader.readexactly(size + 2)
