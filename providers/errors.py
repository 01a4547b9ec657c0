"""Mapping upstream failures to our stable error codes, shared by every adapter."""

from __future__ import annotations

import re
from collections.abc import Mapping

from providers.base import ProviderError

_KEY_PATTERNS = [
    re.compile(r"(key=)[^&\s\"']+", re.IGNORECASE),
    re.compile(r"(Bearer\s+)[A-Za-z0-9._\-]+", re.IGNORECASE),
    re.compile(r"(x-goog-api-key[\"']?\s*[:=]\s*[\"']?)[^\s\"'&]+", re.IGNORECASE),
]


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove API keys from a message: known secrets verbatim, and key-shaped URL params."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    for pattern in _KEY_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a Retry-After (or retry-after-ms) header, if present and numeric."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    return None


_CONTEXT_HINTS = (
    "context length",
    "context_length",
    "context size",
    "maximum context",
    "too many tokens",
    "prompt is too long",
)
_QUOTA_HINTS = ("quota", "insufficient_quota", "billing", "credit")


def from_status(
    status: int,
    detail: str,
    *,
    provider: str,
    model: str,
    headers: Mapping[str, str] | None = None,
    error_type: str | None = None,
) -> ProviderError:
    """Map an upstream HTTP status (and its error text) to a ProviderError."""
    low = (detail or "").lower() + " " + (error_type or "").lower()
    if any(h in low for h in _CONTEXT_HINTS):
        return ProviderError(
            "context_length",
            "The conversation is too long for this model. Start a new conversation or shorten it.",
        )
    if status in (401, 403):
        return ProviderError(
            "auth", f"{provider} rejected the API key. Check the key configured for it."
        )
    if status == 404:
        return ProviderError(
            "not_found", f"{provider} does not know the model {model!r}. Pick another model."
        )
    if status == 429:
        if any(h in low for h in _QUOTA_HINTS) or ("resource_exhausted" in low and "quota" in low):
            return ProviderError(
                "quota_exceeded",
                f"The {provider} account has run out of quota. Check its plan and billing.",
            )
        after = retry_after_seconds(headers)
        wait = f" Try again in {after:g} s." if after is not None else " Try again shortly."
        return ProviderError(
            "rate_limited", f"{provider} is rate limiting requests.{wait}", retry_after=after
        )
    if status == 529 or "overloaded" in low:
        return ProviderError(
            "overloaded", f"{provider} is overloaded right now. Try again shortly."
        )
    if status in (408, 504):
        return ProviderError("timeout", f"{provider} timed out.")
    if status >= 500:
        return ProviderError(
            "upstream_unavailable", f"{provider} is having trouble (HTTP {status}). Try again."
        )
    if status in (400, 413, 422):
        if "safety" in low or "content_filter" in low or "content management policy" in low:
            return ProviderError(
                "content_filtered", f"{provider} declined this request under its content policy."
            )
        return ProviderError("bad_request", f"{provider} rejected the request: {detail[:300]}")
    return ProviderError("internal", f"{provider} answered with unexpected HTTP {status}.")


def connection_failed(provider: str) -> ProviderError:
    """The upstream could not be reached or dropped the connection."""
    return ProviderError(
        "upstream_unavailable", f"Could not reach {provider}, or it dropped the connection."
    )


def timed_out(provider: str) -> ProviderError:
    """The SDK's own network timeout fired (connect or read)."""
    return ProviderError("timeout", f"{provider} did not answer in time.")
