"""Who is asking: API keys (Bearer), browser sessions (cookie), Origin checks, sign-in routes.

With auth.mode = none every request is the single local user, and the server only
answers to loopback host names (a DNS-rebinding page cannot reach it by another name).
With auth.mode = api_key a request carries `Authorization: Bearer <key>` or the session
cookie that `POST /api/v1/session` sets after checking a key.

Keys and session tokens are 256-bit random strings stored as their SHA-256 only. A slow
password hash (bcrypt, argon2) protects guessable secrets; these cannot be guessed, so a
fast deterministic hash loses nothing, and it makes the lookup one indexed equality query.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from app.errors import ApiError
from app.keys import SERVICE, SETTINGS, STORE
from app.security import cors_preflight
from app.settings import Settings
from app.validate import json_body, parse_session

log = logging.getLogger(__name__)

LOCAL_USER = "local"
COOKIE = "streamchat_session"
KEY_PREFIX = "sc_"
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Answered without credentials in api_key mode: the page and what it needs to sign in.
PUBLIC = frozenset(
    {
        ("GET", "/"),
        ("GET", "/api/v1/healthz"),
        ("GET", "/api/v1/openapi.json"),
        ("POST", "/api/v1/session"),
        ("DELETE", "/api/v1/session"),
        ("GET", "/metrics"),  # guards itself: its own token, else an API key (app/metrics.py)
    }
)
TOUCH_EVERY = 60.0  # seconds between last_used_at writes for one key

routes = web.RouteTableDef()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    user_id: str
    key_id: str | None  # None in mode none
    via: str  # "none" | "bearer" | "cookie"


LOCAL = Principal(LOCAL_USER, None, "none")
PRINCIPAL = web.RequestKey("principal", Principal)


def user_id(request: web.Request) -> str:
    """The id of the user making the request."""
    return principal(request).user_id


def principal(request: web.Request) -> Principal:
    """Who is making the request (the local user in mode none)."""
    found: Principal = request.get(PRINCIPAL, LOCAL)
    return found


def new_api_key() -> str:
    """A fresh API key: `sc_` and 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(value: str) -> str:
    """The SHA-256 hex digest stored in place of a key or session token."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def is_loopback(host: str) -> bool:
    """Whether a bind address or host name only reaches this machine."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_bind_reason(settings: Settings) -> str | None:
    """Why the server must refuse to start (mode none off loopback), or None."""
    if (
        settings.auth.mode == "none"
        and not is_loopback(settings.host)
        and not settings.auth.allow_insecure_none
    ):
        return (
            f"refusing to listen on {settings.host} with auth.mode = none: anyone who can reach "
            "it could use your providers and read every conversation. Set auth.mode = "
            '"api_key" (then create a user and a key: python run.py user create NAME; '
            "python run.py key create NAME), or listen on 127.0.0.1, or set "
            "auth.allow_insecure_none = true if something in front of it does the "
            "authentication."
        )
    return None


# -- origins ------------------------------------------------------------------------------


def origin_allowed(request: web.Request, origin: str) -> bool:
    """The request's own origin (scheme ignored, for TLS proxies) or a configured one."""
    origin = origin.strip().lower().rstrip("/")
    if origin in request.app[SETTINGS].auth.origins:
        return True
    parts = urlsplit(origin)
    return (
        parts.scheme in ("http", "https")
        and bool(parts.netloc)
        and parts.netloc == (request.host or "").lower()
        and not parts.path
    )


def check_origin(request: web.Request, *, required: bool) -> None:
    """403 for a browser request from a foreign origin (CSRF, cross-site WebSocket)."""
    origin = request.headers.get("Origin")
    if origin is None:
        if required:
            raise ApiError(
                403, "bad_origin", "This request needs an Origin header (cross-site refused)."
            )
        return
    if not origin_allowed(request, origin):
        raise ApiError(
            403, "bad_origin", "Requests from this origin are not allowed (cross-site refused)."
        )


def check_ws_origin(request: web.Request) -> None:
    """Refuse a cross-site WebSocket upgrade with 403 (browsers always send Origin)."""
    check_origin(request, required=False)


def _host_name(raw: str) -> str:
    """The name part of a Host header, parsed by hand: yarl raises on malformed ones."""
    raw = raw.strip().lower()
    if raw.startswith("["):
        name, sep, rest = raw[1:].partition("]")
        return name if sep and (not rest or rest.startswith(":")) else ""
    return raw.rsplit(":", 1)[0] if raw.count(":") == 1 else raw


def _check_host(request: web.Request) -> None:
    # Mode none on loopback: a page on evil.example that re-points its DNS name at
    # 127.0.0.1 reaches us with Host: evil.example; answer only to loopback names.
    settings = request.app[SETTINGS]
    if settings.auth.allow_insecure_none or not is_loopback(settings.host):
        return
    host = _host_name(request.host or "")
    if is_loopback(host) or any(
        urlsplit(o).hostname == host.lower() for o in settings.auth.origins
    ):
        return
    raise ApiError(
        403,
        "bad_host",
        "This server answers only to loopback host names (auth.mode = none); add the origin "
        "to auth.origins or use auth.mode = api_key.",
    )


# -- authentication -----------------------------------------------------------------------


def _unauthorized(message: str, *, invalid: bool, clear_cookie: bool = False) -> ApiError:
    challenge = 'Bearer realm="streamchat"' + (', error="invalid_token"' if invalid else "")
    headers = {"WWW-Authenticate": challenge}
    if clear_cookie:
        headers["Set-Cookie"] = f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict"
    return ApiError(401, "unauthorized", message, headers=headers)


async def authenticate(request: web.Request) -> Principal:
    """Check the Bearer key or the session cookie; raise a 401 ApiError otherwise."""
    store = request.app[STORE]
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 200:
            raise _unauthorized(
                "Malformed Authorization header: use 'Authorization: Bearer <key>'.", invalid=True
            )
        row = await store.find_api_key(hash_secret(token))
        if row is None:
            raise _unauthorized("Invalid or revoked API key.", invalid=True)
        if row["last_used_at"] is None or row["last_used_at"] < time.time() - TOUCH_EVERY:
            await store.touch_api_key(row["key_id"])
        return Principal(row["user_id"], row["key_id"], "bearer")
    cookie = request.cookies.get(COOKIE)
    if cookie:
        row = await store.find_session(hash_secret(cookie))
        if row is None:
            raise _unauthorized(
                "Your session has ended; sign in again.", invalid=True, clear_cookie=True
            )
        return Principal(row["user_id"], row["key_id"], "cookie")
    raise _unauthorized(
        "Sign in: send 'Authorization: Bearer <key>' or POST the key to /api/v1/session.",
        invalid=False,
    )


async def still_authorized(request: web.Request) -> bool:
    """Whether the key a long-lived connection (a WebSocket) signed in with is still valid."""
    key_id = principal(request).key_id
    if key_id is None:
        return True
    return await request.app[STORE].api_key_active(key_id)


def _is_public(request: web.Request) -> bool:
    method = "GET" if request.method == "HEAD" else request.method
    return (method, request.path) in PUBLIC or request.path.startswith("/static/")


async def admit(request: web.Request) -> web.StreamResponse | None:
    """Answer a CORS preflight (the response), or set request[PRINCIPAL] and return None;
    raise ApiError 401 / 403 for a missing key or a cross-site state change.

    Called by the request middleware (app/errors.py) before the handler, not as a
    middleware of its own: a streaming request would hold its frame while it streams.
    """
    preflight = cors_preflight(request)  # before auth: browsers send it without credentials
    if preflight is not None:
        return preflight
    settings = request.app[SETTINGS].auth
    if settings.mode == "none":
        _check_host(request)
        if request.method not in SAFE_METHODS:
            check_origin(request, required=False)  # a browser page elsewhere must not act
        request[PRINCIPAL] = LOCAL
        return None
    if _is_public(request):
        return None
    who = await authenticate(request)
    if who.via == "cookie" and request.method not in SAFE_METHODS:
        # The cookie is SameSite=Strict; the Origin check also stops same-site,
        # cross-origin pages (a sibling subdomain) from acting with it.
        check_origin(request, required=True)
    request[PRINCIPAL] = who
    return None


# -- sign-in for the page -----------------------------------------------------------------


@routes.post("/api/v1/session")
async def sign_in(request: web.Request) -> web.Response:
    """Exchange an API key for an HttpOnly, SameSite=Strict session cookie."""
    settings = request.app[SETTINGS].auth
    check_origin(request, required=False)  # no login CSRF
    key = parse_session(await json_body(request))
    if settings.mode == "none":
        return web.json_response({"user_id": LOCAL_USER, "mode": "none", "expires_at": None})
    store = request.app[STORE]
    row = await store.find_api_key(hash_secret(key))
    if row is None:
        raise _unauthorized("Invalid or revoked API key.", invalid=True)
    token = secrets.token_urlsafe(32)
    max_age = int(settings.session_days * 86_400)
    expires_at = time.time() + max_age
    await store.create_session(hash_secret(token), row["key_id"], expires_at)
    log.info("user %s signed in (key %s)", row["user_id"], row["key_id"])
    response = web.json_response(
        {"user_id": row["user_id"], "mode": settings.mode, "expires_at": expires_at}
    )
    response.set_cookie(
        COOKIE,
        token,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure or settings.cookie_secure,
    )
    return response


@routes.get("/api/v1/session")
async def whoami(request: web.Request) -> web.Response:
    """Who the caller is and their limits (401 when not signed in)."""
    uid = user_id(request)
    return web.json_response(
        {
            "user_id": uid,
            "mode": request.app[SETTINGS].auth.mode,
            "via": principal(request).via,
            "limits": request.app[SERVICE].limiter.snapshot(uid),
        }
    )


@routes.delete("/api/v1/session")
async def sign_out(request: web.Request) -> web.Response:
    """End the browser session and clear its cookie (204 even when there was none)."""
    check_origin(request, required=False)
    cookie = request.cookies.get(COOKIE)
    if cookie:
        await request.app[STORE].delete_session(hash_secret(cookie))
    response = web.Response(status=204)
    response.del_cookie(COOKIE, path="/")
    return response
