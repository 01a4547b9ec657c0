"""The one package that owns SQL: conversations and messages in SQLite via aiosqlite.

Split by subject: the schema (schema.py), the connection discipline (base.py), users
and keys (accounts.py), conversations and messages (here). Nothing else writes SQL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiosqlite

from app.store.accounts import AccountQueries
from app.store.base import Row, new_id

__all__ = [
    "ConversationNotFound",
    "Exchange",
    "NothingToAnswer",
    "Store",
    "database_problem",
    "new_id",
    "open_admin_store",
    "open_store",
]

log = logging.getLogger(__name__)

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


def _conversation_row(c: sqlite3.Connection, conversation: Row | str, user_id: str) -> Row:
    """The conversation as given, or read by id (ConversationNotFound unless the user's)."""
    if not isinstance(conversation, str):
        return conversation
    conv: Row | None = c.execute(GET_CONVERSATION, (conversation, user_id)).fetchone()
    if conv is None:
        raise ConversationNotFound(conversation)
    return conv


def _answer_to(c: sqlite3.Connection, cid: str, client_message_id: str | None) -> Row | None:
    """The answer already stored for a send with this client_message_id, if any."""
    if client_message_id is None:
        return None
    row: Row | None = c.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?"
        " AND client_message_id = ? AND role = 'assistant'",
        (cid, client_message_id),
    ).fetchone()
    return row


def _add_user_message(
    c: sqlite3.Connection, cid: str, uid: str, content: str, now: float, history: list[Row]
) -> None:
    """Insert the user's message, and append it to `history`."""
    c.execute(
        "INSERT INTO messages (id, conversation_id, role, content, status,"
        " client_message_id, created_at, updated_at)"
        " VALUES (?, ?, 'user', ?, 'complete', NULL, ?, ?)",
        (uid, cid, content, now, now),
    )
    history.append({"id": uid, "role": "user", "content": content, "status": "complete"})


def _drop_trailing_answers(c: sqlite3.Connection, cid: str, history: list[Row]) -> None:
    """A regenerate: delete the answers after the last user message (NothingToAnswer
    when there is no user message), in the database and in `history`."""
    if not any(m["role"] == "user" for m in history):
        raise NothingToAnswer(cid)
    cut = len(history)
    while cut and history[cut - 1]["role"] == "assistant":
        cut -= 1
    if cut < len(history):
        c.execute(DELETE_FROM, (cid, history[cut]["id"], cid))
        del history[cut:]


class Store(AccountQueries):
    """All reads and writes of streamchat's database (see StoreBase for how)."""

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
            conv = _conversation_row(c, conversation, user_id)
            cid = conv["id"]
            dup = _answer_to(c, cid, client_message_id)
            if dup is not None:
                return Exchange(conv, "", "", None, "", [], duplicate=dup)
            provider, model = choose(conv)
            history: list[Row] = c.execute(LIST_MESSAGES, (cid,)).fetchall()
            if content is None or uid is None:
                _drop_trailing_answers(c, cid, history)
            else:
                _add_user_message(c, cid, uid, content, now, history)
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


def database_problem(path: str) -> str | None:
    """Why the database file cannot be used, or None; checked before the server or an
    admin command starts, so a wrong path is one clear line rather than a traceback."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"cannot open the database {path}: the directory {folder} does not exist"
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=1.0)) as conn:
            conn.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as exc:
        return f"cannot open the database {path}: {exc}"
    return None


@asynccontextmanager
async def open_admin_store(path: str, busy_timeout: float = 5.0) -> AsyncIterator[Store]:
    """Open the database for the admin CLI: migrate, but leave live answers alone.

    The server may be running on the same file, so this must not mark its
    streaming messages interrupted as open_store's crash recovery does.
    """
    db = await aiosqlite.connect(path)
    try:
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        await db.execute("PRAGMA journal_mode = WAL")
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
