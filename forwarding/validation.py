"""Refuse updates that would make the configuration invalid.

:class:`ValidationGuard` is a room update guard. After each client update
that touched the ``config`` map, the room hands it the changed paths and the
new configuration; the guard validates that configuration with the pydantic
model. If the update brought in an error, every path the update changed is
rejected: the room puts the previous values back with a compensating change
that every peer receives, and the author gets ``rejected`` with pydantic's
error details.

"Brought in" matters when the stored configuration is already invalid (a
stricter model was deployed, or the backend seeded a value the model
refuses): errors that were there before and that the update did not touch do
not block it, so users can still fix things one field at a time. An error
counts as the update's when it is new, or when it sits on a path the update
changed.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from pydantic import BaseModel, ValidationError

from rooms.config import MISSING, Changes, Rejection, SectionCache, overlaps

log = logging.getLogger("collab.validation")

DEFAULT_MODEL = "forwarding.model:DataSourceConfig"
_MAX_INPUT_CHARS = 200


def load_model(spec: str | None) -> type[BaseModel] | None:
    """``module:Class`` -> the pydantic model class; ``""``/None -> no validation."""
    if not spec:
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"COLLAB_CONFIG_MODEL must look like module:Class, got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        raise TypeError(f"{spec} is not a pydantic model class")
    return obj


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # pycrdt reads every number as a float
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value if len(value) <= _MAX_INPUT_CHARS else value[:_MAX_INPUT_CHARS] + "…"
    return None  # maps and lists: the path says where; the whole input is not echoed


def jsonable_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic's error details, safe for msgpack/JSON, each with a dotted ``path``."""
    out = []
    for err in exc.errors(include_url=False):
        loc = list(err.get("loc", ()))
        item: dict[str, Any] = {
            "path": ".".join(str(part) for part in loc),
            "loc": loc,
            "type": err.get("type", "value_error"),
            "msg": err.get("msg", ""),
        }
        if "input" in err:
            item["input"] = _json_value(err["input"])
        ctx = err.get("ctx")
        if ctx:
            item["ctx"] = {
                str(k): v if v is None or isinstance(v, bool | int | float | str) else str(v) for k, v in ctx.items()
            }
        out.append(item)
    return out


class ConfigValidator:
    """Validates plain configurations against a pydantic model."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model
        # A model may say which top-level keys a change must be validated with
        # (``validation_scope(config, keys) -> set | None``); without it, the
        # whole configuration is validated on every change.
        self._scope = getattr(model, "validation_scope", None)

    @property
    def name(self) -> str:
        return f"{self.model.__module__}:{self.model.__qualname__}"

    def errors(self, config: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            self.model.model_validate(config)
        except ValidationError as exc:
            return jsonable_errors(exc)
        return []

    def introduced(self, old: dict[str, Any], new: dict[str, Any], changes: Changes) -> list[dict[str, Any]]:
        """The errors of ``new`` that the change from ``old`` is responsible for.

        Only the top-level sections the change touched are validated when the
        model declares them independent (``validation_scope``): errors in the
        other sections are the same before and after, so they would not count
        as the change's anyway.
        """
        if self._scope is not None:
            keys = self._scope(new, {path.split(".", 1)[0] for path in changes})
            if keys is not None:
                if not keys:
                    return []
                old = {k: old[k] for k in keys if k in old}
                new = {k: new[k] for k in keys if k in new}
        errors = self.errors(new)
        if not errors:
            return []
        before = {(tuple(e["loc"]), e["type"]) for e in self.errors(old)}
        changed = list(changes)
        return [
            e
            for e in errors
            if (tuple(e["loc"]), e["type"]) not in before
            or (e["path"] and any(overlaps(path, e["path"]) for path in changed))
        ]


def count_fields(value: Any, limit: int) -> int:
    """Leaves of a plain configuration, counting stops a little past ``limit``."""
    if isinstance(value, dict):
        total = 0
        for item in value.values():
            total += count_fields(item, limit)
            if total > limit:
                break
        return total
    return 1


def _may_grow(changes: Changes) -> bool:
    """Whether the changes can add leaves (a path that appears, or a value that becomes a map)."""
    return any(old is MISSING or isinstance(new, dict) for old, new in changes.values())


class ValidationGuard:
    """rooms.config.UpdateGuard: an update that makes the configuration invalid is undone."""

    def __init__(self, validator: ConfigValidator, max_fields: int = 0) -> None:
        self.validator = validator
        self.max_fields = max_fields
        # Leaves per top-level section, counted again only for the sections that changed.
        self._counts = SectionCache(lambda _key, value: count_fields(value, max_fields))

    def _count(self, config: dict[str, Any]) -> int:
        return sum(count for _key, count in self._counts.items(config))

    def check(self, room: Any, peer: Any, changes: Changes, config: dict[str, Any]) -> list[Rejection]:
        old = getattr(room, "config_view", {})  # the configuration before this update
        if self.max_fields and _may_grow(changes) and self._count(config) > self.max_fields:
            if count_fields(config, self.max_fields) > count_fields(old, self.max_fields):
                return [
                    Rejection(
                        paths=sorted(changes),
                        reason="too_many_fields",
                        details={"limit": self.max_fields},
                    )
                ]
        errors = self.validator.introduced(old, config, changes)
        if not errors:
            return []
        return [Rejection(paths=sorted(changes), reason="invalid", details={"errors": errors})]
