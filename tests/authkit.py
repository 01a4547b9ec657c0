"""Helpers for tests of auth, isolation and limits: users and keys in the real store."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from app.auth import hash_secret, new_api_key
from app.keys import STORE
from app.settings import AuthSettings, LimitsSettings, UserLimits


async def add_user(client: TestClient[Any, Any], name: str) -> str:
    """Create a user with one API key in the app's own database; return the key."""
    store = client.app[STORE]
    assert await store.create_user(name)
    key = new_api_key()
    assert await store.create_api_key(name, hash_secret(key), key[:10]) is not None
    return key


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for a key."""
    return {"Authorization": f"Bearer {key}"}


def api_key_mode(**auth: Any) -> AuthSettings:
    """Auth settings with mode api_key."""
    return AuthSettings(mode="api_key", **auth)


def limits(users: dict[str, dict[str, Any]] | None = None, **defaults: Any) -> LimitsSettings:
    """Limits with some per-user defaults (and per-user overrides) changed."""
    global_keys = {"max_body_bytes", "ws_max_message_bytes"}
    glob = {k: v for k, v in defaults.items() if k in global_keys}
    base = UserLimits(**{k: v for k, v in defaults.items() if k not in global_keys})
    per_user = {
        name: UserLimits(**{**base.__dict__, **values}) for name, values in (users or {}).items()
    }
    return LimitsSettings(defaults=base, users=per_user, **glob)


def origin(client: TestClient[Any, Any]) -> str:
    """The test server's own origin, as a browser page served by it would send."""
    return f"http://127.0.0.1:{client.port}"
