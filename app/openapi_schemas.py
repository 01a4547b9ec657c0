"""JSON Schemas for the OpenAPI document in app/openapi.py: request bodies and components.

Written to match app/validate.py (and views_openai's parser) field for field: unknown
fields are rejected, a null field counts as absent, strings refuse NUL characters.
"""

from __future__ import annotations

from typing import Any

from app import validate

NO_NUL = "^[^\\u0000]*$"
NOT_BLANK = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"  # some non-space character, no NUL
ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
Schema = dict[str, Any]


def string(max_len: int, *, nullable: bool = True, pattern: str = NO_NUL) -> Schema:
    """A string of at most max_len characters matching pattern (by default also null)."""
    return {
        "type": ["string", "null"] if nullable else "string",
        "maxLength": max_len,
        "pattern": pattern,
    }


def number(lo: float, hi: float, *, integer: bool = False) -> Schema:
    """A number (or integer) between lo and hi, or null."""
    return {"type": ["integer" if integer else "number", "null"], "minimum": lo, "maximum": hi}


def obj(props: Schema, required: tuple[str, ...] = (), **extra: Any) -> Schema:
    """An object with these properties and no others; those in required must be present."""
    out: Schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    out.update(extra)
    return out


def ref(name: str) -> Schema:
    """A reference to the component schema name."""
    return {"$ref": f"#/components/schemas/{name}"}


def session_schema() -> Schema:
    """The body of POST /api/v1/session: an API key."""
    return obj({"key": string(validate.MAX_KEY, nullable=False, pattern=NOT_BLANK)}, ("key",))


def send_schema(max_content: int, providers: list[str]) -> Schema:
    """The body that sends a user message."""
    return obj(
        {
            "content": string(max_content, nullable=False, pattern=NOT_BLANK),
            "provider": {**string(100), "enum": [*providers, None]},
            "model": string(200),
            "options": ref("Options"),
            "client_message_id": string(100),
        },
        ("content",),
    )


def regenerate_schema(providers: list[str]) -> Schema:
    """The optional body of regenerate and continue."""
    return obj(
        {
            "provider": {**string(100), "enum": [*providers, None]},
            "model": string(200),
            "options": ref("Options"),
            "request_id": string(100),
        }
    )


def conversation_schema(providers: list[str], *, patch: bool) -> Schema:
    """The body that creates a conversation, or (patch) changes one."""
    props = {
        "title": string(validate.MAX_TITLE),
        "provider": {**string(100), "enum": [*providers, None]},
        "model": string(200),
        "system_prompt": string(validate.MAX_SYSTEM),
    }
    if not patch:
        return obj(props)
    # PATCH needs at least one field that is not null
    any_of = [{"required": [k], "properties": {k: {"type": "string"}}} for k in props]
    return obj(props, anyOf=any_of)


def completion_schema() -> Schema:
    """The body of the OpenAI-compatible POST /v1/chat/completions."""
    part = obj({"type": {"const": "text"}, "text": {"type": "string"}}, ("type", "text"))
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant"]},
            "content": {
                "anyOf": [
                    {"type": "string", "maxLength": validate.MAX_CONTENT, "pattern": NO_NUL},
                    {"type": "array", "items": part},
                ]
            },
        },
    }
    return obj(
        {
            "model": {"type": "string", "maxLength": 300, "pattern": "\\S"},
            "messages": {"type": "array", "minItems": 1, "maxItems": 1000, "items": message},
            "stream": {"type": ["boolean", "null"]},
            "stream_options": {
                "type": ["object", "null"],
                "properties": {"include_usage": {"type": ["boolean", "null"]}},
                "additionalProperties": False,
                "description": "Only with stream: true.",
            },
            "max_tokens": number(1, 1_000_000, integer=True),
            "max_completion_tokens": number(1, 1_000_000, integer=True),
            "temperature": number(0, 2),
            "top_p": number(0, 1),
            "stop": {
                "anyOf": [
                    {"type": "null"},
                    {"type": "string", "minLength": 1},
                    {
                        "type": "array",
                        "maxItems": 4,
                        "items": {"type": "string", "minLength": 1},
                    },
                ]
            },
            "seed": number(-(2**63), 2**63 - 1, integer=True),
            "user": {"type": ["string", "null"], "maxLength": 256},
        },
        ("model", "messages"),
    )


def error_schema() -> Schema:
    """The body of every error answer."""
    return obj(
        {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": "string"},
                    "retry_after": {"type": "integer"},
                    "limit": {"type": "string"},
                },
            }
        },
        ("error",),
    )


def component_schemas() -> Schema:
    """The named schemas under components.schemas: Options, Conversation, Session, Error."""
    return {
        "Options": {
            "type": ["object", "null"],
            "properties": {
                "temperature": number(0, 2),
                "max_tokens": {
                    **number(1, 1_000_000, integer=True),
                    "description": "Above the server's cap it is lowered, and a "
                    "`status` event with state `clamped` says so.",
                },
                "top_p": number(0, 1),
            },
            "additionalProperties": False,
        },
        "Conversation": {
            "type": "object",
            "required": ["id", "title", "created_at", "updated_at"],
            "properties": {
                "id": ID,
                "title": {"type": "string"},
                "provider": {"type": ["string", "null"]},
                "model": {"type": ["string", "null"]},
                "system_prompt": {"type": "string"},
                "created_at": {"type": "number"},
                "updated_at": {"type": "number"},
            },
        },
        "Session": {
            "type": "object",
            "properties": {
                "user_id": {"type": "string"},
                "mode": {"enum": ["none", "api_key"]},
                "expires_at": {"type": ["number", "null"]},
            },
        },
        "Error": error_schema(),
    }
