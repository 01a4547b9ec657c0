"""The one streaming service both transports call: start, follow, cancel, persist runs."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.driver import Target, drive
from app.errors import ApiError, not_found
from app.flusher import Flusher
from app.heartbeat import Heartbeat
from app.limits import UNLIMITED, Limiter
from app.metrics import Metrics
from app.outcome import measure, terminal_event
from app.prompt import build_prompt
from app.runs import Run
from app.settings import ProviderSettings, StreamingSettings
from app.store import ConversationNotFound, Exchange, NothingToAnswer, Store, new_id
from providers.base import ChatMessage, GenerateOptions, Provider, ProviderError

log = logging.getLogger(__name__)
T = TypeVar("T")

TITLE_LENGTH = 60
CONTINUABLE = ("interrupted", "cancelled", "failed")
# Finished runs stay in memory (exact resume for clients that were attached) this long,
# and at most this many: past that a resume replays the saved message (events.replay_finished).
# Bounded by count too, or a busy server's memory would track its run rate.
RETAIN_FINISHED = 60.0
MAX_RETAINED = 256


@dataclass(frozen=True)
class SendRequest:
    """A validated request to start a run."""

    content: str | None
    provider: str | None = None
    model: str | None = None
    options: GenerateOptions = field(default_factory=GenerateOptions)
    client_message_id: str | None = None
    request_id: str | None = None


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # nobody may be waiting for it any more: no "never retrieved"


async def _uncancelled(coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` in its own task that cancelling the caller does not cancel."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_consume)
    return await asyncio.shield(task)


class ChatService:
    """Owns live runs: one per conversation, each fanned out to any number of subscribers."""

    def __init__(
        self,
        store: Store,
        providers: dict[str, Provider],
        provider_settings: Mapping[str, ProviderSettings],
        settings: StreamingSettings,
        default_provider: str,
        limiter: Limiter | None = None,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or Metrics()  # Prometheus hooks (app/metrics.py)
        # per-user limits (app/limits.py); without one, nothing is limited
        self.limiter = limiter or Limiter(UNLIMITED)
        self.providers = providers
        self.provider_settings = provider_settings
        self.settings = settings
        self.default_provider = default_provider
        self.live_by_conversation: dict[str, Run] = {}
        self.runs: dict[str, Run] = {}  # live and recently finished, by message id
        self._retained: collections.OrderedDict[str, Run] = collections.OrderedDict()
        self._reserved: dict[str, str] = {}  # conversation id -> user id, while starting
        self.flusher = Flusher(
            store, self.metrics, self.live_by_conversation, settings.flush_interval
        )
        self.heartbeat = Heartbeat(self.runs, settings.heartbeat)
        self.accepting = True

    # -- lifecycle -------------------------------------------------------------------

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

    # -- choosing a provider -----------------------------------------------------------

    def resolve(self, provider: str | None, model: str | None) -> tuple[str, str]:
        """Validate a provider/model choice; ApiError 400 names the problem."""
        name = provider or self.default_provider
        if name not in self.providers:
            raise ApiError(400, "bad_request", f"Unknown provider {name!r}.", field="provider")
        info = self.providers[name].info
        if not info.available:
            raise ApiError(
                400,
                "provider_unavailable",
                f"Provider {name!r} is not available: {info.reason}",
                field="provider",
            )
        return name, model or info.default_model

    def _chain(self, name: str, model: str) -> list[Target]:
        chain = [Target(self.providers[name], self.provider_settings[name], model)]
        for fb in self.provider_settings[name].fallback:
            p = self.providers.get(fb)
            if p is not None and p.info.available and fb != name:
                chain.append(Target(p, self.provider_settings[fb], p.info.default_model))
        return chain

    # -- runs ----------------------------------------------------------------------------

    def live_run(self, conversation_id: str) -> Run | None:
        """The conversation's live run, if any."""
        return self.live_by_conversation.get(conversation_id)

    def get_run(self, message_id: str) -> Run | None:
        """A live or recently finished run by its assistant message id."""
        return self.runs.get(message_id)

    async def start(
        self, user_id: str, conversation: Mapping[str, Any] | str, req: SendRequest
    ) -> tuple[Run, bool]:
        """Start a run for a new user message; returns (run, created).

        `conversation` is the conversation or its id; an id is read in the same database
        round trip as the run's writes (404 unless it is the user's): under load each
        round trip waits for the busy event loop, and they add up to the first token.
        A retried send with the same client_message_id returns the existing run.
        Raises ApiError 409 while another run of the conversation is live.

        Not cancelled with the request: once the message is saved its run starts even if
        the client left meanwhile (it can resume), never leaving an answer stuck.
        """
        return await _uncancelled(self._start(user_id, conversation, req))

    async def _start(
        self, user_id: str, conversation: Mapping[str, Any] | str, req: SendRequest
    ) -> tuple[Run, bool]:
        cid = conversation if isinstance(conversation, str) else conversation["id"]
        live = self.live_by_conversation.get(cid)
        if (
            req.client_message_id
            and live is not None
            and live.client_message_id == req.client_message_id
            and live.user_id == user_id
        ):
            return live, False  # a retried send while its answer is being generated
        self._check_accepting()
        if req.provider:
            self.resolve(req.provider, req.model)  # a bad choice is a 400 before anything
        self._reserve(cid, user_id)
        ticket = None
        try:
            ticket = self.limiter.admit(user_id, req.content, req.options)  # before any write
            exchange = await self._open_exchange(user_id, conversation, req)
            if exchange.duplicate is not None:
                return self._duplicate(exchange.duplicate), False
            messages = build_prompt(
                exchange.conversation, exchange.history, self.settings.history_budget
            )
            run = Run(
                conversation_id=cid,
                message_id=exchange.message_id,
                user_message_id=exchange.user_message_id,
                user_id=user_id,
                provider=exchange.provider,
                model=exchange.model,
                client_message_id=req.client_message_id,
            )
            chain = ticket.guard(run, self._chain(exchange.provider, exchange.model))
            self._launch(run, chain, messages, ticket.options, req.request_id)
        finally:
            self._reserved.pop(cid, None)
            self.limiter.settle(ticket)
        return run, True

    async def _open_exchange(
        self, user_id: str, conversation: Mapping[str, Any] | str, req: SendRequest
    ) -> Exchange:
        """Store the user's message and the streaming answer (one transaction)."""

        def choose(conv: Mapping[str, Any]) -> tuple[str, str]:
            return self.resolve(
                req.provider or conv.get("provider"),
                req.model or (conv.get("model") if not req.provider else None),
            )

        title = None
        if req.content is not None:
            title = " ".join(req.content.split())[:TITLE_LENGTH] or None
        try:
            return await self.store.start_exchange(
                user_id,
                conversation if isinstance(conversation, str) else dict(conversation),
                content=req.content,
                choose=choose,
                client_message_id=req.client_message_id,
                title=title,
            )
        except ConversationNotFound:
            raise not_found() from None
        except NothingToAnswer:
            raise ApiError(400, "bad_request", "There is no user message to answer.") from None

    def _duplicate(self, existing: Mapping[str, Any]) -> Run:
        """A send whose client_message_id was seen: its live run, or a 409 if it ended."""
        retained = self.runs.get(existing["id"])
        if retained is not None:
            return retained
        raise ApiError(
            409,
            "duplicate",
            "This message was already sent; its answer has finished.",
            message_id=existing["id"],
            message_status=existing["status"],
        )

    async def continue_answer(
        self, user_id: str, conversation: Mapping[str, Any], mid: str, req: SendRequest
    ) -> Run:
        """Carry on an interrupted, cancelled or failed answer, appending to the same message.

        The new run's events carry only the new text; its `start` says `continued: true`.
        Not cancelled with the request, as `start`.
        """
        return await _uncancelled(self._continue(user_id, conversation, mid, req))

    async def _continue(
        self, user_id: str, conversation: Mapping[str, Any], mid: str, req: SendRequest
    ) -> Run:
        self._check_accepting()
        cid = conversation["id"]
        self._reserve(cid, user_id)
        ticket = None
        try:
            ticket = self.limiter.admit(user_id, None, req.options)  # before any write
            history = await self.store.list_messages(cid)
            index = next((i for i, m in enumerate(history) if m["id"] == mid), None)
            if index is None or history[index]["role"] != "assistant":
                raise ApiError(404, "not_found", "No such message.")
            message = history[index]
            if message["status"] not in CONTINUABLE:
                raise ApiError(
                    409,
                    "conflict",
                    f"Only an interrupted, stopped or failed answer can be continued "
                    f"(this one is {message['status']}).",
                )
            if index != len(history) - 1:
                raise ApiError(409, "conflict", "Only the last answer can be continued.")
            name, model = self.resolve(
                req.provider or message["provider"],
                req.model or (message["model"] if not req.provider else None),
            )
            await self.store.reopen_message(mid, name, model)
            messages = build_prompt(conversation, history[:index], self.settings.history_budget)
            options = dataclasses.replace(ticket.options, prefill=message["content"] or None)
            run = Run(
                conversation_id=cid,
                message_id=mid,
                user_message_id=None,
                user_id=user_id,
                provider=name,
                model=model,
                prefix=message["content"],
                prefix_reasoning=message["reasoning"],
            )
            chain = ticket.guard(run, self._chain(name, model))
            self._launch(run, chain, messages, options, req.request_id, True)
        finally:
            self._reserved.pop(cid, None)
            self.limiter.settle(ticket)
        return run

    def start_ephemeral(
        self,
        user_id: str,
        messages: list[ChatMessage],
        provider: str | None,
        model: str | None,
        options: GenerateOptions,
    ) -> Run:
        """Start a run that is not stored (the OpenAI-compatible stateless mode).

        Every message is new to the server here, so the longest one meets the per-user
        message length limit.
        """
        self._check_accepting()
        name, model = self.resolve(provider, model)
        i = max(range(len(messages)), key=lambda k: len(messages[k].content), default=None)
        longest = None if i is None else messages[i].content
        ticket = self.limiter.admit(user_id, longest, options, f"messages[{i}].content")
        run = Run(
            conversation_id="",
            message_id=new_id(),
            user_message_id=None,
            user_id=user_id,
            provider=name,
            model=model,
            persist=False,
        )
        self._launch(
            run, ticket.guard(run, self._chain(name, model)), messages, ticket.options, None
        )
        return run

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise ApiError(
                503, "shutdown", "The server is shutting down; try again shortly.", retryable=True
            )

    def _reserve(self, cid: str, user_id: str) -> None:
        # Another user's conversation is a 404 here too (not a 409 naming its live run);
        # the caller's own ownership check follows.
        live = self.live_by_conversation.get(cid)
        if live is not None:
            if live.user_id != user_id:
                raise not_found()
            raise ApiError(
                409,
                "conflict",
                "An answer is already being generated in this conversation.",
                message_id=live.message_id,
            )
        if cid in self._reserved:
            if self._reserved[cid] != user_id:
                raise not_found()
            raise ApiError(409, "conflict", "A message is already being sent in this conversation.")
        self._reserved[cid] = user_id

    def _launch(
        self,
        run: Run,
        chain: list[Target],
        messages: list[ChatMessage],
        options: GenerateOptions,
        request_id: str | None,
        continued: bool = False,
    ) -> None:
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
        waiting = asyncio.get_running_loop().call_later(
            self.settings.status_interval, self._waiting_status, run
        )
        try:
            await drive(
                run, chain, messages, options, self.metrics.gap_observer(run.provider, run.model)
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
            waiting.cancel()
        # The stream is over: a cancel landing now (HTTP, WS, a disconnect, shutdown) must
        # not interrupt the final save, or the run never ends and cancel()/drain() hang.
        finishing = asyncio.ensure_future(self._finish(run, status, error))
        while not finishing.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(finishing)
        finishing.result()

    def _waiting_status(self, run: Run) -> None:
        if run.done or run.first_token_at is not None:
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
        asyncio.get_running_loop().call_later(
            self.settings.status_interval, self._waiting_status, run
        )

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
        self.metrics.run_finished(run, outcome.status, outcome.ttft_ms)
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
