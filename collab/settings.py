"""All settings in one pydantic model; every field is an environment variable
``COLLAB_<FIELD>`` (e.g. ``COLLAB_PORT=9000``) and most are CLI flags too."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COLLAB_", extra="ignore")

    # Network
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    # Storage
    data_dir: Path = Path("./data")
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        "FULL", description="FULL survives power loss; NORMAL survives a process crash only"
    )
    compact_every_updates: int = Field(500, ge=1)
    compact_every_bytes: int = Field(4 * 1024 * 1024, ge=1024)

    # Scale-out (later): when set, Redis backs locks, presence and relay.
    redis_url: str | None = None
    node_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        min_length=1,
        max_length=200,
        description="this server's name in rosters and logs; unique per running process",
    )

    # Rooms
    flush_interval_ms: float = Field(
        0.0, ge=0, le=1000, description="merge window for broadcasts; 0 merges what arrives in one loop turn"
    )
    room_idle_seconds: float = Field(10.0, ge=0, description="keep an empty room in memory this long")

    # Limits
    max_message_bytes: int = Field(1024 * 1024, ge=1024, description="larger frames close with 1009")
    peer_queue_frames: int = Field(
        2048, ge=16, description="outgoing frames queued per peer before it is cut off (1013)"
    )
    max_awareness_state_bytes: int = Field(64 * 1024, ge=64)

    # Configuration locks (leases). In process by default; in Redis when redis_url is set.
    locks_enabled: bool = True
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
    lock_rate_burst: int = Field(100, ge=1)
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

    @property
    def database_path(self) -> Path:
        return self.data_dir / "collab.sqlite3"
