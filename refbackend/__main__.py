"""``python -m refbackend`` / ``collab-refbackend``: run the reference data-source backend."""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="collab-refbackend", description="reference data-source backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766, help="0 picks a free port")
    parser.add_argument("--db", default="./data/refbackend.sqlite3", help="SQLite file")
    parser.add_argument(
        "--notify-url", default=None, help="change hook: the collaboration server's URL (also PUT /admin/notify)"
    )
    parser.add_argument("--notify-token", default=None, help="bearer token of the change hook (COLLAB_BACKEND_TOKEN)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)

    import uvicorn

    from refbackend.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = uvicorn.Config(
        create_app(args.db, args.notify_url, args.notify_token),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    original = server.startup

    async def startup(sockets=None):
        await original(sockets=sockets)
        for srv in getattr(server, "servers", []):
            for sock in srv.sockets:
                host, port = sock.getsockname()[:2]
                print(f"refbackend listening on http://{host}:{port} (db {args.db})", flush=True)

    server.startup = startup
    server.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
