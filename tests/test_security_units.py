"""collab/security.py without a server: origins, rate limiter, connection counts, redaction."""

from __future__ import annotations

import logging

import pytest

from collab.security import (
    ConnectionLimiter,
    OriginPolicy,
    RateExceeded,
    RateLimiter,
    install_log_redaction,
    normalize_origin,
    redact_tokens,
)


def test_origin_policy():
    policy = OriginPolicy(["https://app.example.com", "https://*.example.org", "http://localhost:3000"])
    assert policy.allows(None)  # not a browser
    assert policy.allows("https://app.example.com")
    assert policy.allows("HTTPS://APP.EXAMPLE.COM:443")
    assert policy.allows("https://a.b.example.org")
    assert policy.allows("http://localhost:3000")
    assert not policy.allows("https://example.org")  # the wildcard needs a subdomain
    assert not policy.allows("http://app.example.com")  # scheme matters
    assert not policy.allows("https://app.example.com.evil.net")
    assert not policy.allows("https://evilexample.org")
    assert not policy.allows("http://localhost:3001")
    assert not policy.allows("null")
    assert not policy.allows("not an origin")
    assert OriginPolicy(["*"]).allows("https://anything.example")
    assert OriginPolicy([], allow_all=True).allows("null")
    assert not OriginPolicy([]).allows("https://app.example.com")
    assert normalize_origin("https://[::1]:8443") == "https://[::1]:8443"
    with pytest.raises(ValueError):
        OriginPolicy(["https://app.example.com/path"])


def test_rate_limiter_throttles_then_gives_up_after_the_grace():
    now = [0.0]
    bucket = RateLimiter(rate=10, burst=5, grace=1.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(5)] == [0.0] * 5  # the burst
    wait = bucket.take()
    assert wait == pytest.approx(0.1)  # then one token per 1/rate seconds
    with pytest.raises(RateExceeded):  # a client that keeps sending as fast as it is let
        for _ in range(100):
            now[0] += wait
            wait = bucket.take()
            assert wait == pytest.approx(0.1)
    assert now[0] == pytest.approx(1.0)  # after the 1 s grace
    # A client that slows down below the rate starts over.
    polite = RateLimiter(rate=10, burst=2, grace=1.0, clock=lambda: now[0])
    for _ in range(50):
        now[0] += 0.2
        assert polite.take() == 0.0
    assert RateLimiter(rate=0, burst=1, grace=0).take() == 0.0  # disabled
    # Costs: a byte bucket.
    now[0] = 0.0
    data = RateLimiter(rate=1000, burst=4000, grace=1.0, clock=lambda: now[0], unit="bytes")
    assert data.take(3000) == 0.0
    assert data.take(3000) == pytest.approx(2.0)  # 2,000 bytes short at 1,000/s
    now[0] += 2.0
    with pytest.raises(RateExceeded, match="1000 bytes/s"):
        for _ in range(10):
            now[0] += data.take(3000)


def test_connection_limiter():
    limits = ConnectionLimiter(max_total=3, max_per_ip=2)
    assert limits.acquire("a") is None and limits.acquire("a") is None
    assert limits.acquire("a") == "too many connections from this address"
    assert limits.acquire("b") is None
    assert limits.acquire("c") == "too many connections on this server"
    limits.release("a")
    assert limits.acquire("c") is None
    assert limits.total == 3 and dict(limits.per_ip) == {"a": 1, "b": 1, "c": 1}


def test_redaction(caplog):
    assert redact_tokens('127.0.0.1:5 - "WebSocket /ws/ds-1?token=eyJ.a.b&x=1" [accepted]') == (
        '127.0.0.1:5 - "WebSocket /ws/ds-1?token=[redacted]&x=1" [accepted]'
    )
    assert redact_tokens("GET /ws/x?a=1&access_token=abc") == "GET /ws/x?a=1&access_token=[redacted]"
    assert redact_tokens("Authorization: Bearer eyJhbGciOi.x.y") == "Authorization: Bearer [redacted]"
    assert redact_tokens("no secrets here; tokenizer=ok") == "no secrets here; tokenizer=ok"
    install_log_redaction()
    with caplog.at_level(logging.INFO, logger="uvicorn.error"):
        logging.getLogger("uvicorn.error").info('%s - "WebSocket %s" [accepted]', "1.2.3.4:5", "/ws/a?token=SECRET1")
    assert "SECRET1" not in caplog.text and "token=[redacted]" in caplog.text
