"""Live runs, from launch to their saved end: drive the provider, fan out, finish, retain.

The second half of the streaming service (app/service.py starts runs: it validates,
admits and stores the exchange, then hands the run to `launch`). Owns the registries of
live and recently finished runs, the flusher that batches their writes and the heartbeat.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from typing import Any

from app.deadlines import Deadlines
from app.driver import Target, drive
from app.flusher import Flusher
from app.heartbeat import Heartbeat
from app.limits import Limiter
from app.metrics import Metrics
from app.outcome import measure, terminal_event
from app.runs import Run
from app.settings import StreamingSettings
from app.store import Store
from providers.base import ChatMessage, GenerateOptions, ProviderError

log = logging.getLogger(__name__)

# Finished runs stay in memory (exact resume for clients that were attached) this long,
# and at most this many: past that a resume replays the saved message (events.replay_finished).
# Bounded by count too, or a busy server's memory would track its run rate.
RETAIN_FINISHED = 60.0
MAX_RETAINED = 256


class Runner:
    """Owns live runs: one per conversation, each fanned out to any number of subscribers."""

    def __init__(
        self, store: Store, settings: StreamingSettings, limiter: Limiter, metrics: Metrics
    ) -> None:
        self.store = store
        self.settings = settings
        self.limiter = limiter
        self.metrics = metrics
        self.live_by_conversation: dict[str, Run] = {}
        self.runs: dict[str, Run] = {}  # live and recently finished, by message id
        self._retained: collections.OrderedDict[str, Run] = collections.OrderedDict()
        self.flusher = Flusher(
            store, self.metrics, self.live_by_conversation, settings.flush_interval
        )
        self.heartbeat = Heartbeat(self.runs, settings.heartbeat)
        # every live run's timeouts and waiting-status times, on one loop timer
        self.deadlines = Deadlines()
        self.accepting = True

    def start_background(self) -> None:
        """Start the flusher (batches all live runs' writes) and the SSE heartbeat."""
        self.flusher.start()
        self.heartbeat.start()

    async def drain(self, grace: float) -> int:
        """Stop accepting runs, give live ones `grace` seconds, then interrupt the rest.

        Interrupted runs are saved as `interrupted` with their text so far and end with a
        retryable `shutdown` error event. Returns how many runs were interrupted.
        """
        self.accepting = False
        live = [r for r in self.runs.values() if not r.done]
        if live and grace > 0:
            log.info("waiting up to %.0f s for %d live run(s) to finish", grace, len(live))
            await asyncio.wait(
                [asyncio.ensure_future(r.wait_finished()) for r in live], timeout=grace
            )
        remaining = [r for r in self.runs.values() if not r.finished_at]
        for run in remaining:
            if run.task is not None and not run.done:
                run.task.cancel()
        for run in remaining:
            await run.wait_finished()
        if remaining:
            log.warning("interrupted %d run(s) at shutdown", len(remaining))
        return len(remaining)

    async def close(self) -> None:
        """Interrupt whatever is still live and stop the flusher."""
        await self.drain(0)
        await self.heartbeat.stop()
        await self.flusher.stop()
        self.deadlines.close()

    def live_run(self, conversation_id: str) -> Run | None:
        """The conversation's live run, if any."""
        return self.live_by_conversation.get(conversation_id)

    def get_run(self, message_id: str) -> Run | None:
        """A live or recently finished run by its assistant message id."""
        return self.runs.get(message_id)

    def launch(
        self,
        run: Run,
        chain: list[Target],
        messages: list[ChatMessage],
        options: GenerateOptions,
        request_id: str | None,
        continued: bool = False,
    ) -> None:
        """Publish the run's `start` event, register it and start driving `chain`."""
        start: dict[str, Any] = {
            "type": "start",
            "conversation_id": run.conversation_id,
            "message_id": run.message_id,
            "user_message_id": run.user_message_id,
            "provider": run.provider,
            "model": run.model,
        }
        if request_id is not None:
            start["request_id"] = request_id
        if continued:
            start["continued"] = True
        run.publish(start)
        if run.persist:
            self.live_by_conversation[run.conversation_id] = run
        self.runs[run.message_id] = run
        self.flusher.wake()
        run.task = asyncio.create_task(
            self._run(run, chain, messages, options), name=f"run-{run.message_id}"
        )
        self.metrics.run_started(run)
        log.info(
            "run start message=%s conversation=%s provider=%s model=%s",
            run.message_id,
            run.conversation_id,
            run.provider,
            run.model,
        )

    async def _run(
        self,
        run: Run,
        chain: list[Target],
        messages: list[ChatMessage],
        options: GenerateOptions,
    ) -> None:
        status = "complete"
        error: ProviderError | None = None
        waiting = _WaitingStatus(run, self.settings.status_interval, self.deadlines)
        waiting.add()
        try:
            await drive(
                run,
                chain,
                messages,
                options,
                self.deadlines,
                self.metrics.gap_observer(run.provider, run.model),
                self.metrics.upstream_failed,
            )
        except asyncio.CancelledError:
            status = "cancelled" if run.cancel_requested else "interrupted"
            self.metrics.upstream_closed(run.message_id)  # drive() closed the upstream stream
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if status == "interrupted":
                error = ProviderError("shutdown", "The server stopped while answering.")
        except ProviderError as err:
            status, error = "failed", err
        except Exception:
            log.exception("run %s crashed", run.message_id)
            status = "failed"
            error = ProviderError("internal", "Something went wrong while answering.")
        finally:
            waiting.stopped = True
        # The stream is over: a cancel landing now (HTTP, WS, a disconnect, shutdown) must
        # not interrupt the final save, or the run never ends and cancel()/drain() hang.
        finishing = asyncio.ensure_future(self._finish(run, status, error))
        while not finishing.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(finishing)
        finishing.result()

    async def _finish(self, run: Run, status: str, error: ProviderError | None) -> None:
        outcome = measure(run, status, error)
        try:
            if run.persist:
                await self.store.finish_message(
                    run.message_id,
                    provider=run.provider,
                    model=run.model,
                    content=run.text(),
                    reasoning=run.reasoning_text(),
                    status=status,
                    finish_reason=run.finish_reason if status == "complete" else None,
                    prompt_tokens=run.usage["prompt_tokens"],
                    completion_tokens=run.usage["completion_tokens"],
                    error_code=error.code if error else None,
                    error_message=error.message if error else None,
                    **outcome.metrics(),
                )
        except Exception:
            log.exception("could not save the final state of message %s", run.message_id)
            error = ProviderError("internal", "The answer could not be saved.")
            outcome = dataclasses.replace(outcome, status="failed", error=error)
        run.final_status = outcome.status
        self.limiter.finished(run)
        self.metrics.run_finished(
            run, outcome.status, outcome.ttft_ms, outcome.error.code if outcome.error else None
        )
        if outcome.error is not None:
            run.error = {"code": outcome.error.code, "message": outcome.error.message}
        run.publish(terminal_event(run, outcome))
        if self.live_by_conversation.get(run.conversation_id) is run:
            del self.live_by_conversation[run.conversation_id]
        run.mark_finished()
        self._retained[run.message_id] = run
        self._evict_finished()
        log.info(
            "run end message=%s conversation=%s provider=%s model=%s status=%s ttft_ms=%s"
            " tokens=%s duration_ms=%.0f",
            run.message_id,
            run.conversation_id,
            run.provider,
            run.model,
            outcome.status,
            f"{outcome.ttft_ms:.0f}" if outcome.ttft_ms is not None else "-",
            run.usage["completion_tokens"],
            outcome.duration_ms,
        )

    def _evict_finished(self) -> None:
        # Oldest first; no timers, which would keep every run of the window alive.
        horizon = time.monotonic() - RETAIN_FINISHED
        while self._retained:
            mid, oldest = next(iter(self._retained.items()))
            if len(self._retained) <= MAX_RETAINED and (oldest.finished_at or 0) > horizon:
                break
            del self._retained[mid]
            if self.runs.get(mid) is oldest:
                del self.runs[mid]

    async def cancel(self, run: Run) -> None:
        """Stop a run: abort the upstream request and save the partial text as cancelled."""
        if not run.done and run.task is not None:
            run.cancel_requested = True
            self.metrics.cancel_requested(run.message_id)
            run.task.cancel()
        await run.wait_finished()

    def subscriber_left(self, run: Run, transport: str) -> None:
        """Uncount a subscriber; with on_disconnect=cancel the last one leaving cancels."""
        remaining = run.unsubscribe(transport)
        if remaining == 0 and not run.done and self.settings.on_disconnect == "cancel":
            run.cancel_requested = True
            self.metrics.cancel_requested(run.message_id)
            if run.task is not None:
                run.task.cancel()


class _WaitingStatus:
    """Every `interval` until the first token, tells the run's subscribers how long they
    have waited (a `status` event); an entry of the runner's Deadlines, not a timer."""

    __slots__ = ("deadlines", "interval", "run", "stopped")

    def __init__(self, run: Run, interval: float, deadlines: Deadlines) -> None:
        self.run = run
        self.interval = interval
        self.deadlines = deadlines
        self.stopped = False  # the provider's stream is over: nothing more to wait for

    def add(self) -> None:
        """Come due one interval from now."""
        self.deadlines.add(asyncio.get_running_loop().time() + self.interval, self)

    def due(self) -> None:
        """Publish the status, unless the run has started answering or ended."""
        run = self.run
        if self.stopped or run.done or run.first_token_at is not None:
            return
        waited = time.monotonic() - run.started_at
        run.publish(
            {
                "type": "status",
                "message_id": run.message_id,
                "state": "waiting",
                "waited": round(waited),
                "message": f"Waiting for the model ({waited:.0f} s).",
            }
        )
        self.add()
