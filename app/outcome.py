"""How a run ends: the metrics stored with its answer and its terminal event."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from app.runs import Run
from providers.base import ProviderError


@dataclass(frozen=True)
class Outcome:
    """A finished run's status, error and the metrics stored with its message."""

    status: str
    error: ProviderError | None
    ttft_ms: float | None
    tokens_per_s: float | None
    duration_ms: float

    def metrics(self) -> dict[str, float | None]:
        """The per-answer metrics as the API returns them."""
        return {
            "ttft_ms": self.ttft_ms,
            "tokens_per_s": self.tokens_per_s,
            "duration_ms": self.duration_ms,
        }


def measure(run: Run, status: str, error: ProviderError | None) -> Outcome:
    """TTFT, tokens/s and duration of `run`, ending now.

    Without a usage report from the provider, the text events count as tokens.
    """
    now = time.monotonic()
    ttft_ms = tokens_per_s = None
    if run.first_token_at is not None:
        ttft_ms = (run.first_token_at - run.started_at) * 1000
        gen = now - run.first_token_at
        completion = run.usage["completion_tokens"] or run.text_events
        if gen > 0 and completion:
            tokens_per_s = completion / gen
    if run.usage["completion_tokens"] is None and run.text_events:
        run.usage["completion_tokens"] = run.text_events
    return Outcome(status, error, ttft_ms, tokens_per_s, (now - run.started_at) * 1000)


def terminal_event(run: Run, outcome: Outcome) -> dict[str, Any]:
    """The run's last event: `end`, or `error` when it failed or was interrupted."""
    error = outcome.error
    if error is None:
        complete = outcome.status == "complete"
        return {
            "type": "end",
            "message_id": run.message_id,
            "status": outcome.status,
            "finish_reason": run.finish_reason if complete else "cancelled",
            "usage": dict(run.usage),
            "metrics": outcome.metrics(),
        }
    event: dict[str, Any] = {
        "type": "error",
        "message_id": run.message_id,
        "code": error.code,
        "message": error.message,
        "retryable": error.retryable,
        "status": outcome.status,
    }
    if error.retry_after is not None:
        event["retry_after"] = error.retry_after
    return event
