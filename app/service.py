"""The one streaming service both transports call: start runs (validate, admit, store).

Starting is here: choosing the provider and its fallbacks, the per-user limits, the one
transaction that stores the user's message and the answer-to-be, and the prompt. What
happens to a run once launched (driving the provider, fan-out, the final save, cancel,
retention) is app/runner.py, which ChatService extends.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.driver import Target
from app.errors import ApiError, not_found
from app.limits import UNLIMITED, Limiter
from app.metrics import Metrics
from app.prompt import build_prompt
from app.runner import Runner
from app.runs import Run
from app.settings import ProviderSettings, StreamingSettings
from app.store import ConversationNotFound, Exchange, NothingToAnswer, Store, new_id
from providers.base import ChatMessage, GenerateOptions, Provider

T = TypeVar("T")

TITLE_LENGTH = 60
CONTINUABLE = ("interrupted", "cancelled", "failed")


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


class ChatService(Runner):
    """Starts runs (new answers, continues, stateless /v1 answers) and hands them to the
    Runner it is: one live run per conversation, fanned out to any number of subscribers."""

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
        # per-user limits (app/limits.py); without one, nothing is limited
        super().__init__(store, settings, limiter or Limiter(UNLIMITED), metrics or Metrics())
        self.providers = providers
        self.provider_settings = provider_settings
        self.default_provider = default_provider
        self._reserved: dict[str, str] = {}  # conversation id -> user id, while starting

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
            self.launch(run, chain, messages, ticket.options, req.request_id)
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
            self.launch(run, chain, messages, options, req.request_id, True)
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
        self.launch(
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
