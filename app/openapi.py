"""The OpenAPI 3.1 document of the HTTP API, served at /api/v1/openapi.json.

Hand-written to match app/validate.py (and views_openai's parser) field for field:
unknown fields are rejected, a null field counts as absent, strings refuse NUL
characters. Limits that come from settings (message length, providers) are filled in
from the running app's configuration.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from app import validate
from app.keys import PROVIDERS, SETTINGS
from app.settings import Settings

routes = web.RouteTableDef()

NO_NUL = "^[^\\u0000]*$"
NOT_BLANK = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"  # some non-space character, no NUL
ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
JSON = "application/json"
SSE = "text/event-stream"
Schema = dict[str, Any]


def _s(max_len: int, *, nullable: bool = True, pattern: str = NO_NUL) -> Schema:
    return {
        "type": ["string", "null"] if nullable else "string",
        "maxLength": max_len,
        "pattern": pattern,
    }


def _num(lo: float, hi: float, *, integer: bool = False) -> Schema:
    return {"type": ["integer" if integer else "number", "null"], "minimum": lo, "maximum": hi}


def _obj(props: Schema, required: tuple[str, ...] = (), **extra: Any) -> Schema:
    out: Schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    out.update(extra)
    return out


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(schema: Schema, *, required: bool = True) -> Schema:
    return {"required": required, "content": {JSON: {"schema": schema}}}


def _json(description: str, schema: Schema | None = None) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema or {}}}}


def _errors(*statuses: int) -> Schema:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


def _sse(description: str) -> Schema:
    return {
        "description": description
        + " Frames are `id: <seq>` and `data: <event JSON>` (start, chunk, reasoning, "
        "status, end, error).",
        "content": {SSE: {"schema": {"type": "string"}}},
    }


CID = {"name": "cid", "in": "path", "required": True, "schema": ID}
MID = {"name": "mid", "in": "path", "required": True, "schema": ID}


def _send_schema(max_content: int, providers: list[str]) -> Schema:
    return _obj(
        {
            "content": _s(max_content, nullable=False, pattern=NOT_BLANK),
            "provider": {**_s(100), "enum": [*providers, None]},
            "model": _s(200),
            "options": _ref("Options"),
            "client_message_id": _s(100),
        },
        ("content",),
    )


def _regenerate_schema(providers: list[str]) -> Schema:
    return _obj(
        {
            "provider": {**_s(100), "enum": [*providers, None]},
            "model": _s(200),
            "options": _ref("Options"),
            "request_id": _s(100),
        }
    )


def _conversation_schema(providers: list[str], *, patch: bool) -> Schema:
    props = {
        "title": _s(validate.MAX_TITLE),
        "provider": {**_s(100), "enum": [*providers, None]},
        "model": _s(200),
        "system_prompt": _s(validate.MAX_SYSTEM),
    }
    if not patch:
        return _obj(props)
    # PATCH needs at least one field that is not null
    any_of = [{"required": [k], "properties": {k: {"type": "string"}}} for k in props]
    return _obj(props, anyOf=any_of)


def _completion_schema() -> Schema:
    part = _obj({"type": {"const": "text"}, "text": {"type": "string"}}, ("type", "text"))
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
    return _obj(
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
            "max_tokens": _num(1, 1_000_000, integer=True),
            "max_completion_tokens": _num(1, 1_000_000, integer=True),
            "temperature": _num(0, 2),
            "top_p": _num(0, 1),
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
            "seed": _num(-(2**63), 2**63 - 1, integer=True),
            "user": {"type": ["string", "null"], "maxLength": 256},
        },
        ("model", "messages"),
    )


def document(settings: Settings, providers: list[str]) -> Schema:
    """The OpenAPI document for this server's settings and available providers."""
    max_content = validate.MAX_CONTENT
    if settings.limits.defaults.max_message_chars:
        max_content = min(max_content, settings.limits.defaults.max_message_chars)
    send = _body(_send_schema(max_content, providers))
    regen = _body(_regenerate_schema(providers), required=False)
    run_errors = _errors(400, 401, 403, 404, 409, 413, 415, 429, 503)
    conv = _ref("Conversation")
    paths: Schema = {
        "/api/v1/healthz": {
            "get": {
                "summary": "Liveness (no auth)",
                "security": [],
                "responses": {"200": _json("OK", {"type": "object"})},
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "summary": "This document (no auth)",
                "security": [],
                "responses": {"200": _json("The OpenAPI document", {"type": "object"})},
            }
        },
        "/api/v1/session": {
            "post": {
                "summary": "Sign in with an API key: sets the session cookie (no auth)",
                "security": [],
                "requestBody": _body(
                    _obj(
                        {"key": _s(validate.MAX_KEY, nullable=False, pattern=NOT_BLANK)},
                        ("key",),
                    )
                ),
                "responses": {
                    "200": _json("Signed in; Set-Cookie: streamchat_session", _ref("Session")),
                    **_errors(400, 401, 403, 413, 415),
                },
            },
            "get": {
                "summary": "Who is signed in, and their limits",
                "responses": {"200": _json("The caller", {"type": "object"}), **_errors(401)},
            },
            "delete": {
                "summary": "Sign out: ends the session and clears the cookie (no auth)",
                "security": [],
                "responses": {"204": {"description": "Signed out"}, **_errors(403)},
            },
        },
        "/api/v1/providers": {
            "get": {
                "summary": "Configured providers, available or not",
                "responses": {"200": _json("Providers", {"type": "object"}), **_errors(401)},
            }
        },
        "/api/v1/conversations": {
            "get": {
                "summary": "The caller's conversations, newest first",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                    },
                    {
                        "name": "offset",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 10**9},
                    },
                ],
                "responses": {
                    "200": _json("A page of conversations", {"type": "object"}),
                    **_errors(400, 401),
                },
            },
            "post": {
                "summary": "Create a conversation",
                "requestBody": _body(_conversation_schema(providers, patch=False)),
                "responses": {
                    "201": _json("Created", conv),
                    **_errors(400, 401, 403, 413, 415),
                },
            },
        },
        "/api/v1/conversations/{cid}": {
            "parameters": [CID],
            "get": {
                "summary": "A conversation with its messages",
                "responses": {"200": _json("The conversation", conv), **_errors(401, 404)},
            },
            "patch": {
                "summary": "Rename, or change provider, model or system prompt",
                "requestBody": _body(_conversation_schema(providers, patch=True)),
                "responses": {
                    "200": _json("Updated", conv),
                    **_errors(400, 401, 403, 404, 413, 415),
                },
            },
            "delete": {
                "summary": "Delete a conversation (cancelling its live answer)",
                "responses": {"204": {"description": "Deleted"}, **_errors(401, 403, 404)},
            },
        },
        "/api/v1/conversations/{cid}/stream": {
            "parameters": [CID],
            "post": {
                "summary": "Send a message and stream the answer (SSE)",
                "requestBody": send,
                "responses": {"200": _sse("The answer's events."), **run_errors},
            },
        },
        "/api/v1/conversations/{cid}/regenerate": {
            "parameters": [CID],
            "post": {
                "summary": "Replace the last answer, streamed (SSE)",
                "requestBody": regen,
                "responses": {"200": _sse("The new answer's events."), **run_errors},
            },
        },
        "/api/v1/conversations/{cid}/messages": {
            "parameters": [CID],
            "post": {
                "summary": "Send a message and wait for the whole answer (no streaming)",
                "requestBody": send,
                "responses": {"200": _json("The answer", {"type": "object"}), **run_errors},
            },
        },
        "/api/v1/conversations/{cid}/messages/{mid}": {
            "parameters": [CID, MID],
            "delete": {
                "summary": "Delete a message and every later one",
                "responses": {"204": {"description": "Deleted"}, **_errors(401, 403, 404, 409)},
            },
        },
        "/api/v1/conversations/{cid}/messages/{mid}/stream": {
            "parameters": [CID, MID],
            "get": {
                "summary": "Resume an answer's events after Last-Event-ID or ?after= (SSE)",
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
                "responses": {"200": _sse("Events after the given seq."), **_errors(400, 401, 404)},
            },
        },
        "/api/v1/conversations/{cid}/messages/{mid}/cancel": {
            "parameters": [CID, MID],
            "post": {
                "summary": "Stop a live answer; returns the message's final state",
                "responses": {
                    "200": _json("The message", {"type": "object"}),
                    **_errors(401, 403, 404),
                },
            },
        },
        "/api/v1/conversations/{cid}/messages/{mid}/continue": {
            "parameters": [CID, MID],
            "post": {
                "summary": "Continue an interrupted, stopped or failed answer (SSE)",
                "requestBody": regen,
                "responses": {"200": _sse("The continuation's events."), **run_errors},
            },
        },
        "/ws": {
            "get": {
                "summary": "WebSocket upgrade (ops: send, cancel, resume, regenerate, continue, "
                "ping); the Origin must be the server's own or in auth.origins",
                "responses": {
                    "101": {"description": "Switching protocols"},
                    **_errors(401, 403, 503),
                },
            }
        },
        "/v1/models": {
            "get": {
                "summary": "OpenAI-compatible model list",
                "responses": {"200": _json("Models", {"type": "object"}), **_errors(401)},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One model (OpenAI-compatible)",
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _json("The model", {"type": "object"}), **_errors(401, 404)},
            }
        },
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI-compatible chat completions, streaming or not",
                "parameters": [
                    {
                        "name": "X-Conversation-Id",
                        "in": "header",
                        "description": "Store the exchange: a conversation id, or `new`.",
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": _body(_completion_schema()),
                "responses": {
                    "200": {
                        "description": "A chat.completion, or chat.completion.chunk SSE frames",
                        "content": {JSON: {"schema": {"type": "object"}}, SSE: {}},
                    },
                    **run_errors,
                },
            }
        },
    }
    if settings.metrics.enabled:
        paths["/metrics"] = {
            "get": {
                "summary": "Prometheus metrics (its own bearer token if metrics.token_env is "
                "set, else an API key in auth.mode = api_key)",
                "security": [{"bearer": []}],
                "responses": {
                    "200": {
                        "description": "Prometheus text format (OpenMetrics if Accept asks)",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(401),
                },
            }
        }
    error_schema = _obj(
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
    responses = {
        f"E{s}": {"description": d, "content": {JSON: {"schema": _ref("Error")}}}
        for s, d in (
            (400, "Bad request"),
            (401, "Unauthorized (WWW-Authenticate: Bearer)"),
            (403, "Forbidden"),
            (404, "Not found"),
            (409, "Conflict"),
            (413, "Too large"),
            (415, "Unsupported media type"),
            (429, "Too many requests (Retry-After header)"),
            (503, "Unavailable"),
        )
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "streamchat",
            "version": "1",
            "description": "Streaming chat API. Authenticate with `Authorization: Bearer <key>` "
            "or the `streamchat_session` cookie from POST /api/v1/session (auth.mode = "
            "api_key); with auth.mode = none no credentials are needed.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"cookie": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "streamchat_session"},
            },
            "schemas": {
                "Options": {
                    "type": ["object", "null"],
                    "properties": {
                        "temperature": _num(0, 2),
                        "max_tokens": {
                            **_num(1, 1_000_000, integer=True),
                            "description": "Above the server's cap it is lowered, and a "
                            "`status` event with state `clamped` says so.",
                        },
                        "top_p": _num(0, 1),
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
                "Error": error_schema,
            },
            "responses": responses,
        },
    }


@routes.get("/api/v1/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document (public: it says nothing secret)."""
    providers = [n for n, p in request.app[PROVIDERS].items() if p.info.available]
    return web.json_response(document(request.app[SETTINGS], providers))
