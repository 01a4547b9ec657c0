"""Users, API keys, browser sessions and daily usage: the store's queries for them."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from app.store.base import StoreBase, new_id


class AccountQueries(StoreBase):
    """The reads and writes of app/auth.py, app/cli.py and app/limits.py."""

    async def create_user(self, user_id: str) -> bool:
        """Add a user; False when the name is taken."""
        changed = await self._write(
            "INSERT INTO users (id, created_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
            (user_id, time.time()),
        )
        return changed > 0

    async def list_users(self) -> list[dict[str, Any]]:
        """Every user with how many active keys it has."""
        return await self._all(
            "SELECT u.id, u.created_at, COUNT(k.id) AS active_keys FROM users u"
            " LEFT JOIN api_keys k ON k.user_id = u.id AND k.revoked_at IS NULL"
            " GROUP BY u.id ORDER BY u.id"
        )

    async def create_api_key(
        self, user_id: str, key_hash: str, prefix: str, label: str = ""
    ) -> dict[str, Any] | None:
        """Store a new key's hash for an existing user; None when the user does not exist."""
        kid = new_id()
        changed = await self._write(
            "INSERT INTO api_keys (id, user_id, key_hash, prefix, label, created_at)"
            " SELECT ?, id, ?, ?, ?, ? FROM users WHERE id = ?",
            (kid, key_hash, prefix, label, time.time(), user_id),
        )
        if changed == 0:
            return None
        keys = [k for k in await self.list_api_keys(user_id) if k["id"] == kid]
        return keys[0]

    async def list_api_keys(self, user_id: str | None = None) -> list[dict[str, Any]]:
        """Keys (never their hashes), of one user or of all, oldest first."""
        where, params = ("WHERE user_id = ?", (user_id,)) if user_id is not None else ("", ())
        return await self._all(
            "SELECT id, user_id, prefix, label, created_at, last_used_at, revoked_at"
            f" FROM api_keys {where} ORDER BY created_at, rowid",
            params,
        )

    async def revoke_api_key(self, key_id: str) -> bool:
        """Revoke a key and end the browser sessions signed in with it; False if unknown."""

        def revoke(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
            c.execute("DELETE FROM sessions WHERE key_id = ?", (key_id,))
            return cur.rowcount > 0

        return await self._transaction(revoke)

    async def find_api_key(self, key_hash: str) -> dict[str, Any] | None:
        """The active key with this hash: {key_id, user_id, last_used_at}, or None."""
        return await self._one(
            "SELECT id AS key_id, user_id, last_used_at FROM api_keys"
            " WHERE key_hash = ? AND revoked_at IS NULL",
            (key_hash,),
        )

    async def api_key_active(self, key_id: str) -> bool:
        """Whether a key exists and is not revoked."""
        row = await self._one(
            "SELECT 1 AS ok FROM api_keys WHERE id = ? AND revoked_at IS NULL", (key_id,)
        )
        return row is not None

    async def touch_api_key(self, key_id: str) -> None:
        """Record that a key was just used."""
        await self._write(
            "UPDATE api_keys SET last_used_at = ? WHERE id = ?", (time.time(), key_id)
        )

    async def create_session(self, token_hash: str, key_id: str, expires_at: float) -> None:
        """Store a browser session (by its token's hash) and drop expired ones."""
        now = time.time()

        def create(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            c.execute(
                "INSERT INTO sessions (token_hash, key_id, created_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (token_hash, key_id, now, expires_at),
            )

        await self._transaction(create)

    async def find_session(self, token_hash: str) -> dict[str, Any] | None:
        """The unexpired session of an active key: {key_id, user_id}, or None."""
        return await self._one(
            "SELECT s.key_id, k.user_id FROM sessions s JOIN api_keys k ON k.id = s.key_id"
            " WHERE s.token_hash = ? AND s.expires_at > ? AND k.revoked_at IS NULL",
            (token_hash, time.time()),
        )

    async def delete_session(self, token_hash: str) -> None:
        """End a browser session."""
        await self._write("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))

    async def usage_for_day(self, day: str) -> dict[str, int]:
        """Tokens each user has used on a UTC day (YYYY-MM-DD)."""
        rows = await self._all("SELECT user_id, tokens FROM usage_daily WHERE day = ?", (day,))
        return {r["user_id"]: int(r["tokens"]) for r in rows}

    async def add_usage(self, user_id: str, day: str, tokens: int) -> None:
        """Add a finished run's tokens to the user's day (one write per run, not per token)."""
        await self._write(
            "INSERT INTO usage_daily (user_id, day, tokens) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id, day) DO UPDATE SET tokens = tokens + excluded.tokens",
            (user_id, day, tokens),
        )
