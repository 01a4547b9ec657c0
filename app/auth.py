"""Who is asking. With auth.mode = none every request is the single local user."""

from __future__ import annotations

from aiohttp import web

LOCAL_USER = "local"


def user_id(request: web.Request) -> str:
    """The id of the user making the request."""
    return str(request.get("user_id", LOCAL_USER))
