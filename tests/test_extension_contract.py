"""The extension contract (collab/extensions.py) and the import rules it stands for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from codec import protocol as p
from collab.extensions import ControlRoute, Extension, control_handlers
from rooms.peer import Slot
from tests.fakes import peer_state

ROOT = Path(__file__).resolve().parent.parent
FEATURES = ("locks", "presence", "forwarding", "scaleout", "events")
PROJECT = ("codec", "collab", "rooms", "persistence", "locks", "presence", "forwarding", "scaleout", "events",
           "refbackend", "loadtest")  # fmt: skip


def imports_of(package: str) -> set[str]:
    """Every module a package's files import (at any depth, TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_codec_imports_nothing_of_the_project():
    assert {m for m in imports_of("codec") if m.split(".")[0] in PROJECT} <= {"codec", "codec.protocol"}


@pytest.mark.parametrize("package", [f for f in FEATURES if (ROOT / f).is_dir()])
def test_features_do_not_import_the_app_module(package):
    assert not {m for m in imports_of(package) if m == "collab.app" or m.startswith("collab.app.")}


def test_rooms_and_stores_do_not_import_the_app_or_features():
    for package in ("rooms", "persistence"):
        bad = {m for m in imports_of(package) if m.split(".")[0] in ("collab", *FEATURES)}
        assert not bad, (package, bad)


def test_a_control_route_checks_its_role_before_the_handler():
    seen = []
    route = ControlRoute("x.do", lambda room, ps, msg: seen.append(ps), requires="editor", error_type="x.error")
    handler = route.guarded()
    viewer, editor = peer_state("vic", role="viewer"), peer_state("eve", role="editor")
    handler(None, viewer, p.Control("x.do", {"type": "x.do", "id": 7, "path": "a.b"}))
    assert seen == []
    (refusal,) = [m.body for m in viewer.peer.messages()]
    assert refusal == {"type": "x.error", "code": "forbidden", "message": "x.do needs the editor role", "id": 7,
                       "path": "a.b"}  # fmt: skip
    handler(None, editor, p.Control("x.do", {"type": "x.do"}))
    assert seen == [editor] and editor.peer.messages() == []


def test_a_control_type_claimed_twice_is_refused_at_startup():
    class One(Extension):
        name = "one"

        def control_routes(self):
            return [ControlRoute("thing.get", lambda *a: None)]

    class Two(One):
        name = "two"

    assert set(control_handlers([One()])) == {"thing.get"}
    with pytest.raises(ValueError, match="claimed twice"):
        control_handlers([One(), Two()])

    class Hijack(Extension):
        def control_routes(self):
            return [ControlRoute("hello", lambda *a: None)]

    with pytest.raises(ValueError, match="hello"):
        control_handlers([Hijack()])


def test_slots_are_typed_places_per_connection():
    a, b = peer_state("a"), peer_state("b")
    mine, theirs = Slot[int]("mine"), Slot[str]("theirs")
    assert mine.get(a) is None and a.slots is None  # nothing allocated until a feature stores something
    mine.set(a, 1)
    theirs.set(a, "x")
    assert (mine.get(a), theirs.get(a), mine.get(b)) == (1, "x", None)
    assert mine.pop(a) == 1 and mine.get(a) is None and theirs.get(a) == "x"


def test_the_default_features_override_hooks_with_the_declared_signatures():
    """A hook overridden with other parameters would be called wrongly by the server: same names, same order."""
    import inspect

    from collab.app import default_extensions
    from collab.settings import Settings

    hooks = {name: value for name, value in vars(Extension).items() if callable(value) and not name.startswith("_")}
    overridden = 0
    for ext in default_extensions(Settings()):
        for name, declared in hooks.items():
            impl = getattr(type(ext), name)
            if impl is declared:
                continue
            overridden += 1
            want = [p.name for p in inspect.signature(declared).parameters.values()]
            got = [p.name for p in inspect.signature(impl).parameters.values()]
            assert len(got) == len(want), (type(ext).__name__, name, got, want)
    assert overridden >= 10
