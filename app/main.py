"""The app factory: settings in, wired aiohttp application out."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web

from app import auth, lifecycle, openapi, views_api, views_openai, views_sse, views_ws
from app.disconnects import DisconnectWatch
from app.errors import request_middleware
from app.keys import DISCONNECTS, EXTRA_PROVIDERS, METRICS, PROVIDERS, SERVICE, SETTINGS, STORE
from app.limits import Limiter
from app.logging_setup import request_id_header
from app.metrics import Metrics, metrics_handler
from app.security import security_headers
from app.service import ChatService
from app.settings import Settings
from app.store import open_store
from providers.base import Provider
from providers.registry import open_providers

log = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_store(app[SETTINGS].db, app[SETTINGS].db_busy_timeout) as store:
        app[STORE] = store
        yield


async def _providers_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_providers(app[SETTINGS], app.get(EXTRA_PROVIDERS)) as providers:
        app[PROVIDERS] = providers
        yield


async def _disconnects_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[DISCONNECTS].close()


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    limiter = Limiter(settings.limits, app[STORE])
    await limiter.load()
    service = ChatService(
        app[STORE],
        app[PROVIDERS],
        settings.providers,
        settings.streaming,
        settings.default_provider,
        limiter,
        metrics=app[METRICS],
    )
    app[METRICS].watch(service.runs, {n: p.info.models for n, p in app[PROVIDERS].items()})
    service.start_background()
    app[SERVICE] = service
    yield
    # Shutdown order: runs end (saving their state) before providers and the DB close,
    # which cleanup_ctx guarantees by unwinding in reverse order.
    await service.close()
    await limiter.close()  # the last runs' token usage is written before the store closes


async def index(request: web.Request) -> web.FileResponse:
    """The bundled chat page."""
    return web.FileResponse(os.path.join(STATIC_DIR, "index.html"))


async def _signals(app: web.Application) -> None:
    lifecycle.install_signal_handlers(app)


async def _drain(app: web.Application) -> None:
    await lifecycle.drain_and_close(app, 0)


def create_app(
    settings: Settings,
    *,
    providers: dict[str, Provider] | None = None,
    handle_signals: bool = False,
) -> web.Application:
    """Build the application. `providers` adds pre-built providers (e.g. scripted fakes)."""
    app = web.Application(
        # One middleware (a streaming request holds its frame while it streams): the
        # request id (every log line of the request carries it, errors' too), then CORS
        # preflights (before auth: browsers send them without credentials), auth and its
        # CSRF/Origin checks (auth.admit), and errors become JSON whatever raised them.
        middlewares=[request_middleware(auth.admit)],
        client_max_size=settings.limits.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()  # per app, not the global registry: tests build many apps
    app[DISCONNECTS] = DisconnectWatch()
    app.on_response_prepare.append(security_headers)
    app.on_response_prepare.append(request_id_header)
    if providers:
        app[EXTRA_PROVIDERS] = providers
    # cleanup_ctx order matters: the service needs the store and the providers.
    app.cleanup_ctx.extend([_store_ctx, _providers_ctx, _service_ctx, _disconnects_ctx])
    app.on_startup.append(lifecycle.on_startup)
    if handle_signals:
        app.on_startup.append(_signals)
    # on_shutdown runs before aiohttp waits for open requests: drain (for the signal path
    # this already happened) so SSE handlers end and WebSockets close with 1001.
    app.on_shutdown.append(_drain)
    app.router.add_routes(views_api.routes)
    app.router.add_routes(views_sse.routes)
    app.router.add_routes(views_ws.routes)
    app.router.add_routes(views_openai.routes)
    app.router.add_routes(auth.routes)
    app.router.add_routes(openapi.routes)
    if settings.metrics.enabled:
        app.router.add_get("/metrics", metrics_handler(app[METRICS], settings))
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR, name="static")
    return app
