"""The OpenAI chat.completions format: request validation, model ids, chunks and errors.

Pure functions and small classes with no I/O; app/views_openai.py serves them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from app.errors import ApiError
from app.validate import MAX_CONTENT
from providers.base import ChatMessage, GenerateOptions, Provider

FIELDS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "user",
    }
)
# Fields some clients send at OpenAI's defaults (LangChain's n=1, penalties of 0): null or
# the default asks for nothing and is accepted; any other value is a 400 naming the field.
NO_OP_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
}
# "developer" is OpenAI's newer name for the system role.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_MESSAGES = 1000
MAX_STOP = 4
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


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    """A 400 invalid_request_error naming the offending parameter."""
    return ApiError(400, code, message, field=param, type="invalid_request_error")


# -- request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionRequest:
    """A validated chat.completions request."""

    model: str
    messages: list[ChatMessage]
    stream: bool
    include_usage: bool
    options: GenerateOptions


def _number(body: Mapping[str, Any], key: str, lo: float, hi: float, *, integer: bool) -> Any:
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        raise bad_request(f"'{key}' must be {'an integer' if integer else 'a number'}.", key)
    if not lo <= value <= hi:
        raise bad_request(f"'{key}' must be between {lo:g} and {hi:g}.", key)
    return value


def _text(value: Any, where: str) -> str:
    """Message content: a string or an array of text parts, joined by newlines."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            at = f"{where}[{j}]"
            if not isinstance(part, dict):
                raise bad_request(f"'{at}' must be an object.", at)
            if part.get("type") != "text":
                raise bad_request(
                    f"'{at}.type' must be 'text'; other content types are not supported.",
                    f"{at}.type",
                )
            extra = sorted(k for k, v in part.items() if k not in ("type", "text") and v)
            if extra:
                raise bad_request(f"Unsupported field '{at}.{extra[0]}'.", f"{at}.{extra[0]}")
            if not isinstance(part.get("text"), str):
                raise bad_request(f"'{at}.text' must be a string.", f"{at}.text")
            texts.append(part["text"])
        text = "\n".join(texts)
    else:
        raise bad_request(f"'{where}' must be a string or an array of text parts.", where)
    if len(text) > MAX_CONTENT:
        raise bad_request(f"'{where}' is longer than {MAX_CONTENT} characters.", where)
    if "\x00" in text:
        raise bad_request(f"'{where}' contains a NUL character.", where)
    return text


def _messages(raw: Any) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty array.", "messages")
    if len(raw) > MAX_MESSAGES:
        raise bad_request(f"'messages' has more than {MAX_MESSAGES} entries.", "messages")
    out = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"'{where}' must be an object.", where)
        role = msg.get("role")
        if role not in ROLES:
            raise bad_request(
                f"'{where}.role' must be system, user or assistant (got {str(role)[:40]!r}).",
                f"{where}.role",
            )
        # Clients often echo a previous answer back with model_dump(): null fields such as
        # tool_calls or refusal, and our own reasoning_content, carry nothing to send.
        extra = sorted(
            k
            for k, v in msg.items()
            if k not in ("role", "content")
            and v not in (None, [])
            and not (k == "reasoning_content" and role == "assistant")
        )
        if extra:
            raise bad_request(f"Unsupported field '{where}.{extra[0]}'.", f"{where}.{extra[0]}")
        out.append(ChatMessage(ROLES[role], _text(msg.get("content"), f"{where}.content")))
    return out


def _stop(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(stops, list)
        or not all(isinstance(s, str) and s for s in stops)
        or len(stops) > MAX_STOP
    ):
        raise bad_request(
            f"'stop' must be a non-empty string or an array of up to {MAX_STOP}.", "stop"
        )
    return tuple(stops)


def _asks_nothing(name: str, value: Any) -> bool:
    """Whether an otherwise unsupported field is null or at its OpenAI default."""
    default = NO_OP_DEFAULTS[name]
    if value is None:
        return True
    if isinstance(default, bool):
        return value is default
    return not isinstance(value, bool) and isinstance(value, int | float) and value == default


def _check_fields(body: Mapping[str, Any]) -> None:
    """A 400 naming the first field this server does not support (or not at that value)."""
    for name in sorted(NO_OP_DEFAULTS.keys() & body.keys()):
        if not _asks_nothing(name, body[name]):
            default = orjson.dumps(NO_OP_DEFAULTS[name]).decode()
            raise bad_request(
                f"Unsupported value for '{name}': only {default} (the default) is supported.",
                name,
                "unsupported_value",
            )
    unknown = sorted(set(body) - FIELDS - NO_OP_DEFAULTS.keys())
    if unknown:
        raise bad_request(
            f"Unsupported parameter '{unknown[0]}'. Supported: {', '.join(sorted(FIELDS))}.",
            unknown[0],
            "unsupported_parameter",
        )


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    """`stream_options.include_usage`, validated (only allowed when streaming)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_request(
            "'stream_options' is only allowed when 'stream' is true.", "stream_options"
        )
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", "stream_options")
    extra = sorted(set(options) - {"include_usage"})
    if extra:
        name = f"stream_options.{extra[0]}"
        raise bad_request(f"Unsupported parameter '{name}'.", name, "unsupported_parameter")
    wanted = options.get("include_usage")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad_request(
            "'stream_options.include_usage' must be a boolean.", "stream_options.include_usage"
        )
    return bool(wanted)


def parse_completion(body: Mapping[str, Any]) -> CompletionRequest:
    """Validate a chat.completions body; unsupported fields are a 400 naming them."""
    _check_fields(body)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > 300:
        raise bad_request("'model' is required: a model id from GET /v1/models.", "model")
    messages = _messages(body.get("messages"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", "stream")
    include_usage = _include_usage(body, bool(stream))
    max_tokens = _number(body, "max_tokens", 1, 1_000_000, integer=True)
    max_completion = _number(body, "max_completion_tokens", 1, 1_000_000, integer=True)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise bad_request(
            "Give 'max_tokens' or 'max_completion_tokens', not two different values.",
            "max_completion_tokens",
        )
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise bad_request("'user' must be a string of at most 256 characters.", "user")
    return CompletionRequest(
        model=model.strip(),
        messages=messages,
        stream=bool(stream),
        include_usage=include_usage,
        options=GenerateOptions(
            temperature=_number(body, "temperature", 0, 2, integer=False),
            max_tokens=max_completion if max_completion is not None else max_tokens,
            top_p=_number(body, "top_p", 0, 1, integer=False),
            stop=_stop(body.get("stop")),
            seed=_number(body, "seed", -(2**63), 2**63 - 1, integer=True),
        ),
    )


# -- models ----------------------------------------------------------------------------


def model_ids(providers: dict[str, Provider], default: str) -> list[tuple[str, str]]:
    """(id, owner) of each model: `provider/model`, then the default's plain names."""
    out: list[tuple[str, str]] = []
    for name, p in providers.items():
        if p.info.available:
            out.extend((f"{name}/{m}", name) for m in p.info.models)
    dp = providers.get(default)
    if dp is not None and dp.info.available:
        out.extend((m, default) for m in dp.info.models)
    return out


def resolve_model(providers: dict[str, Provider], default: str, name: str) -> tuple[str, str]:
    """Map a model id to (provider, model); 404 model_not_found when nothing matches.

    Order: a plain model of the default provider (model names may contain '/'), then
    `provider/model` for an available provider (any model name: the upstream decides),
    then a bare provider name meaning its default model.
    """
    dp = providers.get(default)
    if dp is not None and dp.info.available and name in dp.info.models:
        return default, name
    prefix, slash, rest = name.partition("/")
    p = providers.get(prefix if slash else name)
    if p is not None and (rest or not slash):
        if not p.info.available:
            raise ApiError(
                404,
                "model_not_found",
                f"The model {name!r} is not available: {p.info.reason}",
                field="model",
            )
        return p.info.name, rest or p.info.default_model
    raise ApiError(
        404,
        "model_not_found",
        f"The model {name!r} does not exist. GET /v1/models lists the models.",
        field="model",
    )


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
