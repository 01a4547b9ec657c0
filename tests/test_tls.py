"""HTTPS from the server itself (`tls_cert` / `tls_key`): the real process, a real
certificate from a test CA (trustme), SSE and WebSocket over TLS, and clear refusals."""

from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp.test_utils import TestServer

from app.settings import AuthSettings, Settings
from app.tls import cleartext_warning
from tests.authkit import add_user, api_key_mode
from tests.proc import PYTHON, ROOT, ServerProcess, upstream_config
from tests.upstreams.openai_slow import SlowUpstream, expected_text, prompt


@pytest.fixture
def ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


def _cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by `ca`, and its key, as PEM files."""
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_the_server_answers_sse_and_websocket_over_https(
    ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = _cert_files(ca, tmp_path)
    trust = _client_context(ca)
    async with SlowUpstream() as up:
        config = f'tls_cert = "{cert}"\ntls_key = "{key}"\n' + upstream_config(up.base_url)
        server = ServerProcess(tmp_path, config, ssl=trust)
        await server.start()
        try:
            assert server.url.startswith("https://")
            assert "streamchat on https://" in server.log_tail()
            connector = aiohttp.TCPConnector(ssl=trust)
            async with aiohttp.ClientSession(server.url, connector=connector) as s:
                cid = (await (await s.post("/api/v1/conversations", json={})).json())["id"]
                resp = await s.post(
                    f"/api/v1/conversations/{cid}/stream", json={"content": prompt("tls", 12, 5)}
                )
                assert resp.status == 200
                events = [
                    json.loads(line[6:])
                    async for line in resp.content
                    if line.startswith(b"data: ")
                ]
                assert "".join(e.get("content", "") for e in events if e["type"] == "chunk") == (
                    expected_text("tls", 12)
                )
                assert events[-1]["status"] == "complete"
                async with s.ws_connect("/ws") as ws:
                    await ws.send_json(
                        {"op": "send", "conversation_id": cid, "content": prompt("wss", 5, 5)}
                    )
                    got = []
                    while not got or got[-1]["type"] not in ("end", "error"):
                        got.append(json.loads((await ws.receive(timeout=10)).data))
                assert got[-1]["status"] == "complete"
            # plain HTTP on the same port is not served
            async with aiohttp.ClientSession() as plain:
                with pytest.raises(aiohttp.ClientError):
                    await plain.get(f"http://127.0.0.1:{server.port}/api/v1/healthz")
            # nor is a client that does not trust the certificate
            async with aiohttp.ClientSession() as untrusting:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await untrusting.get(server.url + "/api/v1/healthz")
        finally:
            server.stop()


def _start_refused(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "streamchat.toml"
    config.write_text(upstream_config("http://127.0.0.1:9/v1"))
    return subprocess.run(
        [str(PYTHON), "run.py", "--config", str(config), "--db", str(tmp_path / "db"), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("cert only", "tls_cert and tls_key go together"),
        ("missing key file", "No such file or directory"),
        ("key is a directory", "Is a directory"),
        ("key of another certificate", "do not make a certificate and its key in PEM"),
        ("not PEM", "do not make a certificate and its key in PEM"),
    ],
)
def test_a_bad_certificate_or_key_refuses_to_start_with_one_line(
    ca: trustme.CA, tmp_path: Path, case: str, message: str
) -> None:
    cert, key = _cert_files(ca, tmp_path)
    other = ca.issue_cert("example.test")
    if case == "cert only":
        flags = ["--tls-cert", str(cert)]
    elif case == "missing key file":
        flags = ["--tls-cert", str(cert), "--tls-key", str(tmp_path / "absent.pem")]
    elif case == "key is a directory":
        flags = ["--tls-cert", str(cert), "--tls-key", str(tmp_path)]
    elif case == "key of another certificate":
        other.private_key_pem.write_to_path(str(key))
        flags = ["--tls-cert", str(cert), "--tls-key", str(key)]
    else:
        key.write_text("not a key\n")
        flags = ["--tls-cert", str(cert), "--tls-key", str(key)]
    done = _start_refused(tmp_path, *flags)
    assert done.returncode == 2, done
    assert message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "db").exists()  # refused before anything was written


async def test_the_session_cookie_is_secure_over_https(
    ca: trustme.CA, aiohttp_client: Any, make_app: Any
) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    server = TestServer(make_app(auth=api_key_mode()), host="127.0.0.1")
    await server.start_server(ssl=server_ctx)
    client = await aiohttp_client(server, connector=aiohttp.TCPConnector(ssl=_client_context(ca)))
    assert str(client.make_url("/")).startswith("https://")
    key = await add_user(client, "alice")
    resp = await client.post("/api/v1/session", json={"key": key})
    assert resp.status == 200
    assert "Secure" in resp.headers["Set-Cookie"]  # without cookie_secure: the request was TLS


def test_api_keys_over_plain_http_on_a_network_address_are_warned_about() -> None:
    team = Settings(host="0.0.0.0", auth=AuthSettings(mode="api_key"))
    warning = cleartext_warning(team)
    assert warning is not None and "unencrypted" in warning and "tls_cert" in warning
    tls = Settings(host="0.0.0.0", auth=team.auth, tls_cert="c.pem", tls_key="k.pem")
    assert cleartext_warning(tls) is None
    assert cleartext_warning(Settings(host="127.0.0.1", auth=team.auth)) is None
    assert cleartext_warning(Settings()) is None  # mode none, loopback
