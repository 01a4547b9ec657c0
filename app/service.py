"""The one streaming service both transports call: start, follow, cancel, persist runs."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.driver import Target, drive
from app.errors import ApiError, not_found
from app.limits import UNLIMITED, Limiter
from app.metrics import Metrics
from app.runs import Run
from app.settings import ProviderSettings, StreamingSettings
from app.store import ConversationNotFound, NothingToAnswer, Store, new_id
from providers.base import ChatMessage, GenerateOptions, Provider, ProviderError

log = logging.getLogger(__name__)
T = TypeVar("T")

TITLE_LENGTH = 60
CONTINUABLE = ("interrupted", "cancelled", "failed")
# The flusher writes at most this many live answers a second (its tick stretches beyond
# streaming.flush_interval past that): 500 answers every 250 ms.
FLUSH_ROWS_PER_S = 2000
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
        self._live_event = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self.flush_failures = 0
        self.accepting = True

    # -- lifecycle -------------------------------------------------------------------

    def start_background(self) -> None:
        """Start the single flusher task that batches all live runs' writes."""
        self._flusher = asyncio.create_task(self._flush_loop(), name="streamchat-flusher")

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
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher

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

    # -- history -----------------------------------------------------------------------

    def build_prompt(
        self, conversation: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
    ) -> list[ChatMessage]:
        """System prompt plus the newest history that fits the budget (oldest dropped)."""
        budget = self.settings.history_budget
        picked: list[ChatMessage] = []
        used = 0
        for msg in reversed(history):
            if msg["role"] == "assistant" and (msg["status"] == "streaming" or not msg["content"]):
                continue
            cost = len(msg["content"])
            if picked and used + cost > budget:
                break
            picked.append(ChatMessage(msg["role"], msg["content"]))
            used += cost
        picked.reverse()
        # a prompt must not begin with an assistant turn
        while picked and picked[0].role == "assistant":
            picked.pop(0)
        if conversation.get("system_prompt"):
            picked.insert(0, ChatMessage("system", conversation["system_prompt"]))
        return picked

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

        def choose(conv: Mapping[str, Any]) -> tuple[str, str]:
            return self.resolve(
                req.provider or conv.get("provider"),
                req.model or (conv.get("model") if not req.provider else None),
            )

        title = None
        if req.content is not None:
            title = " ".join(req.content.split())[:TITLE_LENGTH] or None
        self._reserve(cid, user_id)
        ticket = None
        try:
            ticket = self.limiter.admit(user_id, req.content, req.options)  # before any write
            try:
                exchange = await self.store.start_exchange(
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
            if exchange.duplicate is not None:
                existing = exchange.duplicate
                retained = self.runs.get(existing["id"])
                if retained is not None:
                    return retained, False
                raise ApiError(
                    409,
                    "duplicate",
                    "This message was already sent; its answer has finished.",
                    message_id=existing["id"],
                    message_status=existing["status"],
                )
            messages = self.build_prompt(exchange.conversation, exchange.history)
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
            messages = self.build_prompt(conversation, history[:index])
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
        """Start a run that is not stored (the OpenAI-compatible stateless mode)."""
        self._check_accepting()
        name, model = self.resolve(provider, model)
        ticket = self.limiter.admit(user_id, None, options)
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
        self._live_event.set()
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
        duration_ms = (now - run.started_at) * 1000
        content, reasoning = run.text(), run.reasoning_text()
        try:
            if run.persist:
                await self.store.finish_message(
                    run.message_id,
                    provider=run.provider,
                    model=run.model,
                    content=content,
                    reasoning=reasoning,
                    status=status,
                    finish_reason=run.finish_reason if status == "complete" else None,
                    prompt_tokens=run.usage["prompt_tokens"],
                    completion_tokens=run.usage["completion_tokens"],
                    error_code=error.code if error else None,
                    error_message=error.message if error else None,
                    ttft_ms=ttft_ms,
                    tokens_per_s=tokens_per_s,
                    duration_ms=duration_ms,
                )
        except Exception:
            log.exception("could not save the final state of message %s", run.message_id)
            status = "failed"
            error = ProviderError("internal", "The answer could not be saved.")
        run.final_status = status
        self.limiter.finished(run)
        self.metrics.run_finished(run, status, ttft_ms)
        metrics = {"ttft_ms": ttft_ms, "tokens_per_s": tokens_per_s, "duration_ms": duration_ms}
        if error is None:
            run.publish(
                {
                    "type": "end",
                    "message_id": run.message_id,
                    "status": status,
                    "finish_reason": run.finish_reason if status == "complete" else "cancelled",
                    "usage": dict(run.usage),
                    "metrics": metrics,
                }
            )
        else:
            run.error = {"code": error.code, "message": error.message}
            event: dict[str, Any] = {
                "type": "error",
                "message_id": run.message_id,
                "code": error.code,
                "message": error.message,
                "retryable": error.retryable,
                "status": status,
            }
            if error.retry_after is not None:
                event["retry_after"] = error.retry_after
            run.publish(event)
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
            status,
            f"{ttft_ms:.0f}" if ttft_ms is not None else "-",
            run.usage["completion_tokens"],
            duration_ms,
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

    # -- persistence -------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        """While runs are live, write every changed one at most once per flush_interval.

        One executemany per tick for all runs: the write count depends on time, never
        on the number of tokens. Under load the tick stretches so that at most
        FLUSH_ROWS_PER_S rows are written a second: with thousands of slow streams
        each tick would otherwise rewrite nearly every live answer for one token each
        (a fifth of the server's CPU at 6,000 streams of 1 token/s, docs/performance.md).
        """
        interval = self.settings.flush_interval
        while True:
            await self._live_event.wait()
            await asyncio.sleep(interval)
            if not self.live_by_conversation:
                self._live_event.clear()
                interval = self.settings.flush_interval
                continue
            batch = [
                (r, r.last_seq)
                for r in self.live_by_conversation.values()
                if r.last_seq != r.flushed_seq and not r.done
            ]
            if not batch:
                interval = self.settings.flush_interval
                continue
            rows = [(r.text(), r.reasoning_text(), r.message_id) for r, _ in batch]
            interval = max(self.settings.flush_interval, len(rows) / FLUSH_ROWS_PER_S)
            t0 = time.monotonic()
            try:
                await self.store.flush_contents(rows)
            except Exception:
                self.flush_failures += 1
                self.metrics.flush_failures.inc()
                log.exception("flush of %d live answer(s) failed; will retry", len(rows))
                continue
            self.metrics.flush_seconds.observe(time.monotonic() - t0)
            for r, seq in batch:
                r.flushed_seq = seq
