"""The workspace configuration inside the CRDT document, as paths.

The configuration lives in the top-level Y.Map ``config``; nested maps make
paths such as ``connection.host``. Guards (locks, validation, roles) look at
the leaf-level changes an update made and may reject some paths; rejected
paths are put back by a compensating server change that every peer, stock
clients included, receives like any other update.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import pycrdt

CONFIG_MAP = "config"


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

Changes = dict[str, tuple[Any, Any]]  # path -> (old value or MISSING, new value or MISSING)


@dataclass(slots=True)
class Rejection:
    """Paths a guard refuses, and why (sent to the author as ``rejected``)."""

    paths: list[str]
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


class UpdateGuard(Protocol):
    """Decides which configuration changes of an update stand."""

    def check(self, room: Any, peer: Any, changes: Changes, config: dict[str, Any]) -> list[Rejection]:
        """Return rejections (empty list: everything stands)."""


def config_map(doc: pycrdt.Doc) -> pycrdt.Map:
    return doc.get(CONFIG_MAP, type=pycrdt.Map)


def config_snapshot(doc: pycrdt.Doc) -> dict[str, Any]:
    """The configuration as plain JSON-like data."""
    return config_map(doc).to_py() or {}


def diff(old: Any, new: Any, prefix: str = "") -> Changes:
    """Leaf-level differences between two plain configurations.

    A map that appears or disappears is reported leaf by leaf, so a guard on
    ``connection.host`` sees ``connection.host`` even when the whole
    ``connection`` map was created or deleted in one update. A map replaced
    by a scalar (or the reverse) is reported at the map's own path.
    """
    maps_or_missing = (isinstance(old, dict) or old is MISSING) and (isinstance(new, dict) or new is MISSING)
    non_empty = (isinstance(old, dict) and bool(old)) or (isinstance(new, dict) and bool(new))
    if maps_or_missing and non_empty:
        a = old if isinstance(old, dict) else {}
        b = new if isinstance(new, dict) else {}
        changes: Changes = {}
        for key in a.keys() | b.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            changes.update(diff(a.get(key, MISSING), b.get(key, MISSING), path))
        return changes
    if old != new or type(old) is not type(new):
        return {prefix: (old, new)}
    return {}


def get_path(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def to_prelim(value: Any) -> Any:
    """The one rule for values the server writes (seeding, restoring a refused change).

    A map becomes a Y.Map (paths reach into it: two users can edit two of its
    fields); anything else, lists included, is one plain JSON value: a list
    is a leaf of the configuration (diffed, locked, validated and restored
    whole), so every peer sees the type it was seeded with.
    """
    if isinstance(value, dict):
        return pycrdt.Map({str(k): to_prelim(v) for k, v in value.items()})
    return value


def restore(doc: pycrdt.Doc, path: str, old_config: dict[str, Any]) -> None:
    """Put ``path`` back to its value in ``old_config`` (inside a transaction)."""
    parts = path.split(".")
    node: Any = config_map(doc)
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, pycrdt.Map) else None
        if not isinstance(child, pycrdt.Map):
            # The parent itself was replaced or removed: restore the parent.
            restore(doc, ".".join(parts[: depth + 1]), old_config)
            return
        node = child
    old = get_path(old_config, path)
    key = parts[-1]
    if old is MISSING:
        if key in node:
            del node[key]
    else:
        node[key] = to_prelim(old)


def covers(lock_path: str, path: str) -> bool:
    """A lock on ``a.b`` covers ``a.b`` and ``a.b.c`` but not ``a.bc``."""
    return path == lock_path or path.startswith(lock_path + ".")


def overlaps(a: str, b: str) -> bool:
    return covers(a, b) or covers(b, a)


# ------------------------------------------------ incremental configuration view


class SectionCache:
    """Something derived from each top-level value of the view, recomputed only for the values that changed.

    The view is copy-on-write (``reread`` copies only the dicts along the
    touched paths), so a top-level value that is the same object as last
    time has the same content: what was derived from it still holds. A
    change then costs the sections it touched, not the whole configuration.
    ``derive(key, value)`` must be pure.
    """

    def __init__(self, derive: Callable[[str, Any], Any]) -> None:
        self._derive = derive
        self._memo: dict[str, tuple[Any, Any]] = {}

    def get(self, key: str, value: Any) -> Any:
        hit = self._memo.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        derived = self._derive(key, value)
        self._memo[key] = (value, derived)
        return derived

    def items(self, view: dict[str, Any]) -> list[tuple[str, Any]]:
        """(key, derived) for every top-level key of ``view``, in its order."""
        memo = self._memo
        if len(memo) > 2 * len(view) + 16:  # keys removed from the view: forget them
            for key in [k for k in memo if k not in view]:
                del memo[key]
        out = []
        for key, value in view.items():
            hit = memo.get(key)
            if hit is None or hit[0] is not value:
                hit = memo[key] = (value, self._derive(key, value))
            out.append((key, hit[1]))
        return out


REREAD: Any = object()  # a touched path whose new value must be read from the document
_SCALARS = (str, int, float, bool, type(None))


def touched_paths(events: list[Any], into: dict[str, Any]) -> None:
    """Add the configuration paths a transaction's deep events touched, with their new values.

    A map event names its changed keys and carries their new values: a
    scalar (or a deletion: MISSING) is taken from the event, so the view
    needs no read of the document; a map or list value is marked REREAD.
    An array or text event (or anything inside an array) touches the whole
    value at the nearest map path (REREAD). Works on pycrdt's wrapped events
    and on the raw ones of ``Map.integrated.observe_deep`` (cheaper: no
    wrapper objects per event).
    """
    for event in events:
        base: list[str] = []
        for part in event.path:
            if not isinstance(part, str):
                break
            base.append(part)
        prefix = ".".join(base)
        if type(event).__name__ == "MapEvent" and len(base) == len(event.path):
            for key, change in event.keys.items():
                path = f"{prefix}.{key}" if prefix else str(key)
                action = change.get("action") if isinstance(change, dict) else None
                if action == "delete":
                    into[path] = MISSING
                elif action in ("add", "update") and isinstance(change.get("newValue"), _SCALARS):
                    into[path] = change["newValue"]
                else:
                    into[path] = REREAD
        elif prefix:
            into[prefix] = REREAD


def _minimal(paths: Collection[str]) -> list[str]:
    """Drop paths whose ancestor is also listed (re-reading it covers them)."""
    if len(paths) == 1:  # the usual single-path change
        return list(paths)
    kept: list[str] = []
    for path in sorted(paths, key=lambda x: x.count(".")):
        if not any(covers(k, path) for k in kept):
            kept.append(path)
    return kept


def _read(cfg: pycrdt.Map, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, pycrdt.Map) or part not in node:
            return MISSING
        node = node[part]
    return node.to_py() if isinstance(node, pycrdt.Map | pycrdt.Array | pycrdt.Text) else node


def reread(
    cfg: pycrdt.Map | Callable[[], pycrdt.Map], base: dict[str, Any], touched: set[str] | dict[str, Any]
) -> dict[str, Any]:
    """``base`` with the touched paths read again from the document.

    Copy-on-write: ``base`` is not modified, and only the dicts along the
    touched paths are copied, so the cost follows the change, not the size
    of the configuration. ``touched`` may carry the new values the events
    reported (see ``touched_paths``): only REREAD paths are read. ``cfg``
    may be a function giving the map (called only if something is read).
    """
    if not touched:
        return base
    values = touched if isinstance(touched, dict) else {}
    new = dict(base)
    copied = {id(new)}
    for path in _minimal(touched):
        value = values.get(path, REREAD)
        if value is REREAD:
            if callable(cfg):
                cfg = cfg()
            value = _read(cfg, path)
        parts = path.split(".")
        node = new
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
            elif id(child) not in copied:
                child = dict(child)
            copied.add(id(child))
            node[part] = child
            node = child
        if value is MISSING:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return new


def changes_at(old: dict[str, Any], new: dict[str, Any], touched: Collection[str]) -> Changes:
    """Leaf-level changes between ``old`` and ``new`` below the touched paths."""
    changes: Changes = {}
    for path in _minimal(touched):
        changes.update(diff(get_path(old, path), get_path(new, path), path))
    return changes
