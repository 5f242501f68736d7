"""Logging: text for development, one JSON object per line for production.

``COLLAB_LOG_FORMAT=json`` makes every record of the process (ours,
uvicorn's, libraries') a single line::

    {"ts": "2026-11-27T15:20:44.123Z", "level": "info", "logger": "collab.app",
     "msg": "...", "node": "web-1", "workspace": "ds-1", "user": "u-42"}

``workspace`` and ``user`` come from context variables that the websocket
handler sets for its connection (``bind``): every line logged while serving
that connection -- in its task or in a task it started -- carries them.
Token redaction (``collab.security.install_log_redaction``) happens when a
record is created, before any formatter; the JSON formatter redacts the
message and the traceback once more.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from collab.security import redact_tokens

# Per connection (or per background task working for one workspace).
workspace_var: ContextVar[str | None] = ContextVar("collab_log_workspace", default=None)
user_var: ContextVar[str | None] = ContextVar("collab_log_user", default=None)

# Attributes every LogRecord has: anything else was passed with ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}


def bind(workspace: str | None = None, user: str | None = None) -> None:
    """Tag the log lines of the current task (and the tasks it starts) with a workspace and a user."""
    if workspace is not None:
        workspace_var.set(workspace)
    if user is not None:
        user_var.set(user)


def unbind() -> None:
    """For a background task that works for nobody in particular."""
    workspace_var.set(None)
    user_var.set(None)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_tokens(record.getMessage()),
        }
        if self.node:
            out["node"] = self.node
        workspace = getattr(record, "workspace", None) or workspace_var.get()
        if workspace is not None:
            out["workspace"] = workspace
        user = getattr(record, "user", None) or user_var.get()
        if user is not None:
            out["user"] = user
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | type(None)) else repr(value)
        if record.exc_info:
            out["exc"] = redact_tokens(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = redact_tokens(record.exc_text)
        if record.stack_info:
            out["stack"] = redact_tokens(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure(level: str, fmt: str, node: str | None = None) -> None:
    """Set up the root logger (``collab serve``): text or JSON lines on stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(node) if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper() if level != "trace" else "DEBUG")
    if fmt == "json":
        logging.captureWarnings(True)  # Python warnings become log records (JSON lines) too


def announce(message: str, fmt: str, level: str = "info", stream: Any = None) -> None:
    """A line for whoever watches the process (printed whatever the log level; stdout by default)."""
    if fmt == "json":
        line = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": level,
            "logger": "collab.cli",
            "msg": message,
        }
        print(json.dumps(line), file=stream or sys.stdout, flush=True)
    else:
        print(message, file=stream or sys.stdout, flush=True)
