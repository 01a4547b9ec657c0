"""The one module that owns SQL: conversations and messages in SQLite via aiosqlite."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite

log = logging.getLogger(__name__)

MIGRATIONS: list[str] = [
    # 1: conversations and messages
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        title TEXT NOT NULL DEFAULT '',
        provider TEXT,
        model TEXT,
        system_prompt TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX conversations_user_updated ON conversations (user_id, updated_at DESC);
    CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT NOT NULL DEFAULT '',
        reasoning TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL,
        provider TEXT,
        model TEXT,
        finish_reason TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        error_code TEXT,
        error_message TEXT,
        ttft_ms REAL,
        tokens_per_s REAL,
        duration_ms REAL,
        client_message_id TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX messages_conversation ON messages (conversation_id, created_at);
    CREATE INDEX messages_status ON messages (status);
    CREATE UNIQUE INDEX messages_client_id ON messages (conversation_id, client_message_id)
        WHERE client_message_id IS NOT NULL;
    """,
]

CONVERSATION_COLUMNS = "id, title, provider, model, system_prompt, created_at, updated_at"
MESSAGE_COLUMNS = (
    "id, conversation_id, role, content, reasoning, status, provider, model, finish_reason, "
    "prompt_tokens, completion_tokens, error_code, error_message, ttft_ms, tokens_per_s, "
    "duration_ms, client_message_id, created_at, updated_at"
)
UPDATABLE_CONVERSATION_FIELDS = ("title", "provider", "model", "system_prompt")


def new_id() -> str:
    """A random 32-hex-digit id."""
    return uuid.uuid4().hex


def _row(cursor: aiosqlite.Cursor, row: Sequence[Any]) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}


class Store:
    """All reads and writes of streamchat's database, over one aiosqlite connection."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.db.row_factory = _row  # type: ignore[assignment]

    async def migrate(self) -> None:
        """Apply pending schema migrations in order."""
        await self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
        async with self.db.execute("SELECT MAX(version) AS v FROM schema_version") as cur:
            row = await cur.fetchone()
        current = int(row["v"] or 0) if row is not None else 0  # type: ignore[call-overload, index]
        for version, sql in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            await self.db.executescript(
                f"BEGIN; {sql}; INSERT INTO schema_version VALUES ({version}); COMMIT;"
            )
            log.info("database migrated to schema version %d", version)

    # -- conversations ---------------------------------------------------------------

    async def create_conversation(
        self,
        user_id: str,
        *,
        title: str = "",
        provider: str | None = None,
        model: str | None = None,
        system_prompt: str = "",
    ) -> dict[str, Any]:
        """Insert a conversation and return it."""
        now = time.time()
        cid = new_id()
        await self.db.execute(
            "INSERT INTO conversations (id, user_id, title, provider, model, system_prompt,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (cid, user_id, title, provider, model, system_prompt, now, now),
        )
        await self.db.commit()
        conv = await self.get_conversation(user_id, cid)
        assert conv is not None
        return conv

    async def count_conversations(self, user_id: str) -> int:
        """How many conversations a user has."""
        async with self.db.execute(
            "SELECT COUNT(*) AS n FROM conversations WHERE user_id = ?", (user_id,)
        ) as cur:
            row = await cur.fetchone()
        return int(row["n"])  # type: ignore[call-overload, index]

    async def list_conversations(
        self, user_id: str, *, limit: int, offset: int
    ) -> list[dict[str, Any]]:
        """A page of the user's conversations, most recently updated first."""
        async with self.db.execute(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE user_id = ?"
            " ORDER BY updated_at DESC, rowid DESC LIMIT ? OFFSET ?",
            (user_id, limit, offset),
        ) as cur:
            return list(await cur.fetchall())  # type: ignore[arg-type]

    async def get_conversation(self, user_id: str, cid: str) -> dict[str, Any] | None:
        """One conversation of the user, or None."""
        async with self.db.execute(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ? AND user_id = ?",
            (cid, user_id),
        ) as cur:
            return await cur.fetchone()  # type: ignore[return-value]

    async def update_conversation(
        self, user_id: str, cid: str, fields: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Change some of a conversation's fields; None when it does not exist."""
        cols = [k for k in fields if k in UPDATABLE_CONVERSATION_FIELDS]
        if cols:
            assignments = ", ".join(f"{c} = ?" for c in cols)
            cur = await self.db.execute(
                f"UPDATE conversations SET {assignments}, updated_at = ?"
                " WHERE id = ? AND user_id = ?",
                (*(fields[c] for c in cols), time.time(), cid, user_id),
            )
            await self.db.commit()
            if cur.rowcount == 0:
                return None
        return await self.get_conversation(user_id, cid)

    async def delete_conversation(self, user_id: str, cid: str) -> bool:
        """Delete a conversation and its messages; False when it does not exist."""
        cur = await self.db.execute(
            "DELETE FROM conversations WHERE id = ? AND user_id = ?", (cid, user_id)
        )
        await self.db.commit()
        return cur.rowcount > 0

    # -- messages --------------------------------------------------------------------

    async def list_messages(self, cid: str) -> list[dict[str, Any]]:
        """A conversation's messages in order."""
        async with self.db.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?"
            " ORDER BY created_at, rowid",
            (cid,),
        ) as cur:
            return list(await cur.fetchall())  # type: ignore[arg-type]

    async def get_message(self, user_id: str, cid: str, mid: str) -> dict[str, Any] | None:
        """One message of one of the user's conversations, or None."""
        async with self.db.execute(
            f"SELECT {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))}"
            " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.id = ? AND m.conversation_id = ? AND c.user_id = ?",
            (mid, cid, user_id),
        ) as cur:
            return await cur.fetchone()  # type: ignore[return-value]

    async def get_user_message(self, user_id: str, mid: str) -> dict[str, Any] | None:
        """A message of any of the user's conversations, by id alone, or None."""
        async with self.db.execute(
            f"SELECT {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))}"
            " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.id = ? AND c.user_id = ?",
            (mid, user_id),
        ) as cur:
            return await cur.fetchone()  # type: ignore[return-value]

    async def find_by_client_id(self, cid: str, client_message_id: str) -> dict[str, Any] | None:
        """The assistant message answering the user message with this client id."""
        async with self.db.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?"
            " AND client_message_id = ? AND role = 'assistant'",
            (cid, client_message_id),
        ) as cur:
            return await cur.fetchone()  # type: ignore[return-value]

    async def start_exchange(
        self,
        cid: str,
        *,
        content: str | None,
        provider: str,
        model: str,
        client_message_id: str | None = None,
        title: str | None = None,
    ) -> tuple[str | None, str]:
        """Insert the user message (unless None) and a `streaming` assistant message atomically.

        Returns (user_message_id, assistant_message_id).
        """
        now = time.time()
        uid = new_id() if content is not None else None
        aid = new_id()
        try:
            if content is not None:
                await self.db.execute(
                    "INSERT INTO messages (id, conversation_id, role, content, status,"
                    " client_message_id, created_at, updated_at)"
                    " VALUES (?, ?, 'user', ?, 'complete', NULL, ?, ?)",
                    (uid, cid, content, now, now),
                )
            await self.db.execute(
                "INSERT INTO messages (id, conversation_id, role, content, status, provider,"
                " model, client_message_id, created_at, updated_at)"
                " VALUES (?, ?, 'assistant', '', 'streaming', ?, ?, ?, ?, ?)",
                (aid, cid, provider, model, client_message_id, now + 1e-6, now + 1e-6),
            )
            if title:
                await self.db.execute(
                    "UPDATE conversations SET title = ? WHERE id = ? AND title = ''",
                    (title, cid),
                )
            await self.db.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, cid)
            )
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise
        return uid, aid

    async def reopen_message(self, mid: str, provider: str, model: str) -> None:
        """Put a finished assistant message back into `streaming` for a continue run."""
        await self.db.execute(
            "UPDATE messages SET status = 'streaming', provider = ?, model = ?,"
            " error_code = NULL, error_message = NULL, finish_reason = NULL, updated_at = ?"
            " WHERE id = ?",
            (provider, model, time.time(), mid),
        )
        await self.db.commit()

    async def delete_messages_from(self, cid: str, mid: str) -> None:
        """Delete a message and every later one of its conversation (regenerate, edit)."""
        await self.db.execute(
            "DELETE FROM messages WHERE conversation_id = ? AND rowid >="
            " (SELECT rowid FROM messages WHERE id = ? AND conversation_id = ?)",
            (cid, mid, cid),
        )
        await self.db.commit()

    async def flush_contents(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Save the text so far of live messages: (content, reasoning, message_id) rows."""
        await self.db.executemany(
            "UPDATE messages SET content = ?, reasoning = ? WHERE id = ? AND status = 'streaming'",
            rows,
        )
        await self.db.commit()

    async def finish_message(
        self,
        mid: str,
        *,
        content: str,
        reasoning: str,
        status: str,
        finish_reason: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        ttft_ms: float | None = None,
        tokens_per_s: float | None = None,
        duration_ms: float | None = None,
    ) -> None:
        """Write an assistant message's final state."""
        await self.db.execute(
            "UPDATE messages SET content = ?, reasoning = ?, status = ?, finish_reason = ?,"
            " prompt_tokens = ?, completion_tokens = ?, error_code = ?, error_message = ?,"
            " ttft_ms = ?, tokens_per_s = ?, duration_ms = ?, updated_at = ? WHERE id = ?",
            (
                content,
                reasoning,
                status,
                finish_reason,
                prompt_tokens,
                completion_tokens,
                error_code,
                error_message,
                ttft_ms,
                tokens_per_s,
                duration_ms,
                time.time(),
                mid,
            ),
        )
        await self.db.commit()

    async def recover_interrupted(self) -> int:
        """Mark messages left `streaming` by a crash as `interrupted`; return how many."""
        cur = await self.db.execute(
            "UPDATE messages SET status = 'interrupted', error_code = 'interrupted',"
            " error_message = 'The server stopped before this answer was finished.',"
            " updated_at = ? WHERE status = 'streaming'",
            (time.time(),),
        )
        await self.db.commit()
        return cur.rowcount

    async def integrity_check(self) -> str:
        """SQLite's own integrity check result ('ok' when healthy)."""
        async with self.db.execute("PRAGMA integrity_check") as cur:
            row = await cur.fetchone()
        return str(next(iter(row.values())))  # type: ignore[union-attr]


@asynccontextmanager
async def open_store(path: str) -> AsyncIterator[Store]:
    """Open the database in WAL mode, migrate it, recover crashed runs, and close it at exit."""
    db = await aiosqlite.connect(path)
    try:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA busy_timeout = 5000")
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("PRAGMA synchronous = NORMAL")
        store = Store(db)
        await store.migrate()
        recovered = await store.recover_interrupted()
        if recovered:
            log.warning("marked %d unfinished answer(s) as interrupted", recovered)
        yield store
    finally:
        await db.close()
