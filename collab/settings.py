"""All settings in one pydantic model; every field is an environment variable
``COLLAB_<FIELD>`` (e.g. ``COLLAB_PORT=9000``). A few are also flags of
``python -m collab serve`` (host, port, data directory, log format...: see
``--help``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_HMAC = ("HS256", "HS384", "HS512")
_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
MIN_SECRET_BYTES = 32


def _split_list(value):
    """Lists from the environment: comma-separated (``a,b``) or JSON (``["a","b"]``)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COLLAB_", extra="ignore")

    # Network
    host: str = Field("127.0.0.1", description="interface to listen on; 0.0.0.0 for every interface")
    port: int = Field(8765, ge=0, le=65535, description="TCP port; 0 picks a free one (printed at start)")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="closes, refusals and forwarding are logged at info"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per line with workspace and user (recommended in production)"
    )

    # Storage
    data_dir: Path = Field(Path("./data"), description="where the SQLite store lives (created if missing)")
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        "FULL", description="FULL survives power loss; NORMAL survives a process crash only"
    )
    compact_every_updates: int = Field(
        500, ge=1, description="a document's update log is merged into one state after this many updates"
    )
    compact_every_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="...or after its update log grew by this many bytes"
    )

    # Scale-out (later): when set, Redis backs locks, presence and relay.
    redis_url: str | None = Field(
        None,
        description=(
            "redis://host:port/db, redis+cluster://host:port,host:port (Redis Cluster) or "
            "redis+sentinel://host:port,host:port/mastername[/db] (primary behind Sentinel); when set, "
            "documents, relay, outbox, locks and presence live in Redis (docs/operations.md)"
        ),
    )
    node_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        min_length=1,
        max_length=200,
        description="this server's name in rosters and logs; unique per running process",
    )

    store: Literal["auto", "sqlite", "redis"] = Field(
        "auto", description="document store; auto = redis when redis_url is set, else sqlite"
    )
    redis_timeout_seconds: float = Field(
        2.0, gt=0, description="Redis socket timeout of the store: a dead Redis is noticed this fast"
    )
    redis_ack_replicas: int | None = Field(
        None,
        ge=0,
        le=16,
        description=(
            "a `saved` ack waits until the write reached this many replicas (WAIT); unset = 1 when the "
            "primary reports connected replicas, 0 otherwise. 0 = acks as soon as the primary has it "
            "(a failover can then lose acknowledged writes)"
        ),
    )
    redis_ack_timeout_ms: int = Field(
        500,
        ge=1,
        le=60_000,
        description="one WAIT for replicas lasts at most this; short of replicas, the write is retried",
    )
    redis_retry_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description=(
            "an append Redis does not acknowledge (down, stalled, failing over, short of replicas) is retried "
            "this long, unacknowledged, before the room reports the failure and closes its connections"
        ),
    )
    redis_cluster_poll_ms: float = Field(
        10.0, ge=1, le=1000, description="Redis Cluster only: the relay polls the update streams this often"
    )
    node_summary_seconds: float = Field(
        2.0,
        gt=0,
        le=300,
        description=(
            "with Redis: each node publishes its rooms, participants and locks this often (TTL 3x) "
            "for the cluster-wide admin API"
        ),
    )
    relay_block_ms: int = Field(1000, ge=10, le=30_000, description="XREAD BLOCK of the relay reader")
    relay_awareness_ttl_seconds: float = Field(
        30.0, ge=1, description="a relayed awareness state not refreshed this long (its node died) is removed"
    )
    relay_live: bool = Field(
        True,
        description="also publish accepted updates to the other nodes at once (PUBLISH, best effort) instead of "
        "only through the durable stream, which waits for the append's round trip; the stream stays the truth",
    )
    relay_live_wire: bool = Field(
        True,
        description="one Redis server without TLS (redis://, unix://): the live channel speaks RESP on its own "
        "connections (publish from inside the flush, apply on arrival) instead of redis-py's; the cross-node hop "
        "falls from about 2 ms to 0.1-0.2 ms at p50 (docs/benchmarks.md). Cluster, Sentinel and rediss:// use redis-py",
    )

    @property
    def uses_redis_store(self) -> bool:
        return self.store == "redis" or (self.store == "auto" and bool(self.redis_url))

    # Rooms
    flush_min_gap_ms: float = Field(
        3.0,
        ge=0,
        le=100,
        description="a busy room flushes at most this often (merging more updates per frame); a quiet one at once",
    )
    flush_interval_ms: float = Field(
        0.0, ge=0, le=1000, description="merge window for broadcasts; 0 merges what arrives in one loop turn"
    )
    room_idle_seconds: float = Field(10.0, ge=0, description="keep an empty room in memory this long")

    # Limits
    max_message_bytes: int = Field(1024 * 1024, ge=1024, description="larger frames close with 1009")
    peer_queue_frames: int = Field(
        2048,
        ge=16,
        description="outgoing frames queued per peer before its TCP connection is dropped (the client "
        "sees 1006; logged as 1013)",
    )
    max_awareness_state_bytes: int = Field(64 * 1024, ge=64, description="larger awareness states are refused")
    max_awareness_clients_per_connection: int = Field(
        8, ge=1, description="awareness client ids one connection may own (each holds a state)"
    )
    max_connections: int = Field(10_000, ge=0, description="websockets per process (0 = no limit); more get 503")
    max_connections_per_ip: int = Field(
        500, ge=0, description="websockets per client address (0 = no limit); more get 503"
    )
    message_rate: float = Field(100.0, ge=0, description="messages per second per connection (0 = no limit)")
    message_burst: int = Field(300, ge=1, description="token-bucket size: messages a client may send at once")
    byte_rate: int = Field(512 * 1024, ge=0, description="bytes per second per connection, sustained (0 = no limit)")
    byte_burst: int = Field(8 * 1024 * 1024, ge=1024, description="bytes a client may send at once")
    rate_limit_grace: float = Field(
        5.0, ge=0, description="seconds of sustained excess (reads throttled meanwhile) before close 1008"
    )
    preauth_timeout: float = Field(5.0, gt=0, description="seconds to authenticate after the websocket opens")
    preauth_max_bytes: int = Field(
        64 * 1024, ge=0, description="bytes a client may send before it is authenticated (buffered, then replayed)"
    )
    preauth_max_frames: int = Field(32, ge=0, description="frames buffered before authentication")
    max_document_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="encoded document size past which growing updates are refused"
    )
    max_rooms: int = Field(10_000, ge=0, description="rooms in memory per process (0 = no limit); more get 1013")

    # Authentication and authorization (see docs/security.md)
    auth_mode: Literal["development", "jwt"] = Field(
        "development", description="development trusts ?user=&role=; jwt needs a key (production)"
    )
    jwt_secret: SecretStr | None = Field(None, description="shared secret for HS256 tokens (at least 32 bytes)")
    jwt_public_key: str | None = Field(None, description="PEM public key for RS256/ES256 tokens")
    jwt_public_key_file: Path | None = Field(None, description="file holding the PEM public key")
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted algorithms; default HS256 with a secret, RS256+ES256 with a key"
    )
    jwt_audience: str | None = Field(None, description="required aud claim of tokens (unset: not checked)")
    jwt_issuer: str | None = Field(None, description="required iss claim of tokens (unset: not checked)")
    jwt_leeway: float = Field(0.0, ge=0, le=300, description="clock skew tolerated on exp/nbf/iat, seconds")
    token_refresh_window: float = Field(
        60.0, ge=0, description="seconds before expiry that opted-in clients get auth.expiring"
    )
    token_expiry_grace: float = Field(
        5.0, ge=0, description="seconds after expiry before a connection without a fresh token is closed 4401"
    )
    authenticator: str | None = Field(
        None, description="module:callable(settings) -> Authenticator, to plug in your own verifier"
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origin allowlist for websockets (comma-separated; '*' allows any). Empty: any in "
        "development mode, none (browsers refused) in jwt mode",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="/metrics accepts 'Authorization: Bearer <this>'; without it /metrics needs a server-admin "
        "token in jwt mode (open in development mode)",
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1", description="proxies whose X-Forwarded-For/-Proto are trusted (uvicorn); '*' trusts all"
    )

    # Configuration locks (leases). In process by default; in Redis when redis_url is set.
    locks_enabled: bool = Field(True, description="configuration locks (leases on paths); false turns the feature off")
    lock_ttl_seconds: float = Field(30.0, gt=0, le=3600, description="lease TTL when a request gives none")
    lock_min_ttl_seconds: float = Field(1.0, gt=0, description="shorter requested TTLs are raised to this")
    lock_max_ttl_seconds: float = Field(300.0, gt=0, description="longer requested TTLs are capped to this")
    lock_max_wait_seconds: float = Field(60.0, ge=0, description="longer waits for a lock are capped to this")
    lockable_paths: list[str] = Field(
        default_factory=lambda: [
            "type",
            "name",
            "description",
            "owner",
            "tags",
            "enabled",
            "connection",
            "credentials",
            "schedule",
            "scan_rules",
        ],
        description="roots of lockable configuration paths: a root and any path below it (JSON list in env)",
    )
    lock_max_depth: int = Field(4, ge=1, le=16, description="segments in a lockable path, at most")
    lock_max_per_connection: int = Field(32, ge=1, description="leases held or requested by one connection")
    lock_max_pending_per_connection: int = Field(8, ge=1, description="lock requests in flight per connection")
    lock_rate_per_second: float = Field(50.0, gt=0, description="lock requests per connection per second")
    lock_rate_burst: int = Field(100, ge=1, description="lock requests a connection may send at once")
    lock_redis_timeout_seconds: float = Field(0.5, gt=0, description="Redis socket timeout: lock requests fail fast")
    lock_fence_block: int = Field(1000, ge=1, description="fences reserved per durable high-water-mark write")

    # Websocket transport
    # A frozen or vanished client is dropped within ping_interval + ping_timeout (30 s by default).
    ping_interval: float = Field(10.0, gt=0, description="seconds between server pings")
    ping_timeout: float = Field(20.0, gt=0, description="a peer silent this long after a ping is closed")
    shutdown_timeout: float = Field(10.0, gt=0, description="seconds to wait for connections at shutdown")
    per_message_deflate: bool = Field(
        False, description="compress frames; costs CPU per peer per frame, saves bandwidth on big syncs"
    )

    # Presence (participant rosters; Redis-backed across nodes when redis_url is set)
    presence_ttl_seconds: float = Field(
        30.0, ge=0.5, le=3600, description="a crashed node's participants disappear from every roster within this"
    )
    presence_coalesce_ms: float = Field(
        50.0, ge=0, le=5000, description="at most one presence diff per room per window; bursts become one diff"
    )
    awareness_rate: float = Field(40.0, gt=0, description="awareness states accepted per second per connection")
    awareness_burst: int = Field(80, ge=1, description="awareness states a connection may send at once")

    # Events for the platform (docs/events.md): CloudEvents to a Redis Stream, webhooks and SSE
    events_enabled: bool = Field(True, description="events (GET /api/events, and the sinks configured below)")
    events_source: str = Field(
        "/datasource-collab", min_length=1, description="CloudEvents `source` of every event (the same on every node)"
    )
    events_stream: str | None = Field(
        None, description="Redis Stream the events are added to (XADD); unset: no stream sink"
    )
    events_redis_url: str | None = Field(
        None, description="Redis holding the events stream and cursors; default COLLAB_REDIS_URL"
    )
    events_stream_maxlen: int = Field(100_000, ge=100, description="the stream is capped near this length (MAXLEN ~)")
    events_webhook_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="URLs every event is POSTed to (comma-separated); empty: no webhooks"
    )
    events_webhook_secret: SecretStr | None = Field(
        None, description="Standard Webhooks signing secret, whsec_<base64> (required with webhook URLs)"
    )
    events_webhook_batch_max: int = Field(
        1,
        ge=1,
        le=1000,
        description="events of a workspace sent in one webhook request at most; above 1 a backlog goes as "
        "CloudEvents batches (JSON arrays, application/cloudevents-batch+json)",
    )
    events_webhook_timeout_seconds: float = Field(5.0, gt=0, description="one webhook request may take this long")
    events_webhook_backoff_initial_ms: float = Field(
        500.0, ge=1, description="first retry delay of a failed webhook request (doubles each time, jittered)"
    )
    events_webhook_backoff_max_ms: float = Field(30_000.0, ge=1, description="longest delay between webhook retries")
    events_webhook_dead_letter_seconds: float = Field(
        3600.0, gt=0, description="a webhook event still undelivered this long after its first try is dead-lettered"
    )
    events_poll_seconds: float = Field(
        1.0, gt=0, le=60, description="how often other nodes' commits are looked for (local ones are published at once)"
    )
    events_batch: int = Field(200, ge=1, le=10_000, description="log entries read per page when publishing")
    events_lease_ms: int = Field(
        10_000, ge=500, description="several nodes: one publishes a workspace to a sink, under a lease this long"
    )
    events_live_queue: int = Field(
        10_000, ge=10, description="best-effort events queued for the sinks before new ones are dropped"
    )
    events_sse_heartbeat_seconds: float = Field(15.0, gt=0, description="SSE comment sent when nothing else was")

    @field_validator("jwt_algorithms", "allowed_origins", "events_webhook_urls", mode="before")
    @classmethod
    def _lists(cls, value):
        return _split_list(value)

    @model_validator(mode="after")
    def _check_store(self) -> Settings:
        if self.store == "redis" and not self.redis_url:
            raise ValueError("COLLAB_STORE=redis needs COLLAB_REDIS_URL")
        if self.redis_url:
            from persistence.redisconn import parse_url

            parse_url(self.redis_url)  # a clear error for a malformed URL, at startup
        return self

    @model_validator(mode="after")
    def _check_auth(self) -> Settings:
        has_secret = self.jwt_secret is not None and bool(self.jwt_secret.get_secret_value())
        has_key = bool(self.jwt_public_key) or self.jwt_public_key_file is not None
        if has_secret and has_key:
            raise ValueError("set either COLLAB_JWT_SECRET or COLLAB_JWT_PUBLIC_KEY[_FILE], not both")
        if self.auth_mode == "jwt" and not (has_secret or has_key):
            raise ValueError(
                "COLLAB_AUTH_MODE=jwt refuses to start without COLLAB_JWT_SECRET or COLLAB_JWT_PUBLIC_KEY[_FILE]"
            )
        if has_secret and len(self.jwt_secret.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"COLLAB_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        if not self.jwt_algorithms and (has_secret or has_key):
            self.jwt_algorithms = ["HS256"] if has_secret else ["RS256", "ES256"]
        for alg in self.jwt_algorithms:
            if alg in _HMAC:
                if not has_secret:
                    raise ValueError(f"JWT algorithm {alg} needs COLLAB_JWT_SECRET")
            elif alg in _ASYMMETRIC:
                if not has_key:
                    raise ValueError(f"JWT algorithm {alg} needs COLLAB_JWT_PUBLIC_KEY[_FILE]")
            else:
                raise ValueError(f"JWT algorithm {alg!r} is not accepted")
        return self

    def jwt_key(self) -> str | None:
        """The verification key: the shared secret or the PEM public key."""
        if self.jwt_secret is not None and self.jwt_secret.get_secret_value():
            return self.jwt_secret.get_secret_value()
        if self.jwt_public_key:
            return self.jwt_public_key
        if self.jwt_public_key_file is not None:
            return self.jwt_public_key_file.read_text()
        return None

    @property
    def database_path(self) -> Path:
        return self.data_dir / "collab.sqlite3"
