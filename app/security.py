"""Response headers every answer carries, streaming ones included."""

from __future__ import annotations

from aiohttp import web

from app.keys import SETTINGS

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: CSP without inline script, no sniffing, no referrer, no banner."""
    h = response.headers
    h.setdefault("Content-Security-Policy", CSP)
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("Referrer-Policy", "no-referrer")
    h.setdefault("X-Frame-Options", "DENY")
    h["Server"] = "streamchat"
    origin = request.headers.get("Origin")
    if origin is not None and origin in request.app[SETTINGS].auth.cors_origins:
        h["Access-Control-Allow-Origin"] = origin
        h["Access-Control-Expose-Headers"] = CORS_EXPOSE
    if request.app[SETTINGS].auth.cors_origins:
        h.add("Vary", "Origin")


# CORS is off unless auth.cors_origins lists origins. It is for Bearer clients (a web app
# elsewhere holding its own key): credentials are never allowed cross-origin, so the
# session cookie (SameSite=Strict anyway) is not usable from another origin.
CORS_METHODS = "GET, POST, PATCH, DELETE"
CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID, X-Conversation-Id"
CORS_EXPOSE = "Retry-After, X-Conversation-Id, X-Message-Id"


def cors_preflight(request: web.Request) -> web.Response | None:
    """The answer (204) to a CORS preflight from an allowed origin, else None (go on: 405).

    Called by the auth middleware before it authenticates: browsers send preflights
    without credentials.
    """
    if (
        request.method == "OPTIONS"
        and "Access-Control-Request-Method" in request.headers
        and request.headers.get("Origin") in request.app[SETTINGS].auth.cors_origins
    ):
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS,
                "Access-Control-Max-Age": "600",
            },
        )
    return None
