"""Command line entry: read flags/env/config, configure logging, run the server."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from app.main import create_app
from app.settings import SettingsError, load_settings, parse_args


def main(argv: list[str] | None = None) -> int:
    """Start streamchat; returns the process exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings(cli=vars(args))
    except SettingsError as exc:
        print(f"streamchat: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # the SDKs' HTTP client logs every request at INFO; that is noise here
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    app = create_app(settings, handle_signals=True)
    print(f"streamchat on http://{settings.host}:{settings.port}", flush=True)
    # Our own SIGTERM/SIGINT handlers drain runs first (app/lifecycle.py); aiohttp then
    # waits at most this long for the remaining requests.
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=5.0,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
