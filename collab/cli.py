"""``collab serve``: run the server on uvicorn; ``collab config``: show every setting.

Each flag overrides the matching ``COLLAB_*`` environment variable; anything
not given falls back to the environment, then to the ``--config`` TOML file,
then to the defaults in the settings models (collab/configref.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvicorn
from pydantic import ValidationError

from collab import __version__, configref
from collab.logs import announce
from collab.logs import configure as configure_logging
from collab.security import install_log_redaction
from collab.settings import Settings
from collab.wsserver import CollabWebSocketProtocol
from forwarding.settings import ForwardingSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collab", description="datasource-collab server")
    parser.add_argument("--version", action="version", version=f"datasource-collab {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the collaboration server")
    serve.add_argument("--config", metavar="FILE", help="TOML file of settings (environment variables still win)")
    serve.add_argument("--host", help="interface to listen on (COLLAB_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (COLLAB_PORT, default 8765; 0 picks a free one)")
    serve.add_argument("--data-dir", help="where documents are stored (COLLAB_DATA_DIR, default ./data)")
    serve.add_argument("--log-format", choices=["text", "json"], help="COLLAB_LOG_FORMAT, default text")
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="COLLAB_LOG_LEVEL, default info",
    )
    config = sub.add_parser("config", help="print every setting: variable, type, default, meaning, effective value")
    config.add_argument("--config", metavar="FILE", help="TOML file of settings, as for serve")
    config.add_argument(
        "--markdown", action="store_true", help="print the reference as Markdown (docs/configuration.md), no values"
    )
    config.add_argument(
        "--document-model",
        action="store_true",
        help="print the configuration document's model as Markdown (docs/config-model.md)",
    )
    ready = sub.add_parser(
        "wait-ready", help="wait until /readyz answers 200 (readiness for systemd's ExecStartPost, scripts)"
    )
    ready.add_argument("--config", metavar="FILE", help="TOML file of settings, as for serve (gives host and port)")
    ready.add_argument("--url", help="the /readyz URL (default: from host and port of the settings)")
    ready.add_argument("--timeout", type=float, default=60.0, help="seconds to wait at most (default 60)")
    return parser


def wait_ready(url: str, timeout: float) -> int:
    """Poll ``url`` until it answers 200; 0 then, 1 (with the last answer) after ``timeout``."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(url, timeout=3)
            if reply.status_code == 200:
                return 0
            last = f"HTTP {reply.status_code} {reply.text[:300]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    print(f"collab: {url} not ready after {timeout:g}s: {last}", file=sys.stderr)
    return 1


def load(config_file: str | None, overrides: dict | None = None) -> tuple[Settings, ForwardingSettings]:
    """Both settings models: flags, then the environment, then the file, then defaults.

    Raises ``configref.ConfigFileError`` or pydantic's ``ValidationError``.
    """
    from_file = configref.without_environment(configref.read_toml(config_file)) if config_file else {}
    parts = configref.split(from_file)
    settings = Settings(**{**parts["server"], **(overrides or {})})
    return settings, ForwardingSettings(**parts["forwarding"])


def _invalid(exc: Exception) -> int:
    if isinstance(exc, configref.ConfigFileError):
        print(f"collab: {exc}", file=sys.stderr)
    elif isinstance(exc, ValidationError):
        # Name the fields and the problems, never the values (they may be secrets).
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ())) or "settings"
            print(f"collab: invalid settings: {where}: {error.get('msg')}", file=sys.stderr)
    else:
        print(f"collab: invalid settings: {type(exc).__name__}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "config":
        if args.markdown:
            sys.stdout.write(configref.render_markdown())
            return 0
        if args.document_model:
            from collab import modeldoc

            sys.stdout.write(modeldoc.render(modeldoc.default_model()))
            return 0
        try:
            models = load(args.config)
        except Exception as exc:
            return _invalid(exc)
        sys.stdout.write(configref.render_table(configref.effective_values(list(models))))
        return 0
    if args.command == "wait-ready":
        url = args.url
        if url is None:
            try:
                settings, _ = load(args.config)
            except Exception as exc:
                return _invalid(exc)
            host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
            url = f"http://{host}:{settings.port}/readyz"
        return wait_ready(url, args.timeout)
    if args.command != "serve":
        parser.print_help()
        return 2
    overrides = {
        key: value
        for key, value in {
            "host": args.host,
            "port": args.port,
            "data_dir": args.data_dir,
            "log_level": args.log_level,
            "log_format": args.log_format,
        }.items()
        if value is not None
    }
    try:
        settings, forwarding = load(args.config, overrides)
    except Exception as exc:
        return _invalid(exc)
    return serve(settings, forwarding)


def serve(settings: Settings, forwarding: ForwardingSettings | None = None) -> int:
    from collab.app import create_app, default_extensions

    install_log_redaction()  # uvicorn logs websocket paths with their query string (?token=...)
    configure_logging(settings.log_level, settings.log_format, node=settings.node_id)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings, extensions=default_extensions(settings, forwarding))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # JSON lines: uvicorn's loggers propagate to our root handler instead of their own.
        **({"log_config": None} if settings.log_format == "json" else {}),
        # uvicorn's websockets-sansio protocol plus a synchronous frame write
        # (collab/wsserver.py): a flush writes to every peer without an ASGI send each.
        ws=CollabWebSocketProtocol,
        ws_max_size=settings.max_message_bytes,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        ws_per_message_deflate=settings.per_message_deflate,
        lifespan="on",
        # Client addresses (per-address limits) from X-Forwarded-For, only
        # when the request comes from one of these proxies.
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        access_log=False,
        # Long-lived streams (SSE) must not hold a shutdown forever.
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    server = CollabServer(config, app.state.core, settings.shutdown_timeout)
    _announce_when_started(server, settings)
    try:
        server.run()
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown: exit quietly
        return 130
    return 0


class CollabServer(uvicorn.Server):
    """uvicorn's server, with our connections closed gracefully before its own shutdown."""

    def __init__(self, config: uvicorn.Config, core, timeout: float) -> None:
        super().__init__(config)
        self.core = core
        self.close_timeout = timeout

    async def shutdown(self, sockets=None) -> None:
        for srv in getattr(self, "servers", []):
            srv.close()  # stop accepting first
        await self.core.close_connections(self.close_timeout)
        # Let the closing handshakes finish: closing a socket that still has
        # unread data from the client resets it, and the client loses the
        # close frame (1006 instead of 1012).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(2.0, self.close_timeout)
        while loop.time() < deadline and any(
            getattr(c, "close_sent", False) and not getattr(c, "disconnected", True)
            for c in self.server_state.connections
        ):
            await asyncio.sleep(0.02)
        await super().shutdown(sockets=sockets)


def _announce_when_started(server, settings: Settings) -> None:
    """Print the real address (port 0 picks one) once uvicorn is listening."""
    original = server.startup

    async def startup(sockets=None):
        await original(sockets=sockets)
        for srv in getattr(server, "servers", []):
            for sock in srv.sockets:
                host, port = sock.getsockname()[:2]
                announce(
                    f"datasource-collab {__version__} listening on http://{host}:{port} "
                    f"(websocket ws://{host}:{port}/ws/<workspace>); "
                    f"data in {settings.data_dir.resolve()}",
                    settings.log_format,
                )

    server.startup = startup
