"""Request body validation: exact fields, types and bounds, with errors naming the field."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from app.errors import ApiError
from app.service import SendRequest
from providers.base import GenerateOptions

ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_CONTENT = 100_000
MAX_TITLE = 200
MAX_SYSTEM = 20_000
MAX_KEY = 200  # API keys are 46 characters; anything longer is not one


def check_id(value: str, what: str = "conversation") -> str:
    """Reject ids that are not ours before they reach SQL (answering 404, like a missing id)."""
    if not ID_RE.match(value):
        raise ApiError(404, "not_found", f"No such {what}.")
    return value


async def json_body(request: web.Request) -> dict[str, Any]:
    """Parse a JSON object body or answer 415/400."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Send the body as application/json.")
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "bad_request", "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "The body must be a JSON object.")
    return body


def _unknown(body: Mapping[str, Any], allowed: set[str], where: str = "") -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        name = f"{where}{extra[0]}"
        raise ApiError(400, "bad_request", f"Unknown field {name!r}.", field=name)


def _str(
    body: Mapping[str, Any],
    key: str,
    *,
    required: bool = False,
    max_len: int,
    allow_empty: bool = True,
) -> str | None:
    if key not in body or body[key] is None:
        if required:
            raise ApiError(400, "bad_request", f"Field {key!r} is required.", field=key)
        return None
    value = body[key]
    if not isinstance(value, str):
        raise ApiError(400, "bad_request", f"Field {key!r} must be a string.", field=key)
    if not allow_empty and not value.strip():
        raise ApiError(400, "bad_request", f"Field {key!r} must not be empty.", field=key)
    if len(value) > max_len:
        raise ApiError(
            400, "bad_request", f"Field {key!r} is longer than {max_len} characters.", field=key
        )
    if "\x00" in value:
        raise ApiError(400, "bad_request", f"Field {key!r} contains a NUL character.", field=key)
    return value


def _number(
    body: Mapping[str, Any],
    key: str,
    lo: float,
    hi: float,
    *,
    integer: bool = False,
    where: str = "",
) -> Any:
    if key not in body or body[key] is None:
        return None
    value = body[key]
    name = f"{where}{key}"
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, "bad_request", f"Field {name!r} must be {kind}.", field=name)
    if not lo <= value <= hi:
        raise ApiError(
            400, "bad_request", f"Field {name!r} must be between {lo:g} and {hi:g}.", field=name
        )
    return value


def parse_options(raw: Any) -> GenerateOptions:
    """Validate the `options` object of a send."""
    if raw is None:
        return GenerateOptions()
    if not isinstance(raw, dict):
        raise ApiError(400, "bad_request", "Field 'options' must be an object.", field="options")
    _unknown(raw, {"temperature", "max_tokens", "top_p"}, "options.")
    return GenerateOptions(
        temperature=_number(raw, "temperature", 0, 2, where="options."),
        max_tokens=_number(raw, "max_tokens", 1, 1_000_000, integer=True, where="options."),
        top_p=_number(raw, "top_p", 0, 1, where="options."),
    )


SEND_FIELDS = {"content", "provider", "model", "options", "client_message_id"}


def parse_send(body: Mapping[str, Any], *, extra_fields: set[str] = frozenset()) -> SendRequest:  # type: ignore[assignment]
    """Validate a send (HTTP body or WebSocket op)."""
    _unknown(body, SEND_FIELDS | extra_fields)
    content = _str(body, "content", required=True, max_len=MAX_CONTENT, allow_empty=False)
    client_id = _str(body, "client_message_id", max_len=100)
    return SendRequest(
        content=content,
        provider=_str(body, "provider", max_len=100),
        model=_str(body, "model", max_len=200),
        options=parse_options(body.get("options")),
        client_message_id=client_id or None,
        request_id=_str(body, "request_id", max_len=100) if "request_id" in extra_fields else None,
    )


def parse_regenerate(body: Mapping[str, Any]) -> SendRequest:
    """Validate a regenerate request: provider, model and options may change."""
    _unknown(body, {"provider", "model", "options", "request_id"})
    return SendRequest(
        content=None,
        provider=_str(body, "provider", max_len=100),
        model=_str(body, "model", max_len=200),
        options=parse_options(body.get("options")),
        request_id=_str(body, "request_id", max_len=100),
    )


def parse_conversation(body: Mapping[str, Any], *, partial: bool) -> dict[str, Any]:
    """Validate a conversation create (partial=False) or PATCH (partial=True)."""
    _unknown(body, {"title", "provider", "model", "system_prompt"})
    out: dict[str, Any] = {}
    for key, max_len in (
        ("title", MAX_TITLE),
        ("provider", 100),
        ("model", 200),
        ("system_prompt", MAX_SYSTEM),
    ):
        value = _str(body, key, max_len=max_len)
        if value is not None:
            out[key] = value
    if partial and not out:
        raise ApiError(
            400, "bad_request", "Nothing to change: give title, provider, model or system_prompt."
        )
    return out


def parse_page(request: web.Request) -> tuple[int, int]:
    """`limit` (1-200, default 50) and `offset` query parameters."""
    out = []
    for key, default, hi in (("limit", 50, 200), ("offset", 0, 10**9)):
        raw = request.query.get(key)
        if raw is None:
            out.append(default)
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ApiError(
                400, "bad_request", f"Query parameter {key!r} must be an integer.", field=key
            ) from None
        if not (0 if key == "offset" else 1) <= value <= hi:
            raise ApiError(
                400, "bad_request", f"Query parameter {key!r} is out of range.", field=key
            )
        out.append(value)
    return out[0], out[1]


def parse_session(body: Mapping[str, Any]) -> str:
    """Validate a sign-in body `{"key": "<API key>"}`; return the key."""
    _unknown(body, {"key"})
    key = _str(body, "key", required=True, max_len=MAX_KEY, allow_empty=False)
    assert key is not None
    return key
