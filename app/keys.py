"""Typed application state: every AppKey in one place."""

from __future__ import annotations

from aiohttp import web

from app.service import ChatService
from app.settings import Settings
from app.store import Store
from providers.base import Provider

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
PROVIDERS = web.AppKey("providers", dict[str, Provider])
SERVICE = web.AppKey("service", ChatService)
# Providers injected by the embedding code (tests: scripted fakes), merged over configured ones
EXTRA_PROVIDERS = web.AppKey("extra_providers", dict[str, Provider])
