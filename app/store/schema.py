"""The database schema: migrations, applied in order by the store (app/store/base.py)."""

from __future__ import annotations

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
