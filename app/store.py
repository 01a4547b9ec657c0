"""The one module that owns SQL: conversations and messages in SQLite via aiosqlite."""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

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
    # 2: users, API keys (sha256 only), browser sessions, daily token usage.
    # users.id is the user's name: conversations.user_id holds it, limits are set by it.
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        key_hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        label TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        last_used_at REAL,
        revoked_at REAL
    );
    CREATE INDEX api_keys_user ON api_keys (user_id);
    CREATE TABLE sessions (
        token_hash TEXT PRIMARY KEY,
        key_id TEXT NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX sessions_key ON sessions (key_id);
    CREATE TABLE usage_daily (
        user_id TEXT NOT NULL,
        day TEXT NOT NULL,
        tokens INTEGER NOT NULL,
        PRIMARY KEY (user_id, day)
    );
    """,
]

CONVERSATION_COLUMNS = "id, title, provider, model, system_prompt, created_at, updated_at"
MESSAGE_COLUMNS = (
    "id, conversation_id, role, content, reasoning, status, provider, model, finish_reason, "
    "prompt_tokens, completion_tokens, error_code, error_message, ttft_ms, tokens_per_s, "
    "duration_ms, client_message_id, created_at, updated_at"
)
UPDATABLE_CONVERSATION_FIELDS = ("title", "provider", "model", "system_prompt")
GET_CONVERSATION = f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ? AND user_id = ?"
LIST_MESSAGES = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY created_at, rowid"
)
# a message and every later one of its conversation
DELETE_FROM = (
    "DELETE FROM messages WHERE conversation_id = ? AND rowid >="
    " (SELECT rowid FROM messages WHERE id = ? AND conversation_id = ?)"
)


T = TypeVar("T")
Row = dict[str, Any]


class NothingToAnswer(LookupError):
    """Regenerate found no user message to answer (nothing was written)."""


class ConversationNotFound(LookupError):
    """The conversation does not exist or is not the user's (nothing was written)."""


@dataclass(frozen=True)
class Exchange:
    """What start_exchange found and wrote: the history the new answer answers.

    With `duplicate` set (the client_message_id was sent before) nothing was written
    and only `conversation` is meaningful.
    """

    conversation: Row
    provider: str
    model: str
    user_message_id: str | None
    message_id: str
    history: list[Row]  # the conversation's messages, the new user message last
    duplicate: Row | None = None


def new_id() -> str:
    """A random 32-hex-digit id."""
    return uuid.uuid4().hex


def _row(cursor: aiosqlite.Cursor, row: Sequence[Any]) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}


class Store:
    """All reads and writes of streamchat's database, over one aiosqlite connection.

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

        def insert(c: sqlite3.Connection) -> Row:
            c.execute(
                "INSERT INTO conversations (id, user_id, title, provider, model, system_prompt,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, user_id, title, provider, model, system_prompt, now, now),
            )
            row: Row = c.execute(
                f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?", (cid,)
            ).fetchone()
            return row

        return await self._transaction(insert)

    async def count_conversations(self, user_id: str) -> int:
        """How many conversations a user has."""
        row = await self._one(
            "SELECT COUNT(*) AS n FROM conversations WHERE user_id = ?", (user_id,)
        )
        return int(row["n"]) if row is not None else 0

    async def list_conversations(
        self, user_id: str, *, limit: int, offset: int
    ) -> list[dict[str, Any]]:
        """A page of the user's conversations, most recently updated first."""
        return await self._all(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE user_id = ?"
            " ORDER BY updated_at DESC, rowid DESC LIMIT ? OFFSET ?",
            (user_id, limit, offset),
        )

    async def get_conversation(self, user_id: str, cid: str) -> dict[str, Any] | None:
        """One conversation of the user, or None."""
        return await self._one(GET_CONVERSATION, (cid, user_id))

    async def update_conversation(
        self, user_id: str, cid: str, fields: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Change some of a conversation's fields; None when it does not exist.

        updated_at is the last activity (a message), so renaming does not reorder the list.
        """
        cols = [k for k in fields if k in UPDATABLE_CONVERSATION_FIELDS]

        def update(c: sqlite3.Connection) -> Row | None:
            if cols:
                assignments = ", ".join(f"{col} = ?" for col in cols)
                c.execute(
                    f"UPDATE conversations SET {assignments} WHERE id = ? AND user_id = ?",
                    (*(fields[col] for col in cols), cid, user_id),
                )
            row: Row | None = c.execute(GET_CONVERSATION, (cid, user_id)).fetchone()
            return row

        return await self._transaction(update)

    async def delete_conversation(self, user_id: str, cid: str) -> bool:
        """Delete a conversation and its messages; False when it does not exist."""
        return (
            await self._write(
                "DELETE FROM conversations WHERE id = ? AND user_id = ?", (cid, user_id)
            )
            > 0
        )

    # -- messages --------------------------------------------------------------------

    async def list_messages(self, cid: str) -> list[dict[str, Any]]:
        """A conversation's messages in order."""
        return await self._all(LIST_MESSAGES, (cid,))

    async def get_message(self, user_id: str, cid: str, mid: str) -> dict[str, Any] | None:
        """One message of one of the user's conversations, or None."""
        return await self._one(
            f"SELECT {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))}"
            " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.id = ? AND m.conversation_id = ? AND c.user_id = ?",
            (mid, cid, user_id),
        )

    async def get_user_message(self, user_id: str, mid: str) -> dict[str, Any] | None:
        """A message of any of the user's conversations, by id alone, or None."""
        return await self._one(
            f"SELECT {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))}"
            " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.id = ? AND c.user_id = ?",
            (mid, user_id),
        )

    async def start_exchange(
        self,
        user_id: str,
        conversation: Row | str,
        *,
        content: str | None,
        choose: Callable[[Row], tuple[str, str]],
        client_message_id: str | None = None,
        title: str | None = None,
    ) -> Exchange:
        """Everything a run start reads and writes, in one round trip and one transaction.

        `conversation` is the conversation, or its id: then it is read here, and
        ConversationNotFound raised unless it is the user's. A `client_message_id` sent
        before returns that answer as `duplicate`. `choose(conversation)` picks
        (provider, model) and may raise; it runs on the database thread, so it must only
        read. Then the user message (`content`; None regenerates: the answers after the
        last user message are deleted, NothingToAnswer when there is none) and a
        `streaming` answer are added, and an empty title is set to `title`.
        """
        now = time.time()
        uid = new_id() if content is not None else None
        aid = new_id()

        def write(c: sqlite3.Connection) -> Exchange:
            conv: Row | None
            if isinstance(conversation, str):
                conv = c.execute(GET_CONVERSATION, (conversation, user_id)).fetchone()
                if conv is None:
                    raise ConversationNotFound(conversation)
            else:
                conv = conversation
            cid = conv["id"]
            if client_message_id is not None:
                dup = c.execute(
                    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?"
                    " AND client_message_id = ? AND role = 'assistant'",
                    (cid, client_message_id),
                ).fetchone()
                if dup is not None:
                    return Exchange(conv, "", "", None, "", [], duplicate=dup)
            provider, model = choose(conv)
            history: list[Row] = c.execute(LIST_MESSAGES, (cid,)).fetchall()
            if content is None:
                if not any(m["role"] == "user" for m in history):
                    raise NothingToAnswer(cid)
                cut = len(history)
                while cut and history[cut - 1]["role"] == "assistant":
                    cut -= 1
                if cut < len(history):
                    c.execute(DELETE_FROM, (cid, history[cut]["id"], cid))
                    del history[cut:]
            else:
                c.execute(
                    "INSERT INTO messages (id, conversation_id, role, content, status,"
                    " client_message_id, created_at, updated_at)"
                    " VALUES (?, ?, 'user', ?, 'complete', NULL, ?, ?)",
                    (uid, cid, content, now, now),
                )
                history.append(
                    {"id": uid, "role": "user", "content": content, "status": "complete"}
                )
            c.execute(
                "INSERT INTO messages (id, conversation_id, role, content, status, provider,"
                " model, client_message_id, created_at, updated_at)"
                " VALUES (?, ?, 'assistant', '', 'streaming', ?, ?, ?, ?, ?)",
                (aid, cid, provider, model, client_message_id, now + 1e-6, now + 1e-6),
            )
            c.execute(
                "UPDATE conversations SET updated_at = ?,"
                " title = CASE WHEN title = '' AND ? IS NOT NULL THEN ? ELSE title END"
                " WHERE id = ?",
                (now, title, title, cid),
            )
            return Exchange(conv, provider, model, uid, aid, history)

        return await self._transaction(write)

    async def reopen_message(self, mid: str, provider: str, model: str) -> None:
        """Put a finished assistant message back into `streaming` for a continue run."""
        await self._write(
            "UPDATE messages SET status = 'streaming', provider = ?, model = ?,"
            " error_code = NULL, error_message = NULL, finish_reason = NULL, updated_at = ?"
            " WHERE id = ?",
            (provider, model, time.time(), mid),
        )

    async def delete_messages_from(self, cid: str, mid: str) -> None:
        """Delete a message and every later one of its conversation (regenerate, edit)."""
        await self._write(DELETE_FROM, (cid, mid, cid))

    async def flush_contents(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Save the text so far of live messages: (content, reasoning, message_id) rows."""
        batch = list(rows)
        await self._transaction(
            lambda c: c.executemany(
                "UPDATE messages SET content = ?, reasoning = ?"
                " WHERE id = ? AND status = 'streaming'",
                batch,
            )
        )

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
        provider: str | None = None,
        model: str | None = None,
    ) -> None:
        """Write an assistant message's final state (provider/model: who really answered)."""
        await self._write(
            "UPDATE messages SET content = ?, reasoning = ?, status = ?, finish_reason = ?,"
            " prompt_tokens = ?, completion_tokens = ?, error_code = ?, error_message = ?,"
            " ttft_ms = ?, tokens_per_s = ?, duration_ms = ?,"
            " provider = COALESCE(?, provider), model = COALESCE(?, model), updated_at = ?"
            " WHERE id = ?",
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
                provider,
                model,
                time.time(),
                mid,
            ),
        )

    async def recover_interrupted(self) -> int:
        """Mark messages left `streaming` by a crash as `interrupted`; return how many."""
        return await self._write(
            "UPDATE messages SET status = 'interrupted', error_code = 'interrupted',"
            " error_message = 'The server stopped before this answer was finished.',"
            " updated_at = ? WHERE status = 'streaming'",
            (time.time(),),
        )

    async def integrity_check(self) -> str:
        """SQLite's own integrity check result ('ok' when healthy)."""
        row = await self._one("PRAGMA integrity_check")
        return str(next(iter(row.values()))) if row is not None else "no answer"

    # -- users, API keys, sessions, usage (app/auth.py, app/cli.py, app/limits.py) -------

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


@asynccontextmanager
async def open_admin_store(path: str) -> AsyncIterator[Store]:
    """Open the database for the admin CLI: migrate, but leave live answers alone.

    The server may be running on the same file, so this must not mark its
    streaming messages interrupted as open_store's crash recovery does.
    """
    db = await aiosqlite.connect(path)
    try:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA busy_timeout = 5000")
        await db.execute("PRAGMA foreign_keys = ON")
        store = Store(db)
        await store.migrate()
        yield store
    finally:
        await db.close()


@asynccontextmanager
async def open_store(path: str, busy_timeout: float = 5.0) -> AsyncIterator[Store]:
    """Open the database in WAL mode, migrate it, recover crashed runs, and close it at exit."""
    db = await aiosqlite.connect(path)
    try:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
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
