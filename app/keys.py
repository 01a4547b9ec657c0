"""Typed application state: every AppKey in one place."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from aiohttp import web

from app.disconnects import DisconnectWatch
from app.metrics import Metrics
from app.service import ChatService
from app.settings import Settings
from app.store import Store
from providers.base import Provider

if TYPE_CHECKING:
    from app.views_ws import Socket

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
PROVIDERS = web.AppKey("providers", dict[str, Provider])
SERVICE = web.AppKey("service", ChatService)
METRICS = web.AppKey("metrics", Metrics)  # the app's own Prometheus registry and hooks
# Open WebSocket connections, so shutdown can deliver final events and close them with 1001
SOCKETS: web.AppKey[weakref.WeakSet[Socket]] = web.AppKey("sockets")
# Open SSE and /v1 streams whose client may leave while nothing is written (app/disconnects.py)
DISCONNECTS = web.AppKey("disconnects", DisconnectWatch)
# Providers injected by the embedding code (tests: scripted fakes), merged over configured ones
EXTRA_PROVIDERS = web.AppKey("extra_providers", dict[str, Provider])
