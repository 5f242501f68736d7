"""One configuration reference, read from the settings models themselves.

``collab config`` prints it with the effective values, ``docs/configuration.md``
is rendered from it (a test compares the two), and ``collab serve --config
file.toml`` reads a TOML file whose keys are the same field names. Order of
precedence: command-line flags, then ``COLLAB_*`` environment variables, then
the TOML file, then the defaults.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from collab.settings import Settings
from forwarding.settings import ForwardingSettings

ENV_PREFIX = "COLLAB_"
# Values of these fields are shown as *** (the type says so, or the name does).
_SECRET_NAME = re.compile(r"(^|_)(secret|token|password|passwd)$", re.IGNORECASE)
# Defaults computed per machine or process: documented by what they are, not by a value.
_COMPUTED_DEFAULTS = {"node_id": "<hostname>-<pid>"}


def sections() -> list[tuple[str, type[BaseSettings]]]:
    """Every settings model the server reads, with the part of the server it configures."""
    return [("server", Settings), ("forwarding", ForwardingSettings)]


@dataclass(frozen=True)
class Entry:
    section: str
    name: str
    env: str
    type: str
    default: str
    description: str
    constraints: str
    secret: bool


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        name = " | ".join(_type_name(a) for a in rest)
        return f"{name} (optional)" if len(rest) < len(args) else name
    if origin is list:
        return f"list of {_type_name(args[0])} (comma-separated or JSON)"
    if annotation is SecretStr:
        return "secret"
    if annotation is Path:
        return "path"
    if annotation is bool:
        return "bool (true/false)"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(metadata: list[Any]) -> str:
    out = []
    for item in metadata:
        for kind, sign in ((Ge, "≥"), (Gt, ">"), (Le, "≤"), (Lt, "<"), (MinLen, "length ≥"), (MaxLen, "length ≤")):
            if isinstance(item, kind):
                value = getattr(item, next(iter(item.__dataclass_fields__)))
                out.append(f"{sign} {value}")
    return ", ".join(out)


def _show(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, SecretStr):
        return "***" if value.get_secret_value() else ""
    if isinstance(value, list):
        return ",".join(str(v) for v in value) if value else "(empty)"
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) >= 1 or value == 0 else str(value)
    return str(value)


def is_secret(name: str, annotation: Any) -> bool:
    return SecretStr in (annotation, *typing.get_args(annotation)) or bool(_SECRET_NAME.search(name))


def entries() -> list[Entry]:
    """Every setting of every model, in declaration order."""
    out: list[Entry] = []
    for section, model in sections():
        for name, field in model.model_fields.items():
            if name in _COMPUTED_DEFAULTS:
                default = _COMPUTED_DEFAULTS[name]
            elif field.default is not PydanticUndefined:
                default = _show(field.default)
            elif field.default_factory is not None:
                default = _show(field.default_factory())
            else:
                default = "(required)"
            out.append(
                Entry(
                    section=section,
                    name=name,
                    env=ENV_PREFIX + name.upper(),
                    type=_type_name(field.annotation),
                    default=default,
                    description=(field.description or "").strip(),
                    constraints=_constraints(field.metadata),
                    secret=is_secret(name, field.annotation),
                )
            )
    return out


def effective_values(models: list[BaseModel]) -> dict[str, str]:
    """Field name -> the value in use, secrets masked."""
    values: dict[str, str] = {}
    for model in models:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if is_secret(name, field.annotation) and value not in (None, ""):
                values[name] = "***"
            else:
                values[name] = _show(value)
    return values


# ------------------------------------------------------------------ TOML


class ConfigFileError(ValueError):
    """A configuration file that cannot be used: the message says which key and why."""


def known_keys() -> set[str]:
    return {name for _, model in sections() for name in model.model_fields}


def read_toml(path: Path) -> dict[str, Any]:
    """The file's settings, keyed by field name; unknown keys refused with a suggestion.

    Keys are the field names (``port = 9000``); tables (``[server]``,
    ``[forwarding]``) may group them, their names are ignored.
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in {name for name, _ in sections()}:
            for inner, inner_value in value.items():
                flat[_key(path, inner, f"[{key}] ")] = inner_value
        else:
            flat[_key(path, key, "")] = value
    return flat


def _key(path: Path, key: str, where: str) -> str:
    name = key.lower().removeprefix("collab_")
    known = known_keys()
    if name not in known:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigFileError(
            f"{path}: {where}unknown setting {key!r}{hint}; `collab config` lists every setting"
        )
    return name


def without_environment(values: dict[str, Any], environ: typing.Mapping[str, str] | None = None) -> dict[str, Any]:
    """Drop the file's values whose ``COLLAB_*`` variable is set: the environment wins."""
    env = {k.upper() for k in (os.environ if environ is None else environ)}
    return {k: v for k, v in values.items() if ENV_PREFIX + k.upper() not in env}


def split(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The file's values per section (each model takes its own fields)."""
    return {
        section: {k: v for k, v in values.items() if k in model.model_fields} for section, model in sections()
    }


# ------------------------------------------------------------------ rendering


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(values: dict[str, str] | None = None) -> str:
    """Plain text for a terminal: one block per setting."""
    lines: list[str] = []
    current = None
    for e in entries():
        if e.section != current:
            current = e.section
            lines.append(f"# {current}")
        lines.append(f"{e.env}  ({e.type}; default {e.default})")
        if e.description:
            lines.append(f"    {e.description}")
        if e.constraints:
            lines.append(f"    allowed: {e.constraints}")
        if values is not None:
            lines.append(f"    effective: {values.get(e.name, '')}")
    return "\n".join(lines) + "\n"


def render_markdown() -> str:
    """docs/configuration.md (tests/test_configref.py fails when the file differs)."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `collab config --markdown > docs/configuration.md` from the settings",
        "     models (collab/settings.py, forwarding/settings.py); tests/test_configref.py",
        "     fails when this file and the code differ. Edit the models, not this file. -->",
        "",
        "Every setting is an environment variable `COLLAB_<NAME>`; the same names",
        "(lower case, without the prefix) are the keys of a TOML file given with",
        "`collab serve --config collab.toml`. Precedence: command-line flags,",
        "then environment variables, then the file, then the defaults below.",
        "Unknown keys in the file are refused (with the nearest known name).",
        "",
        "```toml",
        "# collab.toml",
        'host = "0.0.0.0"',
        "port = 8765",
        'redis_url = "redis://127.0.0.1:6379/0"',
        "",
        "[forwarding]            # tables only group keys; the names are what count",
        'backend_url = "http://127.0.0.1:8766"',
        "```",
        "",
        "`collab config` (with the same `--config`) prints every setting with",
        "its effective value; values of secrets are shown as `***`.",
        "",
    ]
    current = None
    for e in entries():
        if e.section != current:
            current = e.section
            out += [f"## {current}", "", "| variable | type | default | meaning |", "|---|---|---|---|"]
        meaning = e.description or ""
        if e.constraints:
            meaning = f"{meaning} ({e.constraints})" if meaning else e.constraints
        if e.secret:
            meaning += " *Secret: shown as `***`.*"
        out.append(f"| `{e.env}` | {_cell(e.type)} | `{_cell(e.default)}` | {_cell(meaning)} |")
    out.append("")
    return "\n".join(out).replace("| `—` |", "| — |")
