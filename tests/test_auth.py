"""Auth: API keys on REST, SSE and WebSocket; cookie sign-in; CSRF; Origin; startup refusal."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sqlite3
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

import run
from app import cli
from app.auth import COOKIE, insecure_bind_reason, new_api_key
from app.keys import STORE
from app.settings import AuthSettings, Settings
from tests.authkit import add_user, api_key_mode, bearer, origin
from tests.fakes import ScriptedProvider, words
from tests.helpers import read_events, text_of

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
async def secured(aiohttp_client: Any, make_app: Any) -> TestClient[Any, Any]:
    """A client of a server in api_key mode."""
    client: TestClient[Any, Any] = await aiohttp_client(make_app(auth=api_key_mode()))
    return client


async def _conversation(client: TestClient[Any, Any], key: str) -> str:
    resp = await client.post("/api/v1/conversations", json={}, headers=bearer(key))
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def _assert_401(resp: aiohttp.ClientResponse, *, invalid: bool) -> None:
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["code"] == "unauthorized"
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="streamchat"')
    assert ('error="invalid_token"' in challenge) is invalid


BAD_HEADERS = [
    ({}, False),  # missing
    ({"Authorization": "Basic YWxpY2U6cHc="}, True),  # another scheme
    ({"Authorization": "Bearer"}, True),  # no key
    ({"Authorization": "Bearer " + "x" * 300}, True),  # too long to be a key
    ({"Authorization": "Bearer sc_not-a-real-key"}, True),  # wrong key
    ({"Authorization": "Bearer " + new_api_key()}, True),  # well-formed, unknown
]


@pytest.mark.parametrize(("headers", "invalid"), BAD_HEADERS)
async def test_bad_credentials_are_401_on_rest_sse_and_ws(
    secured: TestClient[Any, Any], fake: ScriptedProvider, headers: dict[str, str], invalid: bool
) -> None:
    key = await add_user(secured, "alice")
    cid = await _conversation(secured, key)
    mid = "0" * 32
    await _assert_401(await secured.get("/api/v1/conversations", headers=headers), invalid=invalid)
    await _assert_401(
        await secured.post(
            f"/api/v1/conversations/{cid}/stream", json={"content": "hi"}, headers=headers
        ),
        invalid=invalid,
    )
    await _assert_401(
        await secured.get(f"/api/v1/conversations/{cid}/messages/{mid}/stream", headers=headers),
        invalid=invalid,
    )
    await _assert_401(await secured.get("/v1/models", headers=headers), invalid=invalid)
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await secured.ws_connect("/ws", headers=headers)
    assert err.value.status == 401
    assert fake.calls == []  # nothing reached a provider


async def test_valid_key_works_everywhere(secured: TestClient[Any, Any]) -> None:
    key = await add_user(secured, "alice")
    cid = await _conversation(secured, key)
    resp = await secured.post(
        f"/api/v1/conversations/{cid}/stream", json={"content": "hi"}, headers=bearer(key)
    )
    events = await read_events(resp)
    assert text_of(events) == "You said: hi"
    mid = events[0]["message_id"]
    resp = await secured.get(
        f"/api/v1/conversations/{cid}/messages/{mid}/stream", headers=bearer(key)
    )
    assert resp.status == 200
    assert text_of(await read_events(resp)) == "You said: hi"
    ws = await secured.ws_connect("/ws", headers=bearer(key))
    await ws.send_json({"op": "send", "conversation_id": cid, "content": "again"})
    got = []
    while not got or got[-1]["type"] not in ("end", "error"):
        got.append(json.loads((await ws.receive()).data))
    assert got[-1]["type"] == "end" and text_of(got) == "You said: again"
    await ws.close()


async def test_revoked_key_is_refused_and_its_open_socket_closed(
    secured: TestClient[Any, Any],
) -> None:
    key = await add_user(secured, "alice")
    cid = await _conversation(secured, key)
    ws = await secured.ws_connect("/ws", headers=bearer(key))
    (kid,) = [k["id"] for k in await secured.app[STORE].list_api_keys("alice")]
    assert await secured.app[STORE].revoke_api_key(kid)

    await _assert_401(await secured.get("/api/v1/conversations", headers=bearer(key)), invalid=True)
    await _assert_401(
        await secured.post(
            f"/api/v1/conversations/{cid}/stream", json={"content": "x"}, headers=bearer(key)
        ),
        invalid=True,
    )
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await secured.ws_connect("/ws", headers=bearer(key))
    assert err.value.status == 401
    # the socket opened before the revocation is closed with 1008 at its next op
    await ws.send_json({"op": "send", "conversation_id": cid, "content": "x"})
    msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert msg.data == aiohttp.WSCloseCode.POLICY_VIOLATION


async def test_public_endpoints_need_no_key(secured: TestClient[Any, Any]) -> None:
    assert (await secured.get("/api/v1/healthz")).status == 200
    assert (await secured.get("/api/v1/openapi.json")).status == 200
    assert (await secured.get("/")).status == 200


async def test_cookie_sign_in_then_sse_and_ws_and_sign_out(secured: TestClient[Any, Any]) -> None:
    key = await add_user(secured, "alice")
    cid = await _conversation(secured, key)
    secured.session.cookie_jar.clear()

    resp = await secured.post("/api/v1/session", json={"key": "sc_wrong"})
    await _assert_401(resp, invalid=True)
    resp = await secured.post("/api/v1/session", json={"key": key, "remember": True})
    assert resp.status == 400 and (await resp.json())["error"]["field"] == "remember"

    resp = await secured.post("/api/v1/session", json={"key": key})
    assert resp.status == 200
    assert (await resp.json())["user_id"] == "alice"
    set_cookie = resp.headers["Set-Cookie"]
    assert set_cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/" in set_cookie
    assert key not in set_cookie  # the cookie is a session token, not the key

    # the cookie alone now authenticates: reads, EventSource-style resume, WebSocket
    me = await (await secured.get("/api/v1/session")).json()
    assert me["user_id"] == "alice" and me["via"] == "cookie"
    own = {"Origin": origin(secured)}
    resp = await secured.post(
        f"/api/v1/conversations/{cid}/stream", json={"content": "hi"}, headers=own
    )
    events = await read_events(resp)
    mid = events[0]["message_id"]
    resp = await secured.get(f"/api/v1/conversations/{cid}/messages/{mid}/stream?after=1")
    assert resp.status == 200 and text_of(await read_events(resp)) == "You said: hi"
    ws = await secured.ws_connect("/ws", headers=own)
    await ws.send_json({"op": "ping"})
    assert json.loads((await ws.receive()).data) == {"type": "pong"}
    await ws.close()

    token = secured.session.cookie_jar.filter_cookies(secured.make_url("/"))[COOKIE].value
    resp = await secured.delete("/api/v1/session", headers=own)
    assert resp.status == 204
    assert "Max-Age=0" in resp.headers["Set-Cookie"] or "expires" in resp.headers["Set-Cookie"]
    # the old token is dead even if a client kept it
    resp = await secured.get("/api/v1/conversations", cookies={COOKIE: token})
    await _assert_401(resp, invalid=True)


async def test_csrf_from_another_origin_is_refused(secured: TestClient[Any, Any]) -> None:
    key = await add_user(secured, "alice")
    assert (await secured.post("/api/v1/session", json={"key": key})).status == 200
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {}):
        resp = await secured.post("/api/v1/conversations", json={"title": "csrf"}, headers=headers)
        assert resp.status == 403, headers
        assert (await resp.json())["error"]["code"] == "bad_origin"
    # ...and nothing was created; a same-origin request from the page works
    listing = await (await secured.get("/api/v1/conversations")).json()
    assert listing["conversations"] == []
    resp = await secured.post(
        "/api/v1/conversations", json={"title": "ok"}, headers={"Origin": origin(secured)}
    )
    assert resp.status == 201
    # sign-in itself refuses a foreign origin (no login CSRF)
    resp = await secured.post(
        "/api/v1/session", json={"key": key}, headers={"Origin": "https://evil.example"}
    )
    assert resp.status == 403


@pytest.mark.parametrize("mode", ["none", "api_key"])
async def test_cross_site_websocket_upgrade_is_refused(
    aiohttp_client: Any, make_app: Any, mode: str
) -> None:
    client = await aiohttp_client(
        make_app(auth=AuthSettings(mode=mode, origins=("https://chat.example.com",)))
    )
    headers = bearer(await add_user(client, "alice")) if mode == "api_key" else {}
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await client.ws_connect("/ws", headers={**headers, "Origin": "https://evil.example"})
    assert err.value.status == 403
    for allowed in (origin(client), "https://chat.example.com"):
        ws = await client.ws_connect("/ws", headers={**headers, "Origin": allowed})
        await ws.send_json({"op": "ping"})
        assert json.loads((await ws.receive()).data) == {"type": "pong"}
        await ws.close()


async def test_mode_none_refuses_foreign_origins_and_rebound_hosts(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.post(
        "/api/v1/conversations", json={}, headers={"Origin": "https://evil.example"}
    )
    assert resp.status == 403
    # a DNS-rebinding page reaches 127.0.0.1 under its own name
    resp = await client.get("/api/v1/conversations", headers={"Host": "evil.example"})
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "bad_host"
    resp = await client.get("/api/v1/conversations", headers={"Host": f"localhost:{client.port}"})
    assert resp.status == 200
    resp = await client.post("/api/v1/conversations", json={}, headers={"Origin": origin(client)})
    assert resp.status == 201


async def test_cli_keys_are_shown_once_and_stored_hashed(
    aiohttp_client: Any, make_app: Any, db_path: str
) -> None:
    async def admin(*argv: str, out: io.StringIO | None = None) -> int:
        # the CLI runs its own event loop, as it does from the shell
        return await asyncio.to_thread(cli.main, ["--db", db_path, *argv], out or io.StringIO())

    assert await admin("user", "create", "bob") == 0
    assert await admin("user", "create", "bob") == 1
    assert await admin("user", "create", "no spaces") == 2
    assert await admin("key", "create", "nobody") == 1
    out = io.StringIO()
    assert await admin("key", "create", "bob", "--label", "laptop", out=out) == 0
    printed = out.getvalue()
    key = re.search(r"key:\s+(sc_\S+)", printed).group(1)  # type: ignore[union-attr]
    kid = re.search(r"key id:\s+([0-9a-f]{32})", printed).group(1)  # type: ignore[union-attr]

    listing = io.StringIO()
    assert await admin("key", "list", "bob", out=listing) == 0
    assert kid in listing.getvalue() and key not in listing.getvalue()
    with sqlite3.connect(db_path) as db:
        dump = "\n".join(db.iterdump())
    assert key not in dump  # only the sha256 is stored

    client = await aiohttp_client(make_app(auth=api_key_mode()))
    resp = await client.get("/api/v1/session", headers=bearer(key))
    assert resp.status == 200 and (await resp.json())["user_id"] == "bob"
    assert await admin("key", "revoke", kid) == 0
    assert await admin("key", "revoke", kid) == 1
    resp = await client.get("/api/v1/session", headers=bearer(key))
    assert resp.status == 401


def test_a_locked_missing_or_foreign_database_is_one_clear_line(
    db_path: str, tmp_path: Any, capsys: Any
) -> None:
    config = tmp_path / "busy.toml"
    config.write_text("db_busy_timeout = 0.2\n")
    assert cli.main(["--db", db_path, "user", "list"], io.StringIO()) == 0  # creates the schema
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer (the server, a second admin) holds it
    try:
        argv = ["--config", str(config), "--db", db_path, "user", "create", "carol"]
        assert cli.main(argv, io.StringIO()) == 1
        err = capsys.readouterr().err
        assert "stayed locked by another writer for 0.2 s" in err and "nothing was changed" in err
        assert "Traceback" not in err
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    listing = io.StringIO()
    assert cli.main(["--db", db_path, "user", "list"], listing) == 0
    assert "carol" not in listing.getvalue()
    assert cli.main(["--db", db_path, "user", "create", "carol"], io.StringIO()) == 0

    # a wrong path, or a file that is no database, is one line from the CLI and the server
    missing = str(tmp_path / "no-such-dir" / "x.db")
    assert cli.main(["--db", missing, "user", "list"], io.StringIO()) == 1
    assert run.main(["--db", missing, "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"cannot open the database {missing}: the directory") == 2
    junk = tmp_path / "notes.txt"
    junk.write_bytes(b"not a database " * 200)
    assert run.main(["--db", str(junk), "--port", "1"]) == 2
    assert cli.main(["--db", str(junk), "user", "list"], io.StringIO()) == 1
    err = capsys.readouterr().err
    assert err.count("file is not a database") == 2 and "Traceback" not in err


def test_cli_is_chosen_by_its_subcommands() -> None:
    assert cli.is_admin_command(["user", "create", "x"])
    assert cli.is_admin_command(["--db", "x.db", "key", "list"])
    assert not cli.is_admin_command([])
    assert not cli.is_admin_command(["--host", "127.0.0.1", "--port", "8080"])
    assert not cli.is_admin_command(["--db", "user"])


def test_mode_none_refuses_a_non_loopback_host(db_path: str, capsys: Any) -> None:
    assert insecure_bind_reason(Settings(host="127.0.0.1")) is None
    assert insecure_bind_reason(Settings(host="::1")) is None
    assert insecure_bind_reason(Settings(host="localhost")) is None
    assert "auth.mode" in (insecure_bind_reason(Settings(host="0.0.0.0")) or "")
    assert insecure_bind_reason(Settings(host="0.0.0.0", auth=api_key_mode())) is None
    allowed = AuthSettings(allow_insecure_none=True)
    assert insecure_bind_reason(Settings(host="0.0.0.0", auth=allowed)) is None
    # run.py refuses before binding anything
    assert run.main(["--host", "0.0.0.0", "--port", "1", "--db", db_path]) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err


async def test_security_headers_on_json_sse_and_errors(
    secured: TestClient[Any, Any], fake: ScriptedProvider
) -> None:
    key = await add_user(secured, "alice")
    cid = await _conversation(secured, key)
    fake.enqueue(words("ok"))
    responses = [
        await secured.get("/api/v1/conversations", headers=bearer(key)),
        await secured.post(
            f"/api/v1/conversations/{cid}/stream", json={"content": "x"}, headers=bearer(key)
        ),
        await secured.get("/api/v1/conversations"),  # 401
        await secured.get("/"),
    ]
    for resp in responses:
        await resp.read()
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert resp.headers["Server"] == "streamchat"  # no version banner
        assert "Access-Control-Allow-Origin" not in resp.headers  # CORS off by default


async def test_cors_allow_list(aiohttp_client: Any, make_app: Any) -> None:
    app_origin = "https://app.example.com"
    client = await aiohttp_client(make_app(auth=api_key_mode(cors_origins=(app_origin,))))
    key = await add_user(client, "alice")
    preflight = {"Origin": app_origin, "Access-Control-Request-Method": "POST"}
    resp = await client.options("/api/v1/conversations", headers=preflight)
    assert resp.status == 204
    assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
    resp = await client.get("/api/v1/conversations", headers={**bearer(key), "Origin": app_origin})
    assert resp.headers["Access-Control-Allow-Origin"] == app_origin
    assert "Access-Control-Allow-Credentials" not in resp.headers
    # another origin gets no CORS headers, and no preflight answer
    resp = await client.options(
        "/api/v1/conversations", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert resp.status != 204 and "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize("mode", ["none", "api_key"])
async def test_malformed_host_headers_are_refused_not_crashed(
    aiohttp_client: Any, make_app: Any, mode: str
) -> None:
    client = await aiohttp_client(make_app(auth=AuthSettings(mode=mode)))
    for host in (b"", b"[::1", b"a b", b"\xff", b"localhost:abc", b"127.0.0.1:99999", b"%00"):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(
            b"GET /api/v1/conversations HTTP/1.1\r\nHost: "
            + host
            + b"\r\nConnection: close\r\n\r\n"
        )
        status = (await reader.read()).split(b"\r\n", 1)[0]
        writer.close()
        assert status.split()[1] in (b"200", b"400", b"401", b"403"), (host, status)
