"""Building Settings from defaults, provider presets, a TOML file, env vars and CLI flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from app.settings import (
    POSITIVE_STREAMING,
    AuthSettings,
    LimitsSettings,
    LocalSettings,
    MetricsSettings,
    ProviderSettings,
    Secret,
    Settings,
    SettingsError,
    StreamingSettings,
    UserLimits,
)

# Built-in provider presets; the config file may override any field or add providers.
PRESETS: dict[str, dict[str, Any]] = {
    "openai": {
        "kind": "openai",
        "api_key_env": "OPENAI_API_KEY",
        "models": ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"],
        "default_model": "gpt-4o-mini",
    },
    "deepseek": {
        "kind": "openai",
        "base_url": "https://api.deepseek.com",
        "api_key_env": "DEEPSEEK_API_KEY",
        "models": ["deepseek-chat", "deepseek-reasoner"],
        "default_model": "deepseek-chat",
    },
    "gemini": {
        "kind": "gemini",
        "api_key_env": "GEMINI_API_KEY",
        "models": ["gemini-2.5-flash", "gemini-2.5-pro"],
        "default_model": "gemini-2.5-flash",
    },
    "anthropic": {
        "kind": "anthropic",
        "api_key_env": "ANTHROPIC_API_KEY",
        "models": ["claude-sonnet-4-5", "claude-haiku-4-5"],
        "default_model": "claude-haiku-4-5",
    },
}

# Env vars that also carry a key for a preset (the SDKs' own alternatives).
_ALT_KEY_ENV = {"GEMINI_API_KEY": "GOOGLE_API_KEY"}


def _section(cls: type, data: Mapping[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise SettingsError(f"unknown setting(s) in [{where}]: {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        f = names[key]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ""
        kwargs[key] = _coerce(value, default, f"{where}.{key}")
    return kwargs


def _coerce(value: Any, default: Any, where: str) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int) and not isinstance(default, bool):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{where}: invalid value {value!r}") from exc
    if value is not None and not isinstance(value, str | Secret):
        raise SettingsError(f"{where}: expected a string, got {value!r}")
    return value


def _provider(name: str, data: Mapping[str, Any], env: Mapping[str, str]) -> ProviderSettings:
    kwargs = _section(
        ProviderSettings, {k: v for k, v in data.items() if k != "api_key"}, f"providers.{name}"
    )
    if "api_key" in data:
        raise SettingsError(
            f"providers.{name}: put the key in an env var and name it with api_key_env"
        )
    kwargs["name"] = name
    if "kind" not in kwargs:
        raise SettingsError(f"providers.{name}: 'kind' is required")
    if kwargs["kind"] not in ("openai", "gemini", "anthropic", "local", "fake"):
        raise SettingsError(f"providers.{name}: unknown kind {kwargs['kind']!r}")
    if kwargs.get("http2") and kwargs["kind"] != "openai":
        raise SettingsError(f"providers.{name}: http2 is only for kind 'openai'")
    key_env = kwargs.get("api_key_env")
    if key_env:
        value = env.get(key_env) or env.get(_ALT_KEY_ENV.get(key_env, ""), "")
        if value:
            kwargs["api_key"] = Secret(value)
    models = kwargs.get("models", ())
    if not kwargs.get("default_model") and models:
        kwargs["default_model"] = models[0]
    if kwargs.get("default_model") and kwargs["default_model"] not in models:
        kwargs["models"] = (kwargs["default_model"], *models)
    return ProviderSettings(**kwargs)


def _auth(data: Mapping[str, Any], env: Mapping[str, str]) -> AuthSettings:
    data = dict(data)
    if env.get("STREAMCHAT_AUTH_MODE"):
        data["mode"] = env["STREAMCHAT_AUTH_MODE"]
    auth = AuthSettings(**_section(AuthSettings, data, "auth"))
    # browsers send scheme and host in lower case
    auth = dataclasses.replace(
        auth,
        origins=tuple(o.lower() for o in auth.origins),
        cors_origins=tuple(o.lower() for o in auth.cors_origins),
    )
    if auth.mode not in ("none", "api_key"):
        raise SettingsError("auth.mode must be 'none' or 'api_key'")
    if auth.session_days <= 0:
        raise SettingsError("auth.session_days must be positive")
    for key in ("origins", "cors_origins"):
        for origin in getattr(auth, key):
            scheme, sep, rest = origin.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
                raise SettingsError(
                    f"auth.{key}: {origin!r} is not an origin like https://chat.example.com"
                )
    return auth


def _limits(data: Mapping[str, Any]) -> LimitsSettings:
    user_fields = {f.name for f in dataclasses.fields(UserLimits)}
    glob = {k: v for k, v in data.items() if k not in user_fields and k != "users"}
    if "defaults" in glob:  # per-user defaults are written flat in [limits]
        raise SettingsError("unknown setting(s) in [limits]: defaults")
    defaults = UserLimits(
        **_section(UserLimits, {k: v for k, v in data.items() if k in user_fields}, "limits")
    )
    users: dict[str, UserLimits] = {}
    for name, udata in dict(data.get("users", {})).items():
        if not isinstance(udata, dict):
            raise SettingsError(f"limits.users.{name} must be a table")
        users[name] = dataclasses.replace(
            defaults, **_section(UserLimits, udata, f"limits.users.{name}")
        )
    limits = LimitsSettings(
        **_section(LimitsSettings, glob, "limits"), defaults=defaults, users=users
    )
    for where, values in (
        ("limits", defaults),
        *((f"limits.users.{n}", u) for n, u in users.items()),
    ):
        for f in dataclasses.fields(UserLimits):
            if getattr(values, f.name) < 0:
                raise SettingsError(f"{where}.{f.name} must not be negative (0 turns it off)")
    if limits.max_body_bytes < 1024 or limits.ws_max_message_bytes < 1024:
        raise SettingsError("limits.max_body_bytes and limits.ws_max_message_bytes must be >= 1024")
    return limits


def _metrics(data: Mapping[str, Any], env: Mapping[str, str]) -> MetricsSettings:
    if "token" in data:
        raise SettingsError("metrics: put the token in an env var and name it with token_env")
    metrics = MetricsSettings(**_section(MetricsSettings, data, "metrics"))
    if metrics.token_env:
        if not env.get(metrics.token_env):
            # fail closed: a protected endpoint must not open up because a variable is unset
            raise SettingsError(f"metrics.token_env names {metrics.token_env}, which is not set")
        metrics = dataclasses.replace(metrics, token=Secret(env[metrics.token_env]))
    return metrics


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the server's command line flags."""
    parser = argparse.ArgumentParser(prog="run.py", description="streamchat server")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--db", help="SQLite database path")
    parser.add_argument("--log-level")
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    return parser.parse_args(argv)


def _top_level(
    data: Mapping[str, Any], env: Mapping[str, str], cli: Mapping[str, Any]
) -> dict[str, Any]:
    """The top-level keys: the file's, then environment variables, then flags."""
    top = {k: v for k, v in data.items() if not isinstance(v, dict) and k != "presets"}
    for key, env_name in (
        ("host", "STREAMCHAT_HOST"),
        ("port", "STREAMCHAT_PORT"),
        ("db", "STREAMCHAT_DB"),
        ("log_level", "STREAMCHAT_LOG_LEVEL"),
        ("log_format", "STREAMCHAT_LOG_FORMAT"),
        ("default_provider", "STREAMCHAT_DEFAULT_PROVIDER"),
        ("tls_cert", "STREAMCHAT_TLS_CERT"),
        ("tls_key", "STREAMCHAT_TLS_KEY"),
    ):
        if env.get(env_name):
            top[key] = env[env_name]
    for key in ("host", "port", "db", "log_level", "tls_cert", "tls_key"):
        if key in cli:
            top[key] = cli[key]
    kwargs: dict[str, Any] = _section(Settings, top, "top level")
    if kwargs.get("log_format", "text") not in ("text", "json"):
        raise SettingsError("log_format must be 'text' or 'json'")
    if bool(kwargs.get("tls_cert")) != bool(kwargs.get("tls_key")):
        raise SettingsError("tls_cert and tls_key go together: set both to serve HTTPS, or neither")
    return kwargs


def _streaming_and_local(
    data: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[StreamingSettings, LocalSettings]:
    streaming = dict(data.get("streaming", {}))
    if env.get("STREAMCHAT_STREAMING_ENABLED"):
        streaming["enabled"] = env["STREAMCHAT_STREAMING_ENABLED"]
    local = dict(data.get("local", {}))
    if env.get("STREAMCHAT_LOCAL_MODEL_PATH"):
        local["model_path"] = env["STREAMCHAT_LOCAL_MODEL_PATH"]
    stream_settings = StreamingSettings(**_section(StreamingSettings, streaming, "streaming"))
    if stream_settings.on_disconnect not in ("continue", "cancel"):
        raise SettingsError("streaming.on_disconnect must be 'continue' or 'cancel'")
    for name in POSITIVE_STREAMING:  # 0 would spin a loop or cut every client at once
        if not getattr(stream_settings, name) > 0:
            raise SettingsError(f"streaming.{name} must be positive")
    if stream_settings.shutdown_grace < 0:
        raise SettingsError("streaming.shutdown_grace must not be negative")
    return stream_settings, LocalSettings(**_section(LocalSettings, local, "local"))


# The bundled model as a provider: loading and a first answer on a slow laptop take a while.
LOCAL_PROVIDER = ProviderSettings(
    name="local",
    kind="local",
    models=("smollm2-135m-instruct",),
    default_model="smollm2-135m-instruct",
    first_token_timeout=120.0,
    retries=0,
)


def _providers(
    data: Mapping[str, Any], env: Mapping[str, str], local_enabled: bool
) -> dict[str, ProviderSettings]:
    """The presets (unless `presets = false`), merged with the file's [providers.*]."""
    raw_providers: dict[str, dict[str, Any]] = {}
    if data.get("presets", True) is not False:
        raw_providers.update({k: dict(v) for k, v in PRESETS.items()})
    for name, pdata in data.get("providers", {}).items():
        if not isinstance(pdata, dict):
            raise SettingsError(f"providers.{name} must be a table")
        raw_providers[name] = {**raw_providers.get(name, {}), **pdata}
    if env.get("OPENAI_BASE_URL") and "openai" in raw_providers:
        raw_providers["openai"].setdefault("base_url", env["OPENAI_BASE_URL"])
    providers = {name: _provider(name, p, env) for name, p in raw_providers.items()}
    if local_enabled and "local" not in providers:
        providers["local"] = LOCAL_PROVIDER
    return providers


def _read_config(config_path: str | None) -> dict[str, Any]:
    if not config_path:
        return {}
    try:
        with open(config_path, "rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except OSError as exc:
        raise SettingsError(f"cannot read config file {config_path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {config_path}: {exc}") from exc


def load_settings(
    config_path: str | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from defaults < config file < env vars < CLI flags."""
    env = os.environ if env is None else env
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    data = _read_config(cli.get("config") or config_path or env.get("STREAMCHAT_CONFIG"))
    kwargs = _top_level(data, env, cli)
    kwargs["streaming"], kwargs["local"] = _streaming_and_local(data, env)
    kwargs["providers"] = _providers(data, env, kwargs["local"].enabled)
    kwargs["auth"] = _auth(data.get("auth", {}), env)
    kwargs["limits"] = _limits(data.get("limits", {}))
    kwargs["metrics"] = _metrics(data.get("metrics", {}), env)
    settings = Settings(**kwargs)
    if settings.default_provider not in kwargs["providers"]:
        raise SettingsError(f"default_provider {settings.default_provider!r} is not configured")
    return settings
