"""Command line entry: read flags/env/config, configure logging, run the server."""

from __future__ import annotations

import gc
import logging
import resource
import sys

from aiohttp import web

from app import cli
from app.auth import insecure_bind_reason
from app.logging_setup import configure_logging
from app.main import create_app
from app.settings import SettingsError
from app.settings_load import load_settings, parse_args
from app.store import database_problem
from app.tls import cleartext_warning, server_context

GC_THRESHOLDS = (10_000, 10, 10)  # CPython's defaults are (700, 10, 10)


async def _tune_gc(app: web.Application) -> None:
    """Once everything is loaded, exempt it from garbage collection and collect less often.

    Modules, the SDKs' classes and the settings are hundreds of thousands of objects that
    live as long as the process: frozen, no collection walks them again. Each open stream
    holds a few hundred more; with CPython's default thresholds, thousands of streams
    opening at once set off full collections (measured: 6 in 30 s, up to 0.6 s each, at
    3,000 streams, docs/performance.md). Streams free their objects by reference
    counting, so collecting young objects every 10,000 allocations instead of 700 leaves
    only the rare reference cycle waiting. The older generations keep CPython's ratios:
    collecting them less often let a 10-minute soak (`make soak`) grow 12%.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one; return the limit in force.

    Every relayed stream holds two sockets (the client's and the provider's), and many
    systems start processes with a soft limit of 1,024: about 500 streams. The hard limit
    is the administrator's ceiling; going up to it needs no privilege.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # an unlimited hard limit: the kernel's usual ceiling for one process (fs.nr_open)
    ceiling = 1_048_576 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        except (ValueError, OSError):
            pass
    return soft


def main(argv: list[str] | None = None) -> int:
    """Start streamchat (or run an admin command); returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if cli.is_admin_command(argv):  # run.py user create NAME, run.py key create USER, ...
        return cli.main(argv)
    args = parse_args(argv)
    try:
        settings = load_settings(cli=vars(args))
    except SettingsError as exc:
        print(f"streamchat: {exc}", file=sys.stderr)
        return 2
    refusal = insecure_bind_reason(settings)
    ssl_context = None
    if refusal is None:
        try:
            ssl_context = server_context(settings)
        except SettingsError as exc:
            refusal = str(exc)
    refusal = refusal or database_problem(settings.db)  # (this opens the database file)
    if refusal:
        print(f"streamchat: {refusal}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    cleartext = cleartext_warning(settings)
    if cleartext:
        logging.getLogger("streamchat").warning("%s", cleartext)
    # the SDKs' HTTP client logs every request at INFO; that is noise here
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    open_files = _raise_open_files_limit()
    logging.getLogger("streamchat").info(
        "open files limit %d: room for about %d concurrent streams", open_files, open_files // 2
    )
    app = create_app(settings, handle_signals=True)
    app.on_startup.append(_tune_gc)
    scheme = "https" if ssl_context else "http"
    print(f"streamchat on {scheme}://{settings.host}:{settings.port}", flush=True)
    # Our own SIGTERM/SIGINT handlers drain runs first (app/lifecycle.py); aiohttp then
    # waits at most this long for the remaining requests.
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        ssl_context=ssl_context,
        print=None,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=5.0,
        # aiohttp's default accept queue (128) overflows when thousands of clients
        # (re)connect at once; the kernel caps this at net.core.somaxconn
        backlog=4096,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
