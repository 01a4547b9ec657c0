"""The OpenAI chat.completions responses: chunks, whole completions and errors.

Pure functions and small classes with no I/O; app/views_openai.py serves them (requests:
app/openai_request.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from app.errors import ApiError

FINISH_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls", "function_call"})

# ProviderError code -> (HTTP status, OpenAI error type, OpenAI error code)
UPSTREAM_ERRORS: dict[str, tuple[int, str, str]] = {
    "bad_request": (400, "invalid_request_error", "invalid_request"),
    "context_length": (400, "invalid_request_error", "context_length_exceeded"),
    "content_filtered": (400, "invalid_request_error", "content_filter"),
    "auth": (401, "authentication_error", "upstream_auth"),
    "not_found": (404, "invalid_request_error", "model_not_found"),
    "rate_limited": (429, "rate_limit_error", "rate_limit_exceeded"),
    "quota_exceeded": (429, "insufficient_quota", "insufficient_quota"),
    "internal": (500, "server_error", "internal"),
    "overloaded": (503, "server_error", "overloaded"),
    "upstream_unavailable": (503, "server_error", "upstream_unavailable"),
    "interrupted": (503, "server_error", "interrupted"),
    "shutdown": (503, "server_error", "shutdown"),
    "timeout": (504, "server_error", "timeout"),
}


# -- responses -------------------------------------------------------------------------


def upstream_error(event: Mapping[str, Any], headers: Mapping[str, str]) -> ApiError:
    """A run's error event as the OpenAI error it becomes (status, type, code)."""
    status, etype, code = UPSTREAM_ERRORS.get(
        event.get("code", ""), (500, "server_error", "internal")
    )
    out = dict(headers)
    if event.get("retry_after") is not None:
        out["Retry-After"] = str(max(1, round(event["retry_after"])))
    return ApiError(
        status, code, event.get("message") or "The model failed.", headers=out, type=etype
    )


def finish_reason(end: Mapping[str, Any]) -> str:
    """OpenAI's finish_reason for an end event."""
    reason = end.get("finish_reason")
    if reason in FINISH_REASONS:
        return str(reason)
    if reason in ("max_tokens", "MAX_TOKENS"):
        return "length"
    # "cancelled" (stopped through the API), None, or a provider's own word for a normal end
    return "stop"


def usage(end: Mapping[str, Any]) -> dict[str, int]:
    """OpenAI's usage object from an end event (unknown counts are 0)."""
    counts = end.get("usage") or {}
    prompt = int(counts.get("prompt_tokens") or 0)
    answer = int(counts.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}


class Chunks:
    """Encodes one completion's chat.completion.chunk frames."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self.head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self.include_usage = include_usage

    def chunk(self, delta: dict[str, Any], reason: str | None = None) -> str:
        """One chunk with one choice."""
        body: dict[str, Any] = {
            **self.head,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
        }
        if self.include_usage:
            body["usage"] = None
        return orjson.dumps(body).decode()

    def usage(self, end: Mapping[str, Any]) -> str:
        """The usage chunk sent last when stream_options.include_usage is set."""
        return orjson.dumps({**self.head, "choices": [], "usage": usage(end)}).decode()

    def frames(self, events: list[dict[str, Any]]) -> list[str]:
        """Frames for a batch of run events; runs of text pieces merge into one delta."""
        out: list[str] = []
        kind, parts = "", list[str]()
        for ev in [*events, {"type": ""}]:
            t = ev["type"]
            if parts and t != kind:
                key = "content" if kind == "chunk" else "reasoning_content"
                out.append(self.chunk({key: "".join(parts)}))
                parts = []
            kind = t
            if t in ("chunk", "reasoning"):
                parts.append(ev["content"])
            elif t == "end":
                out.append(self.chunk({}, finish_reason(ev)))
                if self.include_usage:
                    out.append(self.usage(ev))
            elif t == "error":
                out.append(orjson.dumps(upstream_error(ev, {}).openai_body()).decode())
        return out


def completion(
    completion_id: str, created: int, model: str, text: str, reasoning: str, end: Mapping[str, Any]
) -> dict[str, Any]:
    """The non-streaming chat.completion object."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if reasoning:
        message["reasoning_content"] = reasoning
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(end)}
        ],
        "usage": usage(end),
    }
