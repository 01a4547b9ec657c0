"""The one error table: upstream failures -> stable codes and messages, for every adapter.

Adapters only say what happened (an HTTP status with the upstream's error text and type,
a typed in-stream error, a dropped connection, a refusal); this module decides the code,
whether a retry may help, and the sentence the person in the page reads. Keys are scrubbed
from anything quoted from upstream.
"""

from __future__ import annotations

import email.utils
import errno
import logging
import re
import resource
import time
from collections.abc import Mapping

from providers.base import ProviderError

log = logging.getLogger(__name__)

# What the user reads, per code. {provider} and {model} are always known; {detail} is the
# upstream's own (scrubbed, shortened) wording where it helps the user fix the request.
MESSAGES: dict[str, str] = {
    "auth": "{provider} rejected the API key. Check the key configured for it.",
    "not_found": "{provider} does not know the model '{model}'. Pick another model.",
    "rate_limited": "{provider} is rate limiting requests.{wait}",
    "quota_exceeded": "The {provider} account has run out of quota or credit. "
    "Check its plan and billing.",
    "bad_request": "{provider} rejected the request: {detail}",
    "context_length": "The conversation is too long for {model}. "
    "Start a new conversation or delete some messages.",
    "content_filtered": "{provider} declined to answer under its content policy.",
    "overloaded": "{provider} is overloaded right now. Try again shortly.",
    "upstream_unavailable": "{provider} is having trouble (HTTP {status}). Try again.",
    "timeout": "{provider} did not answer in time.",
    "internal": "{provider} answered with something unexpected (HTTP {status}).",
}
DROPPED_BEFORE = "Could not reach {provider}."
# This process ran out of file descriptors: not the provider's fault, and it passes as
# streams end. Each relayed stream holds two (the client's socket and the provider's).
SERVER_FULL = (
    "This server has too many connections open to reach {provider} right now. Try again shortly."
)
SERVER_FULL_RETRY_AFTER = 5.0
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
_DESCRIPTOR_WARNING_EVERY = 10.0  # seconds: one line for a burst of failed connections
_descriptor_warned_at = -_DESCRIPTOR_WARNING_EVERY
DROPPED_DURING = "The connection to {provider} broke off in the middle of the answer."
FILTERED_PROMPT = "{provider} blocked this prompt under its content policy."
# An error reported inside a 200 stream has no HTTP status to quote.
IN_STREAM = "{provider} reported an error while answering. Try again."

# Upstream error "types"/"codes"/"statuses" that name the cause outright (Anthropic error
# types, OpenAI error codes, Google RPC statuses). Checked before the HTTP status.
_TYPES: dict[str, str] = {
    "authentication_error": "auth",
    "permission_error": "auth",
    "invalid_api_key": "auth",
    "api_key_invalid": "auth",
    "unauthenticated": "auth",
    "permission_denied": "auth",
    "not_found_error": "not_found",
    "model_not_found": "not_found",
    "rate_limit_error": "rate_limited",
    "rate_limit_exceeded": "rate_limited",
    "insufficient_quota": "quota_exceeded",
    "billing_error": "quota_exceeded",
    "billing_not_active": "quota_exceeded",
    "overloaded_error": "overloaded",
    "api_error": "upstream_unavailable",
    "server_error": "upstream_unavailable",
    "timeout_error": "timeout",
    "context_length_exceeded": "context_length",
    "exceed_context_size_error": "context_length",
    "content_filter": "content_filtered",
    "content_policy_violation": "content_filtered",
}

# Substrings of an upstream error text that override a generic 400/429/503.
_CONTEXT_HINTS = (
    "context length",
    "context_length",
    "context size",
    "context window",
    "maximum context",
    "prompt is too long",
    "input token count",
)
_QUOTA_HINTS = ("quota", "billing", "credit balance", "insufficient balance", "spend limit")
_FILTER_HINTS = ("content_filter", "content management policy", "content policy", "safety")
_AUTH_HINTS = ("api key not valid", "api_key_invalid", "invalid api key", "invalid x-api-key")

_DETAIL_LIMIT = 300

_KEY_PATTERNS = [
    re.compile(r"([?&]key=)[^&\s\"']+", re.IGNORECASE),
    re.compile(r"(Bearer\s+)[A-Za-z0-9._\-]+", re.IGNORECASE),
    re.compile(
        r"((?:x-goog-api-key|x-api-key|api[_-]?key)[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]+", re.I
    ),
    re.compile(r"()\bsk-[A-Za-z0-9_\-]{8,}"),  # OpenAI, Anthropic, DeepSeek key shapes
    re.compile(r"()\bAIza[0-9A-Za-z_\-]{20,}"),  # Google API keys
]


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove API keys from a message: known secrets verbatim, and key-shaped strings."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    for pattern in _KEY_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from retry-after-ms or Retry-After (seconds or an HTTP date), if given."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _format(code: str, provider: str, model: str, *, status: int = 0, detail: str = "") -> str:
    return MESSAGES[code].format(
        provider=provider, model=model, status=status or "?", detail=detail, wait=""
    )


def make(
    code: str,
    *,
    provider: str,
    model: str,
    status: int = 0,
    detail: str = "",
    retry_after: float | None = None,
) -> ProviderError:
    """A ProviderError with the table's message for `code`."""
    if code == "rate_limited":
        wait = (
            f" Try again in {retry_after:g} s."
            if retry_after is not None
            else " Try again shortly."
        )
        message = MESSAGES[code].format(provider=provider, wait=wait)
        return ProviderError(code, message, retry_after=retry_after)
    if code in ("upstream_unavailable", "internal") and not status:
        return ProviderError(code, IN_STREAM.format(provider=provider))
    if code == "bad_request" and not detail:
        detail = f"HTTP {status}" if status else "no reason given"
    return ProviderError(code, _format(code, provider, model, status=status, detail=detail))


def classify(
    status: int, detail: str, error_type: str = "", retry_after: float | None = None
) -> str:
    """The code for an upstream failure: its type if telling, else its status and wording.

    `status` is 0 for an error that arrived inside a 200 stream.
    """
    low = f"{detail} {error_type}".lower()
    etype = error_type.lower()
    if any(h in low for h in _AUTH_HINTS):
        return "auth"
    by_type = _TYPES.get(etype)
    if by_type == "rate_limited" and any(h in low for h in _QUOTA_HINTS) and retry_after is None:
        return "quota_exceeded"
    if by_type == "upstream_unavailable" and "overloaded" in low:
        return "overloaded"
    if by_type is not None:
        return by_type
    if status in (0, 400, 413, 422) and any(h in low for h in _CONTEXT_HINTS):
        return "context_length"
    if status in (401, 403):
        return "auth"
    if status == 402:
        return "quota_exceeded"
    if status == 404:
        return "not_found"
    if status == 429 or "resource_exhausted" in etype:
        # A 429 that speaks of quota or billing and gives no time to wait is not a
        # rate limit that will lift in seconds: retrying would only burn time.
        if any(h in low for h in _QUOTA_HINTS) and retry_after is None:
            return "quota_exceeded"
        return "rate_limited"
    if status == 529 or "overloaded" in low:
        return "overloaded"
    if status in (408, 504) or etype == "deadline_exceeded":
        return "timeout"
    if status >= 500:
        return "upstream_unavailable"
    if status in (0, 400, 413, 422):
        if any(h in low for h in _FILTER_HINTS):
            return "content_filtered"
        if any(h in low for h in _QUOTA_HINTS):
            return "quota_exceeded"
        if status == 0:
            return "upstream_unavailable"  # an unexplained error inside the stream
        return "bad_request"
    return "internal"


def from_status(
    status: int,
    detail: str,
    *,
    provider: str,
    model: str,
    headers: Mapping[str, str] | None = None,
    error_type: str | None = None,
    retry_after: float | None = None,
    secrets: tuple[str, ...] = (),
) -> ProviderError:
    """Map an upstream HTTP status (0: an in-stream error) with its error text and type."""
    detail = scrub(" ".join((detail or "").split()), secrets)[:_DETAIL_LIMIT]
    if retry_after is None:
        retry_after = retry_after_seconds(headers)
    code = classify(status, detail, error_type or "", retry_after)
    return make(
        code, provider=provider, model=model, status=status, detail=detail, retry_after=retry_after
    )


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception an SDK's connection error wraps (the socket's own error)."""
    seen = {id(exc)}
    while True:
        inner = exc.__cause__ or exc.__context__
        if inner is None or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner


def connection_failed(
    provider: str,
    *,
    mid_stream: bool = False,
    cause: BaseException | None = None,
    secrets: tuple[str, ...] = (),
) -> ProviderError:
    """The upstream could not be reached, or dropped the connection.

    The client gets the stable message; the operator's log gets what really happened
    (refused, reset, out of ports, ...), scrubbed of the provider's keys.
    """
    if cause is not None:
        root = _root_cause(cause)
        if isinstance(root, OSError) and root.errno in OUT_OF_DESCRIPTORS:
            _warn_out_of_descriptors(root)
            return ProviderError(
                "overloaded",
                SERVER_FULL.format(provider=provider),
                retry_after=SERVER_FULL_RETRY_AFTER,
            )
        log.warning(
            "%s: connection %s: %s: %s",
            provider,
            "dropped mid-answer" if mid_stream else "failed",
            type(root).__name__,
            scrub(str(root), secrets)[:300],
        )
    template = DROPPED_DURING if mid_stream else DROPPED_BEFORE
    return ProviderError("upstream_unavailable", template.format(provider=provider))


def _warn_out_of_descriptors(err: OSError) -> None:
    """Tell the operator (at most every few seconds) which limit was hit and how to raise it."""
    global _descriptor_warned_at
    now = time.monotonic()
    if now - _descriptor_warned_at < _DESCRIPTOR_WARNING_EVERY:
        return
    _descriptor_warned_at = now
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    which = (
        "the system-wide file table is full"
        if err.errno == errno.ENFILE
        else f"this process's open-files limit ({soft}) is reached"
    )
    log.error(
        "out of file descriptors: %s; new answers fail until streams end. Each relayed "
        "stream holds two (the client's socket and the provider's): raise the limit "
        "(ulimit -n, or LimitNOFILE= in a systemd unit)",
        which,
    )


def timed_out(provider: str) -> ProviderError:
    """The SDK's own network timeout fired (connect or read)."""
    return make("timeout", provider=provider, model="")


def content_filtered(provider: str, *, prompt: bool = False) -> ProviderError:
    """The upstream blocked the prompt, or stopped the answer, under its content policy."""
    template = FILTERED_PROMPT if prompt else MESSAGES["content_filtered"]
    return ProviderError("content_filtered", template.format(provider=provider))


def unexpected(provider: str) -> ProviderError:
    """A failure none of the above explains (a bug or an SDK surprise)."""
    return ProviderError("internal", f"Unexpected failure talking to {provider}.")
