"""Explicit registry: provider kind -> adapter, and building every configured provider."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

from app.settings import ProviderSettings, Settings
from providers.base import (
    ChatMessage,
    GenerateOptions,
    Provider,
    ProviderError,
    ProviderInfo,
    StreamEvent,
)
from providers.local import LocalProvider, LocalRuntime
from providers.openai_compat import OpenAICompatProvider

log = logging.getLogger(__name__)

Factory = Callable[[ProviderSettings], Provider]


def _gemini(settings: ProviderSettings) -> Provider:
    from providers.gemini import GeminiProvider

    provider: Provider = GeminiProvider(settings)
    return provider


def _anthropic(settings: ProviderSettings) -> Provider:
    from providers.anthropic import AnthropicProvider

    provider: Provider = AnthropicProvider(settings)
    return provider


# kind -> (factory, SDK module it needs, pip extra that installs it)
KINDS: dict[str, tuple[Factory, str, str]] = {
    "openai": (OpenAICompatProvider, "openai", "openai"),
    "gemini": (_gemini, "google.genai", ".[gemini]"),
    "anthropic": (_anthropic, "anthropic", ".[anthropic]"),
}


class UnavailableProvider:
    """A configured provider that cannot run here; listed with the reason."""

    def __init__(self, settings: ProviderSettings, reason: str) -> None:
        self.info = ProviderInfo(
            name=settings.name,
            kind=settings.kind,
            models=settings.models,
            default_model=settings.default_model,
            available=False,
            reason=reason,
        )

    async def stream(
        self, messages: Sequence[ChatMessage], model: str, options: GenerateOptions
    ) -> AsyncIterator[StreamEvent]:
        """Never streams."""
        raise ProviderError("bad_request", f"{self.info.name} is not available: {self.info.reason}")
        yield  # pragma: no cover

    async def aclose(self) -> None:
        """Nothing to close."""


def _sdk_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@asynccontextmanager
async def open_providers(
    settings: Settings, extra: dict[str, Provider] | None = None
) -> AsyncIterator[dict[str, Provider]]:
    """Build every configured provider (the local runtime included) and close them at exit.

    `extra` adds already-built providers by name (tests use it for scripted fakes).
    """
    providers: dict[str, Provider] = {}
    async with AsyncExitStack() as stack:
        for name, ps in settings.providers.items():
            if extra and name in extra:
                continue
            providers[name] = await _build(ps, settings, stack)
        for name, p in (extra or {}).items():
            providers[name] = p
        try:
            yield providers
        finally:
            for p in providers.values():
                try:
                    await p.aclose()
                except Exception:  # closing must not stop the others from closing
                    log.exception("closing provider %s failed", p.info.name)


async def _build(ps: ProviderSettings, settings: Settings, stack: AsyncExitStack) -> Provider:
    if ps.kind == "local":
        runtime = LocalRuntime(settings.local, debug=settings.log_level.upper() == "DEBUG")
        reason = runtime.unavailable_reason()
        if reason:
            return UnavailableProvider(ps, reason)
        address = await runtime.start()
        stack.callback(runtime.close)
        return LocalProvider(ps, address, settings.local)
    if ps.kind not in KINDS:
        return UnavailableProvider(ps, f"unknown provider kind {ps.kind!r}")
    factory, module, extra = KINDS[ps.kind]
    if not _sdk_installed(module):
        return UnavailableProvider(ps, f"its SDK is not installed (pip install {extra})")
    # A provider without api_key_env (say, a local Ollama) needs no key.
    if ps.api_key is None and ps.api_key_env:
        return UnavailableProvider(ps, f"no API key: set {ps.api_key_env}")
    return factory(ps)
