"""The OpenAI chat.completions request: validation, and model ids to providers.

Pure functions with no I/O; app/views_openai.py serves them (responses: app/openai_format.py).
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
