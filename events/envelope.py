"""The CloudEvents 1.0 envelope (JSON format), as plain dicts.

Eight attributes do not need a library: ``cloud_event`` builds them and
``problems`` checks one against the spec's rules (tests use it on every
event read back from every sink).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

SPECVERSION = "1.0"
CONTENT_TYPE = "application/json"
_ATTRIBUTE = re.compile(r"[a-z0-9]{1,20}")
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cloud_event(
    event_type: str, workspace: str, data: dict[str, Any], *, event_id: str, at: float, source: str
) -> dict[str, Any]:
    """One event: ``subject`` is the workspace, ``data`` a JSON object.

    ``source`` + ``id`` identify it: both are the same on every node, so a
    consumer deduplicates by them (a retry after a crash repeats the id).
    """
    return {
        "specversion": SPECVERSION,
        "id": event_id,
        "source": source,
        "type": event_type,
        "subject": workspace,
        "time": rfc3339(at),
        "datacontenttype": CONTENT_TYPE,
        "data": data,
    }


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def problems(event: Any) -> list[str]:
    """What makes ``event`` not a valid CloudEvents 1.0 JSON event (empty: valid)."""
    if not isinstance(event, dict):
        return ["not a JSON object"]
    out = []
    for name in ("specversion", "id", "source", "type"):
        if not isinstance(event.get(name), str) or not event[name]:
            out.append(f"{name} must be a non-empty string")
    if event.get("specversion") != SPECVERSION:
        out.append("specversion must be 1.0")
    for name in event:
        if name not in ("data", "data_base64") and not _ATTRIBUTE.fullmatch(name):
            out.append(f"attribute name {name!r} is not lowercase a-z0-9 of at most 20 characters")
    if "time" in event and not (isinstance(event["time"], str) and _RFC3339.fullmatch(event["time"])):
        out.append("time must be an RFC 3339 timestamp")
    if "subject" in event and not (isinstance(event["subject"], str) and event["subject"]):
        out.append("subject must be a non-empty string")
    if "datacontenttype" in event and event["datacontenttype"] != CONTENT_TYPE:
        out.append("datacontenttype must be application/json here")
    if "data" in event and "data_base64" in event:
        out.append("data and data_base64 are exclusive")
    return out
