"""The store's connection discipline: one round trip, one transaction, migrations."""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import aiosqlite

from app.store.schema import MIGRATIONS

log = logging.getLogger("app.store")

T = TypeVar("T")
Row = dict[str, Any]


def new_id() -> str:
    """A random 32-hex-digit id."""
    return uuid.uuid4().hex


def _row(cursor: aiosqlite.Cursor, row: Sequence[Any]) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}


class StoreBase:
    """How every query reaches the database: one aiosqlite connection, one round trip each.

    Every method is one round trip to aiosqlite's database thread, and every write is
    one transaction committed (or rolled back) within it. Round trips, not SQL, are
    what a run start costs under load (each waits for the busy event loop to come round,
    docs/performance.md), and a transaction that spans several awaits on the shared
    connection could take in, commit or roll back another coroutine's statements.
    """

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.db.row_factory = _row  # type: ignore[assignment]

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the database thread: one round trip for any statements.

        aiosqlite has no public way to run a function on its thread; `_execute` is what
        each of its own methods uses (checked with aiosqlite 0.20-0.22, pinned below 0.23).
        """
        conn = self.db._conn
        result: T = await self.db._execute(fn, conn)  # type: ignore[no-untyped-call]
        return result

    async def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` as one transaction: committed when it returns, rolled back if it raises."""

        def work(conn: sqlite3.Connection) -> T:
            try:
                result = fn(conn)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
            return result

        return await self._call(work)

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._call(lambda c: c.execute(sql, params).fetchall())

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = await self._call(lambda c: c.execute(sql, params).fetchone())
        return row

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement in its own transaction; returns the rows it changed."""
        return await self._transaction(lambda c: c.execute(sql, params).rowcount)

    async def migrate(self) -> None:
        """Apply pending schema migrations in order."""
        await self._write("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
        row = await self._one("SELECT MAX(version) AS v FROM schema_version")
        current = int(row["v"] or 0) if row is not None else 0
        for version, sql in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            await self.db.executescript(
                f"BEGIN; {sql}; INSERT INTO schema_version VALUES ({version}); COMMIT;"
            )
            log.info("database migrated to schema version %d", version)

    async def integrity_check(self) -> str:
        """SQLite's own integrity check result ('ok' when healthy)."""
        row = await self._one("PRAGMA integrity_check")
        return str(next(iter(row.values()))) if row is not None else "no answer"
