"""Connection-level defences: origin allowlist, connection counts, message
rate, and redaction of tokens in logs. No sockets here: the app asks these
objects and acts on the answers (see collab/app.py and docs/security.md).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from urllib.parse import urlsplit

# ------------------------------------------------------------------- origins


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case, default ports dropped; None if unparsable."""
    origin = origin.strip().lower()
    if origin == "null":
        return "null"
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        return None
    host = parts.hostname
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


class OriginPolicy:
    """Which ``Origin`` headers may open a websocket (cross-site websocket hijacking).

    Entries are exact origins (``https://app.example.com``), wildcard
    subdomains (``https://*.example.com``, which does not match the bare
    ``example.com``) or ``*`` (any). A request without an ``Origin`` header
    is not from a browser page and is allowed: browsers always send one on
    websocket handshakes, and the attack needs a browser.
    """

    def __init__(self, allowed: list[str], allow_all: bool = False) -> None:
        self.allow_all = allow_all or "*" in allowed
        self.exact: set[str] = set()
        self.suffixes: list[tuple[str, str]] = []  # (scheme, ".example.com")
        for entry in allowed:
            entry = entry.strip()
            if not entry or entry == "*":
                continue
            match = re.fullmatch(r"(https?)://\*(\.[^/:]+(?::\d+)?)/?", entry.lower())
            if match:
                self.suffixes.append((match.group(1), match.group(2)))
                continue
            norm = normalize_origin(entry)
            if norm is None:
                raise ValueError(f"invalid origin in allowlist: {entry!r}")
            self.exact.add(norm)

    def allows(self, origin: str | None) -> bool:
        if origin is None or self.allow_all:
            return True
        norm = normalize_origin(origin)
        if norm is None:
            return False
        if norm in self.exact:
            return True
        for scheme, suffix in self.suffixes:
            prefix = scheme + "://"
            if norm.startswith(prefix) and norm.endswith(suffix) and len(norm) > len(prefix) + len(suffix):
                return True
        return False


# --------------------------------------------------------------- connections


class ConnectionLimiter:
    """Counts open websockets per process and per client address."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def acquire(self, address: str) -> str | None:
        """Count a new connection; return why it is refused (None: accepted)."""
        if self.max_total and self.total >= self.max_total:
            return "too many connections on this server"
        if self.max_per_ip and self.per_ip[address] >= self.max_per_ip:
            return "too many connections from this address"
        self.total += 1
        self.per_ip[address] += 1
        return None

    def release(self, address: str) -> None:
        self.total -= 1
        self.per_ip[address] -= 1
        if self.per_ip[address] <= 0:
            del self.per_ip[address]


# ---------------------------------------------------------------------- rate


class RateLimiter:
    """A token bucket over messages, with a grace period for sustained excess.

    Each message takes one token; tokens come back at ``rate`` per second up
    to ``burst``. ``take()`` returns how long the reader should wait before
    handling the message (0 while tokens last), so an over-eager client is
    throttled by TCP backpressure, not dropped. Only when it stays over the
    rate for ``grace`` seconds does ``take()`` raise ``RateExceeded`` (the
    connection is then closed 1008). A client that pauses long enough for a
    token to come back starts over.
    """

    __slots__ = ("rate", "burst", "grace", "tokens", "stamp", "excess_since", "clock", "unit")

    def __init__(self, rate: float, burst: int, grace: float, clock=time.monotonic, unit: str = "messages") -> None:
        self.rate = rate
        self.burst = float(burst)
        self.grace = grace
        self.clock = clock
        self.unit = unit
        self.tokens = float(burst)
        self.stamp = clock()
        self.excess_since: float | None = None

    def take(self, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens (1 per message, or the bytes of a message)."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            self.excess_since = None
            return 0.0
        if self.excess_since is None:
            self.excess_since = now
        elif now - self.excess_since >= self.grace:
            raise RateExceeded(f"rate limit: more than {self.rate:g} {self.unit}/s for {self.grace:g}s")
        # Wait until the bucket holds the cost, then spend it.
        wait = (cost - self.tokens) / self.rate
        self.tokens -= cost
        return wait


class RateExceeded(Exception):
    pass


# ------------------------------------------------------------------- logging

# token=..., access_token=..., and Authorization: Bearer ... anywhere in a message.
_SECRET_PATTERNS = [
    (re.compile(r"((?:^|[?&;\s\"'])(?:access_)?token=)[^&\s\"';]*", re.IGNORECASE), r"\1[redacted]"),
    (re.compile(r"(bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE), r"\1[redacted]"),
]
_MARKERS = ("token=", "bearer")


def redact_tokens(text: str) -> str:
    """``text`` with token values replaced by ``[redacted]``."""
    lowered = text.lower()
    if not any(marker in lowered for marker in _MARKERS):
        return text
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


_installed = False


def install_log_redaction() -> None:
    """Redact tokens in every log record of the process, whatever its logger.

    uvicorn logs ``"WebSocket /ws/ds-1?token=..." [accepted]`` at INFO, with
    the query string: a record factory sees every record before any handler
    formats it, so no handler configuration can bypass the redaction.
    """
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to report
            return record
        cleaned = redact_tokens(message)
        if cleaned is not message and cleaned != message:
            record.msg = cleaned
            record.args = None
        return record

    logging.setLogRecordFactory(factory)
