"""The app factory: settings in, wired aiohttp application out."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web

from app import lifecycle, views_api, views_sse, views_ws
from app.errors import error_middleware
from app.keys import EXTRA_PROVIDERS, PROVIDERS, SERVICE, SETTINGS, STORE
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


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    service = ChatService(
        app[STORE],
        app[PROVIDERS],
        settings.providers,
        settings.streaming,
        settings.default_provider,
    )
    service.start_background()
    app[SERVICE] = service
    yield
    # Shutdown order: runs end (saving their state) before providers and the DB close,
    # which cleanup_ctx guarantees by unwinding in reverse order.
    await service.close()


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
        middlewares=[error_middleware],
        client_max_size=1024 * 1024,
    )
    app[SETTINGS] = settings
    app.on_response_prepare.append(security_headers)
    if providers:
        app[EXTRA_PROVIDERS] = providers
    # cleanup_ctx order matters: the service needs the store and the providers.
    app.cleanup_ctx.extend([_store_ctx, _providers_ctx, _service_ctx])
    app.on_startup.append(lifecycle.on_startup)
    if handle_signals:
        app.on_startup.append(_signals)
    # on_shutdown runs before aiohttp waits for open requests: drain (for the signal path
    # this already happened) so SSE handlers end and WebSockets close with 1001.
    app.on_shutdown.append(_drain)
    app.router.add_routes(views_api.routes)
    app.router.add_routes(views_sse.routes)
    app.router.add_routes(views_ws.routes)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR, name="static")
    return app
