"""Admin commands: `run.py user create|list`, `run.py key create|revoke|list`.

They open the same SQLite file as the server (safe while it runs: WAL, busy timeout) and
never touch its live answers. A key is printed once, when created; only its SHA-256 is
stored (see app/auth.py for why that hash).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from app.auth import USER_RE, hash_secret, new_api_key
from app.settings import SettingsError
from app.settings_load import load_settings
from app.store import Store, database_problem, open_admin_store

COMMANDS = ("user", "key")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description="streamchat users and API keys")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--db", help="SQLite database path")
    groups = parser.add_subparsers(dest="group", required=True)
    user = groups.add_parser("user", help="users").add_subparsers(dest="command", required=True)
    create = user.add_parser("create", help="add a user")
    create.add_argument("name")
    user.add_parser("list", help="list users")
    key = groups.add_parser("key", help="API keys").add_subparsers(dest="command", required=True)
    kc = key.add_parser("create", help="create a key for a user (shown once)")
    kc.add_argument("user")
    kc.add_argument("--label", default="", help="what the key is for")
    kr = key.add_parser("revoke", help="revoke a key (and its browser sessions)")
    kr.add_argument("key_id")
    kl = key.add_parser("list", help="list keys (never the keys themselves)")
    kl.add_argument("user", nargs="?")
    return parser


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


async def _run(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if args.group == "user" and args.command == "create":
        if not USER_RE.match(args.name):
            print("streamchat: a user name is 1-64 of A-Z a-z 0-9 _ . @ -", file=sys.stderr)
            return 2
        if not await store.create_user(args.name):
            print(f"streamchat: user {args.name!r} already exists", file=sys.stderr)
            return 1
        print(f"created user {args.name}", file=out)
        return 0
    if args.group == "user":
        for u in await store.list_users():
            since = _when(u["created_at"])
            print(f"{u['id']}\t{u['active_keys']} active key(s)\tsince {since}", file=out)
        return 0
    if args.command == "create":
        key = new_api_key()
        row = await store.create_api_key(args.user, hash_secret(key), key[:10], args.label)
        if row is None:
            print(f"streamchat: no user {args.user!r} (run.py user create)", file=sys.stderr)
            return 1
        print(f"key id: {row['id']}", file=out)
        print(f"key:    {key}", file=out)
        print("This is the only time the key is shown; store it now.", file=out)
        return 0
    if args.command == "revoke":
        if not await store.revoke_api_key(args.key_id):
            print(f"streamchat: no active key {args.key_id!r}", file=sys.stderr)
            return 1
        print(f"revoked key {args.key_id}", file=out)
        return 0
    keys: list[dict[str, Any]] = await store.list_api_keys(args.user)
    for k in keys:
        state = f"revoked {_when(k['revoked_at'])}" if k["revoked_at"] else "active"
        print(
            f"{k['id']}\t{k['user_id']}\t{k['prefix']}...\t{state}\t"
            f"created {_when(k['created_at'])}\tlast used {_when(k['last_used_at'])}"
            + (f"\t{k['label']}" if k["label"] else ""),
            file=out,
        )
    return 0


async def _main(db: str, busy_timeout: float, args: argparse.Namespace, out: TextIO) -> int:
    async with open_admin_store(db, busy_timeout) as store:
        return await _run(store, args, out)


def _storage_error(exc: sqlite3.Error, db: str, busy_timeout: float) -> str:
    """What to tell the admin when SQLite refused; each command is one transaction, so
    nothing was written (and no key was shown)."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return (
            f"the database {db} stayed locked by another writer for {busy_timeout:g} s"
            " (db_busy_timeout); nothing was changed, try again"
        )
    return f"cannot use the database {db}: {text}; nothing was changed"


def main(argv: Sequence[str], out: TextIO = sys.stdout) -> int:
    """Run one admin command; returns the process exit code."""
    args = _parser().parse_args(list(argv))
    try:
        settings = load_settings(cli={"config": args.config, "db": args.db})
    except SettingsError as exc:
        print(f"streamchat: {exc}", file=sys.stderr)
        return 2
    problem = database_problem(settings.db)
    if problem:
        print(f"streamchat: {problem}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_main(settings.db, settings.db_busy_timeout, args, out))
    except sqlite3.Error as exc:
        print(
            f"streamchat: {_storage_error(exc, settings.db, settings.db_busy_timeout)}",
            file=sys.stderr,
        )
        return 1


def is_admin_command(argv: Sequence[str]) -> bool:
    """Whether argv asks for an admin command (`user ...`, `key ...`) rather than the server."""
    it = iter(argv)
    for token in it:
        if token in ("--db", "--config"):
            next(it, None)
        elif not token.startswith("-"):
            return token in COMMANDS
    return False
