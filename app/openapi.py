"""The OpenAPI 3.1 document of the HTTP API, served at /api/v1/openapi.json.

Hand-written to match app/validate.py (and views_openai's parser) field for field:
unknown fields are rejected, a null field counts as absent, strings refuse NUL
characters. Limits that come from settings (message length, providers) are filled in
from the running app's configuration. The JSON Schemas live in app/openapi_schemas.py.
"""

from __future__ import annotations

from aiohttp import web

from app import validate
from app.keys import PROVIDERS, SETTINGS
from app.openapi_schemas import (
    ID,
    Schema,
    completion_schema,
    component_schemas,
    conversation_schema,
    ref,
    regenerate_schema,
    send_schema,
    session_schema,
)
from app.settings import Settings

routes = web.RouteTableDef()

JSON = "application/json"
SSE = "text/event-stream"
CID = {"name": "cid", "in": "path", "required": True, "schema": ID}
MID = {"name": "mid", "in": "path", "required": True, "schema": ID}
RUN_ERRORS = (400, 401, 403, 404, 409, 413, 415, 429, 503)  # what starting an answer may answer


def _body(schema: Schema, *, required: bool = True) -> Schema:
    """A JSON request body with this schema."""
    return {"required": required, "content": {JSON: {"schema": schema}}}


def _json(description: str, schema: Schema | None = None) -> Schema:
    """A JSON response with this schema (any JSON when None)."""
    return {"description": description, "content": {JSON: {"schema": schema or {}}}}


def _errors(*statuses: int) -> Schema:
    """Responses for these error statuses, each a reference to components.responses."""
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


def _sse(description: str) -> Schema:
    """A text/event-stream response carrying an answer's events."""
    return {
        "description": description
        + " Frames are `id: <seq>` and `data: <event JSON>` (start, chunk, reasoning, "
        "status, end, error).",
        "content": {SSE: {"schema": {"type": "string"}}},
    }


def _public_paths() -> Schema:
    """Liveness and this document, both without auth."""
    return {
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
    }


def _session_paths() -> Schema:
    """Sign in with an API key, ask who is signed in, sign out."""
    return {
        "/api/v1/session": {
            "post": {
                "summary": "Sign in with an API key: sets the session cookie (no auth)",
                "security": [],
                "requestBody": _body(session_schema()),
                "responses": {
                    "200": _json("Signed in; Set-Cookie: streamchat_session", ref("Session")),
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
    }


def _provider_paths() -> Schema:
    """The list of configured providers."""
    return {
        "/api/v1/providers": {
            "get": {
                "summary": "Configured providers, available or not",
                "responses": {"200": _json("Providers", {"type": "object"}), **_errors(401)},
            }
        },
    }


def _conversation_paths(providers: list[str]) -> Schema:
    """List, create, read, change and delete conversations."""
    conv = ref("Conversation")
    limit = {"type": "integer", "minimum": 1, "maximum": 200}
    offset = {"type": "integer", "minimum": 0, "maximum": 10**9}
    page = [
        {"name": "limit", "in": "query", "schema": limit},
        {"name": "offset", "in": "query", "schema": offset},
    ]
    return {
        "/api/v1/conversations": {
            "get": {
                "summary": "The caller's conversations, newest first",
                "parameters": page,
                "responses": {
                    "200": _json("A page of conversations", {"type": "object"}),
                    **_errors(400, 401),
                },
            },
            "post": {
                "summary": "Create a conversation",
                "requestBody": _body(conversation_schema(providers, patch=False)),
                "responses": {"201": _json("Created", conv), **_errors(400, 401, 403, 413, 415)},
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
                "requestBody": _body(conversation_schema(providers, patch=True)),
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
    }


def _answer_paths(send: Schema, regen: Schema) -> Schema:
    """Start an answer in a conversation: send (streamed or not) or regenerate."""
    return {
        "/api/v1/conversations/{cid}/stream": {
            "parameters": [CID],
            "post": {
                "summary": "Send a message and stream the answer (SSE)",
                "requestBody": send,
                "responses": {"200": _sse("The answer's events."), **_errors(*RUN_ERRORS)},
            },
        },
        "/api/v1/conversations/{cid}/regenerate": {
            "parameters": [CID],
            "post": {
                "summary": "Replace the last answer, streamed (SSE)",
                "requestBody": regen,
                "responses": {"200": _sse("The new answer's events."), **_errors(*RUN_ERRORS)},
            },
        },
        "/api/v1/conversations/{cid}/messages": {
            "parameters": [CID],
            "post": {
                "summary": "Send a message and wait for the whole answer (no streaming)",
                "requestBody": send,
                "responses": {
                    "200": _json("The answer", {"type": "object"}),
                    **_errors(*RUN_ERRORS),
                },
            },
        },
    }


def _message_paths(regen: Schema) -> Schema:
    """One message: delete it, resume its events, cancel it, continue it."""
    after = [
        {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer", "minimum": 0}},
    ]
    return {
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
                "parameters": after,
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
                "responses": {"200": _sse("The continuation's events."), **_errors(*RUN_ERRORS)},
            },
        },
    }


def _websocket_paths() -> Schema:
    """The WebSocket upgrade at /ws."""
    return {
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
    }


def _openai_paths() -> Schema:
    """The OpenAI-compatible endpoints under /v1: models and chat completions."""
    model = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    conversation = {
        "name": "X-Conversation-Id",
        "in": "header",
        "description": "Store the exchange: a conversation id, or `new`.",
        "schema": {"type": "string"},
    }
    return {
        "/v1/models": {
            "get": {
                "summary": "OpenAI-compatible model list",
                "responses": {"200": _json("Models", {"type": "object"}), **_errors(401)},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One model (OpenAI-compatible)",
                "parameters": [model],
                "responses": {"200": _json("The model", {"type": "object"}), **_errors(401, 404)},
            }
        },
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI-compatible chat completions, streaming or not",
                "parameters": [conversation],
                "requestBody": _body(completion_schema()),
                "responses": {
                    "200": {
                        "description": "A chat.completion, or chat.completion.chunk SSE frames",
                        "content": {JSON: {"schema": {"type": "object"}}, SSE: {}},
                    },
                    **_errors(*RUN_ERRORS),
                },
            }
        },
    }


def _metrics_paths() -> Schema:
    """The Prometheus endpoint /metrics (only when metrics are enabled)."""
    return {
        "/metrics": {
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
        },
    }


def _components() -> Schema:
    """Security schemes, named schemas and the shared error responses."""
    statuses = (
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
    return {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": "streamchat_session"},
        },
        "schemas": component_schemas(),
        "responses": {
            f"E{s}": {"description": d, "content": {JSON: {"schema": ref("Error")}}}
            for s, d in statuses
        },
    }


def document(settings: Settings, providers: list[str]) -> Schema:
    """The OpenAPI document for this server's settings and available providers."""
    max_content = validate.MAX_CONTENT
    if settings.limits.defaults.max_message_chars:
        max_content = min(max_content, settings.limits.defaults.max_message_chars)
    send = _body(send_schema(max_content, providers))
    regen = _body(regenerate_schema(providers), required=False)
    paths: Schema = {
        **_public_paths(),
        **_session_paths(),
        **_provider_paths(),
        **_conversation_paths(providers),
        **_answer_paths(send, regen),
        **_message_paths(regen),
        **_websocket_paths(),
        **_openai_paths(),
    }
    if settings.metrics.enabled:
        paths.update(_metrics_paths())
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
        "components": _components(),
    }


@routes.get("/api/v1/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document (public: it says nothing secret)."""
    providers = [n for n, p in request.app[PROVIDERS].items() if p.info.available]
    return web.json_response(document(request.app[SETTINGS], providers))
