"""Settings of validation and forwarding: environment variables ``COLLAB_<FIELD>``.

Kept apart from collab/settings.py (same prefix, same conventions) so the
feature stays self-contained.
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from forwarding.validation import DEFAULT_MODEL


class ForwardingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COLLAB_", extra="ignore")

    # Validation
    config_model: str = Field(
        DEFAULT_MODEL, description="pydantic model of a valid configuration, module:Class; empty = no validation"
    )

    max_config_fields: int = Field(
        1000,
        ge=0,
        description="most fields (leaves) the config map may hold; every accepted change records the whole "
        "configuration, so an unbounded map would make each change ever dearer (0 = no limit)",
    )

    # The data-source backend
    backend_url: str | None = Field(None, description="e.g. http://127.0.0.1:8766; unset = forwarding off")
    backend_token: str | None = Field(
        None,
        description="sent as 'Authorization: Bearer <token>'; also what the backend's change hook presents "
        "(POST /api/workspaces/{id}/backend-changes)",
    )
    backend_timeout_seconds: float = Field(10.0, gt=0, description="per HTTP request")
    seed_timeout_seconds: float = Field(
        10.0, gt=0, description="a new workspace waits this long for its initial state from the backend"
    )

    ready_requires_backend: bool = Field(
        True, description="/readyz answers 503 while the backend is unreachable (false: reported, not required)"
    )
    backend_health_path: str = Field(
        "/healthz", description="probed by /readyz; any answer but 502/503/504 means the backend is reachable"
    )

    # Delivery
    forward_debounce_ms: float = Field(500.0, ge=0, description="send once no change came for this long")
    forward_max_delay_ms: float = Field(5000.0, ge=0, description="...but never hold a change longer than this")
    forward_batch_max: int = Field(200, ge=1, description="changes coalesced into one request at most")
    forward_backoff_initial_ms: float = Field(
        500.0, gt=0, description="first wait after a failed delivery (doubles up to the max)"
    )
    forward_backoff_max_ms: float = Field(
        10000.0, gt=0, description="longest wait between two attempts (one probe at a time while the backend is down)"
    )
    forward_dead_letter_seconds: float = Field(
        86400.0, gt=0, description="a change still undelivered after failing this long goes to the dead-letter list"
    )
    forward_concurrency: int = Field(16, ge=1, description="requests in flight to the backend at most")
    forward_lease_ms: float = Field(
        10_000.0,
        ge=100,
        description="several nodes (Redis): a workspace's forwarding lease lasts this long unless renewed; "
        "a node frozen longer mid-request is replaced, and its late answer is dropped",
    )

    # Two-way sync (docs/forwarding.md, "Changes made at the backend")
    revert_refused: bool = Field(
        True,
        description="a change the backend refuses (4xx) is undone in the document by a server change back to "
        "the backend's state (false: the document keeps it, as before)",
    )
    backend_pull_seconds: float = Field(
        30.0,
        ge=0,
        description="workspaces with peers ask the backend for changes this often (If-None-Match: a quiet "
        "backend answers 304); 0 = only when the backend calls /backend-changes",
    )
    backend_pull_on_open: bool = Field(
        True, description="a workspace that opens again asks the backend what changed while it was closed"
    )
    bulk_max_workspaces: int = Field(10_000, ge=1, description="workspaces one bulk job may name at most")

    @field_validator("backend_url")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("COLLAB_BACKEND_URL must be an http:// or https:// URL")
        return value
