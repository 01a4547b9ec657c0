"""Fuzzing: generated JSON bodies, headers and WebSocket messages against every endpoint,
and schemathesis against the OpenAPI document. No 500, no traceback, the server stays up,
and SQLite's integrity check passes afterwards."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import requests
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    status_code_conformance,
)

from app.auth import hash_secret, new_api_key
from app.keys import STORE
from app.limits import UNLIMITED
from app.main import create_app
from providers.base import ChatMessage
from tests.authkit import api_key_mode, bearer
from tests.conftest import make_settings
from tests.fakes import ScriptedProvider, Step, words

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FIELDS = [
    "content",
    "provider",
    "model",
    "options",
    "client_message_id",
    "request_id",
    "title",
    "system_prompt",
    "key",
    "temperature",
    "max_tokens",
    "top_p",
    "messages",
    "stream",
    "stream_options",
    "role",
    "conversation_id",
    "message_id",
    "after",
    "op",
]
TRACEBACK_MARKS = ("Traceback", 'File "', "Error:", "sqlite3.")

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.sampled_from(["fake", "fake-1", "", " ", "\x00", "0" * 32, "user", "ping", "send"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# objects shaped like real requests, so the fuzz reaches past "unknown field"
near_valid = st.fixed_dictionaries(
    {"content": st.text(min_size=1, max_size=30)},
    optional={
        "provider": st.sampled_from(["fake", "nope", None]),
        "model": st.sampled_from(["fake-1", "fake-2", "x" * 300]),
        "options": st.fixed_dictionaries(
            {},
            optional={
                "temperature": st.floats(-1, 3) | scalars,
                "max_tokens": st.integers(-5, 2_000_000),
                "top_p": st.floats(-1, 2),
            },
        ),
        "client_message_id": st.text(max_size=8),
        "title": st.text(max_size=20),
        "system_prompt": st.text(max_size=20),
    },
)
bodies = (
    near_valid
    | near_valid
    | st.fixed_dictionaries(
        {},
        optional={
            "content": scalars,
            "provider": scalars,
            "model": scalars,
            "options": json_values,
            "client_message_id": scalars,
            "title": scalars,
            "system_prompt": scalars,
            "key": scalars,
            "messages": json_values,
        },
    )
    | st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5)
    | json_values
)


def _no_traceback(text: str) -> None:
    for mark in TRACEBACK_MARKS:
        assert mark not in text, text[:500]


async def _check(resp: aiohttp.ClientResponse, path: str) -> None:
    text = await resp.text(errors="replace")
    assert resp.status < 500, (resp.status, path, text[:500])
    _no_traceback(text)
    if resp.status >= 400 and resp.content_type == "application/json":
        assert isinstance(json.loads(text)["error"]["message"], str)


@pytest.fixture
async def fuzzed(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> AsyncIterator[dict[str, Any]]:
    """A server in api_key mode with one user; afterwards it must still be healthy."""
    client: TestClient[Any, Any] = await aiohttp_client(
        make_app(auth=api_key_mode(), limits=UNLIMITED)
    )
    store = client.app[STORE]
    key = new_api_key()
    await store.create_user("fuzz")
    await store.create_api_key("fuzz", hash_secret(key), key[:10])
    headers = bearer(key)
    state: dict[str, Any] = {"client": client, "headers": headers}
    await _refresh(state)
    yield state
    assert (await client.get("/api/v1/healthz")).status == 200
    assert await store.integrity_check() == "ok"


async def _refresh(state: dict[str, Any]) -> None:
    """Make sure there is a conversation with an answer to aim at."""
    client, headers = state["client"], state["headers"]
    listing = await (await client.get("/api/v1/conversations", headers=headers)).json()
    if listing["conversations"]:
        cid = listing["conversations"][0]["id"]
    else:
        resp = await client.post("/api/v1/conversations", json={}, headers=headers)
        cid = (await resp.json())["id"]
    conv = await (await client.get(f"/api/v1/conversations/{cid}", headers=headers)).json()
    if not conv["messages"]:
        resp = await client.post(
            f"/api/v1/conversations/{cid}/messages", json={"content": "seed"}, headers=headers
        )
        await resp.read()
        conv = await (await client.get(f"/api/v1/conversations/{cid}", headers=headers)).json()
    state["cid"] = cid
    state["mid"] = conv["messages"][-1]["id"] if conv["messages"] else "0" * 32


# mostly the real ids (to get past 404), sometimes another user's shape of id or junk
JUNK_IDS = ["f" * 32, "0" * 31, "A" * 32, "..", "1' OR '1'='1", "%00", "<mid>", "<cid>"]
cids = st.sampled_from(["<cid>"] * 12 + JUNK_IDS)
mids = st.sampled_from(["<mid>"] * 12 + JUNK_IDS)
ROUTES = [
    ("POST", "/api/v1/conversations"),
    ("GET", "/api/v1/conversations?limit={q}&offset={q}"),
    ("GET", "/api/v1/conversations/{cid}"),
    ("PATCH", "/api/v1/conversations/{cid}"),
    ("DELETE", "/api/v1/conversations/{cid}"),
    ("POST", "/api/v1/conversations/{cid}/stream"),
    ("POST", "/api/v1/conversations/{cid}/messages"),
    ("POST", "/api/v1/conversations/{cid}/regenerate"),
    ("DELETE", "/api/v1/conversations/{cid}/messages/{mid}"),
    ("POST", "/api/v1/conversations/{cid}/messages/{mid}/cancel"),
    ("POST", "/api/v1/conversations/{cid}/messages/{mid}/continue"),
    ("GET", "/api/v1/conversations/{cid}/messages/{mid}/stream?after={q}"),
    ("POST", "/api/v1/session"),
    ("GET", "/api/v1/session"),
    ("DELETE", "/api/v1/session"),
    ("GET", "/api/v1/providers"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models/{q}"),
]


@FUZZ
@given(
    route=st.sampled_from(ROUTES),
    cid=cids,
    mid=mids,
    q=st.text(max_size=12),
    body=bodies,
    raw=st.one_of(st.none(), st.none(), st.none(), st.binary(max_size=64)),  # mostly JSON
    content_type=st.sampled_from(
        ["application/json"] * 4 + ["text/plain", "application/x-www-form-urlencoded"]
    ),
)
async def test_http_endpoints_survive_generated_bodies(
    fuzzed: dict[str, Any],
    route: tuple[str, str],
    cid: str,
    mid: str,
    q: str,
    body: Any,
    raw: bytes | None,
    content_type: str,
) -> None:
    client: TestClient[Any, Any] = fuzzed["client"]
    method, template = route
    real = {"<cid>": fuzzed["cid"], "<mid>": fuzzed["mid"]}
    path = template.format(
        cid=quote(real.get(cid, cid), safe=""),
        mid=quote(real.get(mid, mid), safe=""),
        q=quote(q, safe=""),
    )
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {**fuzzed["headers"], "Content-Type": content_type}
    resp = await client.request(method, path, data=data, headers=headers)
    await _check(resp, path)
    if method == "DELETE":
        await _refresh(fuzzed)


@settings(FUZZ, max_examples=60)
@given(
    authorization=st.none()
    | st.text(max_size=60)
    | st.just("Bearer ").map(lambda b: b + "x" * 250),
    origin=st.none() | st.sampled_from(["null", "https://evil.example", "http://127.0.0.1"]),
    last_event_id=st.none() | st.text(max_size=12),
    cookie=st.none()
    | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
    host=st.none()
    | st.sampled_from(["localhost:abc", "127.0.0.1:99999", "[::1", "evil.example", ""])
    | st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=30),
    with_key=st.booleans(),
)
async def test_headers_survive_generated_values(
    fuzzed: dict[str, Any],
    authorization: str | None,
    origin: str | None,
    last_event_id: str | None,
    cookie: str | None,
    host: str | None,
    with_key: bool,
) -> None:
    client: TestClient[Any, Any] = fuzzed["client"]
    if with_key:  # get past auth, to the views, with the other headers still generated
        authorization = fuzzed["headers"]["Authorization"]
    headers = {
        k: v
        for k, v in (
            ("Host", host),
            ("Authorization", authorization),
            ("Origin", origin),
            ("Last-Event-ID", last_event_id),
            ("Cookie", f"streamchat_session={cookie}" if cookie is not None else None),
        )
        if v is not None and "\n" not in v and "\r" not in v
    }
    path = f"/api/v1/conversations/{fuzzed['cid']}/messages/{fuzzed['mid']}/stream"
    for method, url in (("GET", path), ("POST", "/api/v1/conversations"), ("GET", "/ws")):
        try:
            resp = await client.request(method, url, headers=headers, json={})
        except ValueError:  # a header value aiohttp's client itself refuses to send
            return
        await _check(resp, url)


ws_messages = st.one_of(
    st.fixed_dictionaries(
        {"op": st.sampled_from(["send", "cancel", "resume", "regenerate", "continue", "ping"])},
        optional={
            "conversation_id": cids | scalars,
            "message_id": mids | scalars,
            "content": st.text(max_size=20) | scalars,
            "after": st.integers(-3, 100) | scalars,
            "request_id": scalars,
            "options": json_values,
            "provider": scalars,
        },
    ),
    json_values,
    st.text(max_size=40),
)


@settings(FUZZ, max_examples=60)
@given(messages=st.lists(ws_messages, min_size=1, max_size=4))
async def test_websocket_survives_generated_messages(
    fuzzed: dict[str, Any], messages: list[Any]
) -> None:
    client: TestClient[Any, Any] = fuzzed["client"]
    real = {"<cid>": fuzzed["cid"], "<mid>": fuzzed["mid"]}
    ws = await client.ws_connect("/ws", headers=fuzzed["headers"])
    for msg in messages:
        if isinstance(msg, dict):
            msg = {k: real.get(v, v) if isinstance(v, str) else v for k, v in msg.items()}
            await ws.send_str(json.dumps(msg))
        elif isinstance(msg, str):
            await ws.send_str(msg)
        else:
            await ws.send_str(json.dumps(msg))
    await ws.send_str('{"op":"ping"}')
    while True:  # every answer is a JSON event; the pong comes after all the ops ran
        frame = await ws.receive(timeout=10)
        assert frame.type == aiohttp.WSMsgType.TEXT, frame
        _no_traceback(frame.data)
        event = json.loads(frame.data)
        if event.get("code") == "internal":
            raise AssertionError(event)
        if event["type"] == "pong":
            break
    await ws.close()
    # runs the fuzz started may still be live; let them end before the next example
    for _ in range(100):
        conv = await client.get(f"/api/v1/conversations/{fuzzed['cid']}", headers=fuzzed["headers"])
        if conv.status != 200 or (await conv.json())["live_message_id"] is None:
            break
        await asyncio.sleep(0.01)


# -- schemathesis against the OpenAPI document, on a server in a thread of its own ------


class ShortAnswers(ScriptedProvider):
    """Answers "ok" instead of echoing: generated messages can be 30,000 words long."""

    def _default(self, messages: Sequence[ChatMessage]) -> list[Step]:
        return words("ok")


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The real app on 127.0.0.1 in its own thread and loop (schemathesis calls it with
    requests, synchronously); yields its URL, a key and a real conversation id."""
    db = str(tmp_path_factory.mktemp("schemathesis") / "streamchat.db")
    app = create_app(
        make_settings(db, auth=api_key_mode(), limits=UNLIMITED),
        providers={"fake": ShortAnswers()},
    )
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    key = new_api_key()

    async def start() -> str:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        store = app[STORE]
        await store.create_user("st")
        await store.create_api_key("st", hash_secret(key), key[:10])
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    url = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cid = requests.post(f"{url}/api/v1/conversations", json={}, headers=bearer(key), timeout=5)
    yield {"url": url, "key": key, "cid": cid.json()["id"]}
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
    integrity = asyncio.run_coroutine_threadsafe(app_integrity(db), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()
    assert integrity == "ok"


async def app_integrity(db: str) -> str:
    """PRAGMA integrity_check on a closed server's database."""
    import aiosqlite

    async with aiosqlite.connect(db) as conn, conn.execute("PRAGMA integrity_check") as cur:
        row = await cur.fetchone()
    return str(row[0]) if row else "missing"


def _exercise(operation: Any, mode: Any, live: dict[str, str]) -> None:
    """Run one operation's generated cases in one generation mode."""
    url, headers = live["url"], bearer(live["key"])
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    if mode == schemathesis.GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)  # what the document forbids, the server refuses

    examples = 10 if mode == schemathesis.GenerationMode.POSITIVE else 6
    if operation.path == "/v1/chat/completions":
        examples //= 2  # its nested messages take Hypothesis seconds to generate

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), real_id=st.booleans())
    def run(case: Any, real_id: bool) -> None:
        send = dict(headers)
        if mode == schemathesis.GenerationMode.NEGATIVE:
            if "Authorization" in (case.headers or {}):
                send = {}  # the generated (invalid) credentials are the point
        elif real_id and case.path_parameters and "cid" in case.path_parameters:
            case.path_parameters["cid"] = live["cid"]
        response = case.call(base_url=url, headers=send, timeout=10)
        case.validate_response(response, checks=checks)
        _no_traceback(response.text)

    run()


def test_openapi_document_holds_against_the_server(live_server: dict[str, str]) -> None:
    url = live_server["url"]
    raw = requests.get(f"{url}/api/v1/openapi.json", timeout=5).json()
    schema = schemathesis.openapi.from_dict(raw)
    tested = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/ws":
            continue  # the upgrade is fuzzed above, over a real WebSocket
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                _exercise(operation, mode, live_server)
            except Unsatisfiable:
                # nothing to get wrong: no parameters and no body
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
                continue
            tested += 1
    assert tested >= 25  # every documented operation, most of them both ways
    assert requests.get(f"{url}/api/v1/healthz", timeout=5).status_code == 200


async def test_openapi_covers_every_route(client: TestClient[Any, Any]) -> None:
    doc = await (await client.get("/api/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    documented = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    routed = set()
    for route in client.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD" or path in ("/", "/static"):
            continue  # the page and its files are not API
        routed.add((route.method, path))
    assert routed - documented == set(), "routes missing from app/openapi.py"
    assert documented - routed == set(), "documented operations with no route"
