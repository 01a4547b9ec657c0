"""A fake Anthropic Messages API: POST /v1/messages with typed server-sent events."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.upstreams.base import FakeUpstream, Plan, sse

_ERRORS: dict[str, tuple[str, str]] = {
    # error -> (type, message); {model} and {key} are filled in
    "auth": ("authentication_error", "invalid x-api-key: {key}"),
    "not_found": ("not_found_error", "model: {model}"),
    "rate_limit": (
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 50 requests per minute.",
    ),
    "quota": (
        "rate_limit_error",
        "You have reached your specified API usage limits (monthly spend limit). "
        "Raise the limit in Plans & Billing.",
    ),
    "credit": (
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. Please go to "
        "Plans & Billing to upgrade or purchase credits.",
    ),
    "echo": ("invalid_request_error", "messages.0: invalid content (sent with {key})"),
    "server": ("api_error", "Internal server error"),
    "overloaded": ("overloaded_error", "Overloaded"),
    "context": ("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
}


class AnthropicFake(FakeUpstream):
    """Speaks POST /v1/messages with stream=true."""

    def add_routes(self, app: web.Application) -> None:
        """The one endpoint."""
        app.router.add_post("/v1/messages", self.handle)

    def presented_key(self, request: web.Request) -> str:
        """The x-api-key header, or a Bearer token (which SDK 2.x sends)."""
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return request.headers.get("x-api-key") or bearer

    def model(self, request: web.Request, body: Any) -> str:
        """The body's model."""
        return str(body.get("model", "")) if isinstance(body, dict) else ""

    def error_response(self, plan: Plan, model: str, status: int) -> web.Response:
        """Anthropic's {"type": "error", "error": {type, message}} body."""
        etype, message = _ERRORS[plan.error or "server"]
        key = self.records[-1].headers.get("Authorization", "") if self.records else ""
        body = {
            "type": "error",
            "error": {"type": etype, "message": message.format(model=model, key=key)},
            "request_id": "req_fake",
        }
        headers = {"retry-after": plan.retry_after} if plan.retry_after else {}
        return web.json_response(body, status=status, headers=headers)

    def frames(self, plan: Plan, model: str, body: Any) -> list[tuple[str, bytes]]:
        """message_start, ping, content blocks, unknown events, message_delta, message_stop."""
        p, c = plan.usage
        out: list[tuple[str, bytes]] = []

        def ev(kind: str, data: dict[str, Any], tag: str = "meta") -> None:
            out.append((tag, sse({"type": kind, **data}, event=kind)))

        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": p, "output_tokens": 1},
        }
        ev("message_start", {"message": message})
        ev("ping", {})
        index = 0
        if plan.reasoning:
            ev(
                "content_block_start",
                {
                    "index": 0,
                    "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                },
            )
            for piece in plan.reasoning:
                delta = {"type": "thinking_delta", "thinking": piece}
                ev("content_block_delta", {"index": 0, "delta": delta}, "text")
            ev("content_block_stop", {"index": 0})
            index = 1
        ev("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
        for i, piece in enumerate(plan.text):
            if plan.stream_error_after is not None and i == plan.stream_error_after:
                err = {"type": "overloaded_error", "message": "Overloaded"}
                out.append(("error", sse({"type": "error", "error": err}, event="error")))
                return out
            delta = {"type": "text_delta", "text": piece}
            ev("content_block_delta", {"index": index, "delta": delta}, "text")
            if i == 0:
                # events a newer API version might add; clients must skip them
                ev("ping", {})
                ev("content_block_annotation", {"index": index, "note": {"kind": "future"}})
        ev("content_block_stop", {"index": index})
        reason = {"stop": "end_turn", "length": "max_tokens", "filtered": "refusal"}[plan.finish]
        ev(
            "message_delta",
            {
                "delta": {"stop_reason": reason, "stop_sequence": None},
                "usage": {"output_tokens": c},
            },
        )
        ev("message_stop", {})
        return out
