"""Pages for people: the landing page at ``/`` and the operator console at ``/admin``.

The landing page says what runs and where to go next; it shows no workspace
or user. The console is plain HTML and JS (collab/static/console.*, no build
step) over one JSON document, ``GET /api/admin/console``, which it polls; its
buttons call the admin API (force-release) and the forwarding API (dead
letters: retry, discard). Page and data need the admin role for the whole
server, declared at the routes and checked by the one gate (collab/gate.py): a token
with ``"*": "admin"`` (``?token=`` in the page address, passed on by the page
to every request), or ``?user=...&role=admin`` from loopback in development.
"""

from __future__ import annotations

import asyncio
import html
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from collab import __version__
from collab.gate import PUBLIC, WORKSPACE_ID, GatedRoute, server_role

if TYPE_CHECKING:
    from collab.app import App

STATIC = Path(__file__).resolve().parent / "static"
DOCS = Path(__file__).resolve().parent.parent / "docs"  # present in a source checkout
_DOC_NAME = re.compile(r"[a-z0-9-]{1,64}\.md")
MAX_ROOMS = 200  # rooms described in one console document (the busiest first)
AUDIT_ENTRIES = 10  # recent audit entries per workspace
DEV_WARNING = (
    '<p class="warn">In <code>development</code> mode anyone who reaches this port may connect as anyone '
    "(<code>?user=alice&amp;role=editor</code>); set <code>COLLAB_AUTH_MODE=jwt</code> for production.</p>"
)


class Console:
    def __init__(self, app: App) -> None:
        self.app = app

    def routes(self) -> list[GatedRoute]:
        admin = server_role("admin")
        return [
            GatedRoute("/", self.landing, methods=["GET"], requires=PUBLIC),
            GatedRoute("/admin", self.page, methods=["GET"], requires=admin),
            GatedRoute("/api/admin/console", self.overview, methods=["GET"], requires=admin),
            GatedRoute("/docs/{name}", self.doc, methods=["GET"], requires=PUBLIC),
        ]

    # ------------------------------------------------------------ pages

    async def landing(self, request: Request) -> HTMLResponse:
        """``GET /``: what runs here and links to the panel, the console, /metrics and the docs."""
        s = self.app.settings
        forwarding = self._extension("forwarding")
        backend = getattr(getattr(forwarding, "settings", None), "backend_url", None)
        host = request.headers.get("host") or f"{s.host}:{s.port}"
        docs = sorted(p.name for p in DOCS.glob("*.md")) if DOCS.is_dir() else []
        values = {
            "version": __version__,
            "node": s.node_id,
            "auth": s.auth_mode,
            "ws": f"ws://{host}/ws/<workspace>",
            "store": "Redis" if s.uses_redis_store else f"SQLite in {s.database_path}",
            "backend": backend or "off (COLLAB_BACKEND_URL is not set)",
            "dev_query": "?user=ops&amp;role=admin" if s.auth_mode == "development" else "",
            "dev_warning": DEV_WARNING if s.auth_mode == "development" else "",
            "console_hint": "" if s.auth_mode == "development" else "; open it as /admin?token=<a server admin token>",
            "docs": "".join(f'<li><a href="/docs/{html.escape(n)}">{html.escape(n)}</a></li>' for n in docs)
            or "<li>docs/ in the source repository</li>",
        }
        text = (STATIC / "index.html").read_text()
        for key, value in values.items():
            safe = value if key in ("docs", "dev_query", "dev_warning") else html.escape(str(value))
            text = text.replace("{{" + key + "}}", safe)
        return HTMLResponse(text)

    async def page(self, request: Request) -> HTMLResponse:
        """``GET /admin``: the operator console (admin role, server-wide), its script inlined (one gated request)."""
        page = (STATIC / "console.html").read_text()
        script = (STATIC / "console.js").read_text().replace("</script", "<\\/script")
        page = page.replace('<script src="console.js"></script>', f"<script>\n{script}</script>")
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def doc(self, request: Request) -> Response:
        """``GET /docs/{name}.md``: the documentation of a source checkout, as Markdown text."""
        name = request.path_params["name"]
        path = DOCS / name
        if not _DOC_NAME.fullmatch(name) or not path.is_file():
            raise HTTPException(404, "no such document")
        return PlainTextResponse(path.read_text(), media_type="text/markdown; charset=utf-8")

    # ------------------------------------------------------------- data

    async def overview(self, request: Request) -> JSONResponse:
        """``GET /api/admin/console``: rooms, locks, forwarding, dead letters and audit in one document.

        Forwarding covers the workspaces open here, those with pending changes
        or dead letters in the store, and ``?watch=ds-1,ds-2`` (their queue,
        dead letters and audit come from the store).
        """
        now = time.time()
        rooms = sorted(self.app.rooms.rooms.values(), key=lambda r: (-len(r.peers), r.workspace_id))[:MAX_ROOMS]
        reports = list(await asyncio.gather(*(self.app.admin.room_report(room.workspace_id) for room in rooms)))
        for report in reports:
            nodes = {self.app.settings.node_id} if report.get("peers") else set()
            for part in report.get("participants") or []:
                nodes.update(part.get("nodes") or [])
            report["nodes"] = sorted(nodes)
        watched = [w for w in request.query_params.get("watch", "").split(",") if w.strip()]
        body: dict[str, Any] = {
            "node": self.app.settings.node_id,
            "version": __version__,
            "now": now,
            "accepting": self.app.accepting,
            "connections": len(self.app.connections),
            "rooms": reports,
            "forwarding": await self._forwarding([r.workspace_id for r in rooms], watched, now),
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def _forwarding(self, open_rooms: list[str], watched: list[str], now: float) -> dict[str, Any]:
        ext = self._extension("forwarding")
        if ext is None or not getattr(ext, "recording", False):
            return {"recording": False, "workspaces": [], "totals": None}
        store = ext.store
        try:
            async with asyncio.timeout(3):
                pending = await store.outbox_workspaces()
                if hasattr(store, "dead_letter_workspaces"):
                    pending += await store.dead_letter_workspaces()
                totals = await store.outbox_totals() if hasattr(store, "outbox_totals") else None
        except Exception as exc:
            return {"recording": True, "error": f"store: {type(exc).__name__}: {exc}", "workspaces": []}
        names = sorted(set(open_rooms) | set(pending) | {w for w in watched if WORKSPACE_ID.fullmatch(w)})

        async def one(workspace: str) -> dict[str, Any]:
            try:
                async with asyncio.timeout(3):
                    status = await ext.status(workspace)
                    oldest = status.get("oldest_pending_at")
                    status["lag_seconds"] = round(now - oldest, 3) if oldest else 0.0
                    status["dead"] = await store.dead_letters(workspace) if status.get("dead_letters") else []
                    status["audit"] = await store.history(workspace, None, AUDIT_ENTRIES)
                    return status
            except Exception as exc:  # one workspace the store cannot answer for: say so, show the rest
                return {"workspace": workspace, "error": f"{type(exc).__name__}: {exc}", "dead": [], "audit": []}

        out = await asyncio.gather(*(one(workspace) for workspace in names[:MAX_ROOMS]))
        return {"recording": True, "workspaces": list(out), "totals": totals}

    def _extension(self, name: str) -> Any:
        for ext in self.app.extensions:
            if getattr(ext, "name", None) == name:
                return ext
        return None
