"""The default model of a valid data-source configuration (pydantic).

The configuration is edited a field at a time, so a *draft* must be
acceptable: the empty configuration of a new workspace, and any partial one
while users fill the form in. The rule:

* every field that is present must be valid (``null`` and ``""`` count as
  "not filled in yet", so a cleared input is never refused);
* inside the known sections (``connection``, ``credentials``, ``schedule``,
  ``scan_rules``) unknown keys are refused -- they are typos; unknown
  *top-level* keys are allowed (UI state, extensions);
* a secret is never stored in clear: a key such as ``password`` or
  ``api_key`` holding a value is refused anywhere in the document, the
  credentials are a reference (``credentials.secret_ref``);
* completeness is enforced only for an *enabled* data source: setting
  ``enabled: true`` on an incomplete configuration is refused, and so is
  removing a required field from an enabled one.

Replace the model with ``COLLAB_CONFIG_MODEL=module:Class`` (any pydantic
model; it decides itself what a draft may look like).
"""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from functools import cache, lru_cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

DataSourceType = Literal[
    "postgresql",
    "mysql",
    "mariadb",
    "sqlserver",
    "oracle",
    "snowflake",
    "redshift",
    "bigquery",
    "databricks",
    "clickhouse",
    "mongodb",
]
SSLMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]

# Keys whose value would be a secret in clear.
SECRET_KEYS = re.compile(
    r"^(password|passwd|pwd|secret|client_secret|secret_key|token|access_token|refresh_token|"
    r"api_key|apikey|private_key|privatekey|connection_string|dsn)$",
    re.IGNORECASE,
)
SECRET_REF_SCHEMES = ("vault", "aws-sm", "gcp-sm", "azure-kv", "k8s", "env", "file")
_SECRET_REF = re.compile(r"^(" + "|".join(map(re.escape, SECRET_REF_SCHEMES)) + r")://[^\s]{1,500}$")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")
_IDENT = re.compile(r"^[^\x00-\x1f]{1,128}$")
_PATTERN = re.compile(r"^[A-Za-z0-9_.*?$\[\]-]{1,256}$")

REQUIRED_WHEN_ENABLED = (
    ("type",),
    ("connection", "host"),
    ("connection", "port"),
    ("connection", "database"),
    ("connection", "username"),
    ("credentials", "secret_ref"),
)


# ------------------------------------------------------------- field checks


def _hostname(value: str) -> str:
    text = value.strip()
    if text != value:
        raise PydanticCustomError("hostname", "host must not have surrounding spaces")
    try:
        ipaddress.ip_address(value.strip("[]"))
        return value
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        raise PydanticCustomError("hostname", "not a valid host name or IP address: {host}", {"host": value})
    return value


def _secret_ref(value: str) -> str:
    if not _SECRET_REF.match(value):
        raise PydanticCustomError(
            "secret_ref",
            "a secret reference looks like <scheme>://<path>, scheme one of {schemes}; never the secret itself",
            {"schemes": ", ".join(SECRET_REF_SCHEMES)},
        )
    return value


def _timezone(value: str) -> str:
    if value in _timezones():
        return value
    raise PydanticCustomError("timezone", "unknown IANA time zone {tz}", {"tz": value})


@lru_cache(maxsize=1)
def _timezones() -> frozenset[str]:
    names = set(zoneinfo.available_timezones()) | {"UTC"}
    return frozenset(names)


_CRON_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())},
    ),
    ("day of week", 0, 7, {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}),
)
_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_problem(expr: str) -> str | None:
    """Why ``expr`` is not a five-field cron expression (None if it is one)."""
    text = expr.strip()
    if text.lower() in _CRON_MACROS:
        return None
    parts = text.split()
    if len(parts) != 5:
        return f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}"
    for part, (name, low, high, names) in zip(parts, _CRON_FIELDS):
        for item in part.split(","):
            problem = _cron_item(item, low, high, names)
            if problem:
                return f"{name} field {part!r}: {problem}"
    return None


def _cron_item(item: str, low: int, high: int, names: dict[str, int]) -> str | None:
    if not item:
        return "empty list item"
    base, _, step = item.partition("/")
    if step:
        if not step.isdigit() or int(step) == 0:
            return f"bad step {step!r}"
    if base == "*":
        return None
    start, dash, end = base.partition("-")
    values = []
    for token in (start, end) if dash else (start,):
        if token.isdigit():
            value = int(token)
        elif token.upper() in names:
            value = names[token.upper()]
        else:
            return f"{token!r} is not a number"
        if not low <= value <= high:
            return f"{value} outside {low}-{high}"
        values.append(value)
    if dash and values[0] > values[1]:
        return f"range {base!r} goes backwards"
    if step and not dash:
        return None if item.count("/") == 1 else "bad step"
    return None


def _cron(value: str) -> str:
    problem = cron_problem(value)
    if problem:
        raise PydanticCustomError("cron", "invalid cron expression: {problem}", {"problem": problem})
    return value


Hostname = Annotated[str, AfterValidator(_hostname)]
Port = Annotated[int, Field(ge=1, le=65535)]
Identifier = Annotated[str, Field(pattern=_IDENT.pattern)]
SecretRef = Annotated[str, AfterValidator(_secret_ref)]
TimeZone = Annotated[str, AfterValidator(_timezone)]
Cron = Annotated[str, AfterValidator(_cron)]
Tag = Annotated[str, Field(pattern=_TAG.pattern)]
TablePattern = Annotated[str, Field(pattern=_PATTERN.pattern)]


# ------------------------------------------------------------------- model


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Connection(_Section):
    host: Hostname | None = None
    port: Port | None = None
    database: Identifier | None = None
    username: Identifier | None = None
    ssl_mode: SSLMode | None = None


class Credentials(_Section):
    secret_ref: SecretRef | None = None


class Schedule(_Section):
    cron: Cron | None = None
    timezone: TimeZone | None = None
    enabled: bool | None = None


class ScanRules(_Section):
    include: Annotated[list[TablePattern], Field(max_length=200)] | None = None
    exclude: Annotated[list[TablePattern], Field(max_length=200)] | None = None
    sample_rows: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    detect_pii: bool | None = None


class DataSourceConfig(BaseModel):
    """A data-source configuration, possibly a draft (see the module docstring)."""

    model_config = ConfigDict(extra="allow")

    type: DataSourceType | None = None
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    description: Annotated[str, Field(max_length=4000)] | None = None
    owner: Identifier | None = None
    tags: Annotated[list[Tag], Field(max_length=50)] | None = None
    enabled: bool | None = None
    connection: Connection | None = None
    credentials: Credentials | None = None
    schedule: Schedule | None = None
    scan_rules: ScanRules | None = None

    @classmethod
    def validation_scope(cls, config: dict[str, Any], keys: set[str]) -> set[str] | None:
        """The top-level keys a change of ``keys`` must be validated with (None: the whole configuration).

        Every top-level value is valid or not on its own (its field, the
        secret scan, blanks), except the completeness of an enabled data
        source, which spans ``enabled`` and the required sections. An empty
        set: the change cannot be invalid.
        """
        if config.get("enabled") and keys & _COMPLETENESS_KEYS:
            return None
        # An unknown top-level key holding a scalar can only be wrong by its name
        # (a secret in clear): anything else there needs no validation at all.
        return {
            key
            for key in keys
            if key in _field_names(cls)
            or not isinstance(config.get(key), _SCALARS)
            or (SECRET_KEYS.match(key) and config.get(key) not in (None, ""))
        }

    @model_validator(mode="before")
    @classmethod
    def _drafts_and_secrets(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        errors: list[InitErrorDetails] = []
        _find_secrets(data, (), errors)
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return _blank_to_none(data, depth=0)

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> DataSourceConfig:
        if not self.enabled:
            return self
        errors = [
            InitErrorDetails(
                type=PydanticCustomError(
                    "required_when_enabled", "required while the data source is enabled (enabled: true)"
                ),
                loc=path,
                input=None,
            )
            for path in REQUIRED_WHEN_ENABLED
            if _get(self, path) is None
        ]
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


@cache
def _field_names(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(model.model_fields)  # (a property that costs a dict copy per read)


def _get(model: BaseModel, path: tuple[str, ...]) -> Any:
    node: Any = model
    for part in path:
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _blank_to_none(data: Any, depth: int) -> Any:
    """``""`` means "not filled in" (like null or absent) in the known sections."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if value == "" and isinstance(value, str):
                out[key] = None
            elif depth == 0 and isinstance(value, dict) and key in _SECTIONS:
                out[key] = _blank_to_none(value, depth + 1)
            else:
                out[key] = value
        return out
    return data


_SECTIONS = {"connection", "credentials", "schedule", "scan_rules"}
_SCALARS = (str, int, float, bool, type(None))
_COMPLETENESS_KEYS = frozenset({"enabled", *(path[0] for path in REQUIRED_WHEN_ENABLED)})


def _find_secrets(node: Any, loc: tuple, errors: list[InitErrorDetails]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            here = (*loc, key)
            if isinstance(key, str) and SECRET_KEYS.match(key) and value not in (None, ""):
                errors.append(
                    InitErrorDetails(
                        type=PydanticCustomError(
                            "secret_in_clear",
                            "secrets must not be stored in the configuration; "
                            "put a reference in credentials.secret_ref",
                        ),
                        loc=here,
                        input="***",
                    )
                )
            else:
                _find_secrets(value, here, errors)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _find_secrets(value, (*loc, i), errors)
