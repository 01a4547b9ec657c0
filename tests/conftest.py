"""Shared fixtures: settings on a temp database, a scripted fake provider, a test client."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from app.main import create_app
from app.settings import LocalSettings, ProviderSettings, Settings, StreamingSettings
from tests.fakes import ScriptedProvider


def make_settings(db: str, **overrides: Any) -> Settings:
    """Settings for tests: a temp DB, no local model, a `fake` default provider."""
    streaming = overrides.pop("streaming", {})
    providers = {
        "fake": ProviderSettings(
            name="fake",
            kind="fake",
            models=("fake-1", "fake-2"),
            default_model="fake-1",
            retries=0,
        )
    }
    providers.update(overrides.pop("providers", {}))
    return Settings(
        db=db,
        default_provider=overrides.pop("default_provider", "fake"),
        streaming=dataclasses.replace(StreamingSettings(), **streaming),
        local=overrides.pop("local", LocalSettings(enabled=False)),
        providers=providers,
        **overrides,
    )


@pytest.fixture
def db_path(tmp_path: Any) -> str:
    """A fresh SQLite file per test."""
    return str(tmp_path / "streamchat.db")


@pytest.fixture
def fake() -> ScriptedProvider:
    """The scripted fake provider named `fake`."""
    return ScriptedProvider()


@pytest.fixture
def make_app(db_path: str, fake: ScriptedProvider) -> Callable[..., web.Application]:
    """Build an app on the temp DB with the fake provider (and any other providers)."""

    def factory(
        providers: dict[str, Any] | None = None,
        provider_settings: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> web.Application:
        if provider_settings:
            overrides["providers"] = provider_settings
        settings = make_settings(db_path, **overrides)
        return create_app(settings, providers={"fake": fake, **(providers or {})})

    return factory


@pytest.fixture
async def client(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[Any, Any]]],
    make_app: Callable[..., web.Application],
) -> TestClient[Any, Any]:
    """A test client on a real loopback server with default test settings."""
    return await aiohttp_client(make_app())
