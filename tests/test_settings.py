"""Settings precedence: defaults < config file < env < CLI; bad settings are clear errors."""

from __future__ import annotations

from typing import Any

import pytest

from app.settings import SettingsError
from app.settings_load import load_settings


def test_precedence(tmp_path: Any) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = 9000\ndb = "file.db"\n[streaming]\nflush_interval = 0.5\n')
    s = load_settings(env={"STREAMCHAT_DB": "env.db"}, cli={"config": str(cfg), "host": "::1"})
    assert (s.port, s.db, s.host) == (9000, "env.db", "::1")
    assert s.streaming.flush_interval == 0.5
    s2 = load_settings(env={"STREAMCHAT_PORT": "7000"}, cli={"config": str(cfg), "port": 7100})
    assert s2.port == 7100


def test_defaults_offer_local_and_keyed_presets(tmp_path: Any) -> None:
    s = load_settings(env={"OPENAI_API_KEY": "sk-canary"})
    assert s.default_provider == "local" and s.port == 8080 and s.db == "./streamchat.db"
    assert s.providers["openai"].api_key is not None
    assert "sk-canary" not in repr(s)
    assert s.providers["deepseek"].api_key is None


def test_bad_settings_are_clear(tmp_path: Any) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[streaming]\nflush_intervall = 1\n")
    with pytest.raises(SettingsError, match="flush_intervall"):
        load_settings(env={}, cli={"config": str(cfg)})
    cfg.write_text('[providers.x]\nkind = "openai"\napi_key = "sk-1"\n')
    with pytest.raises(SettingsError, match="api_key_env"):
        load_settings(env={}, cli={"config": str(cfg)})
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(env={}, cli={"config": str(tmp_path / "missing.toml")})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("heartbeat = 0", "streaming.heartbeat must be positive"),
        ("flush_interval = -1", "streaming.flush_interval must be positive"),
        ("send_timeout = 0", "streaming.send_timeout must be positive"),
        ("subscriber_lag_limit = 0", "streaming.subscriber_lag_limit must be positive"),
        ("shutdown_grace = -5", "streaming.shutdown_grace must not be negative"),
    ],
)
def test_streaming_intervals_must_be_positive(tmp_path: Any, line: str, message: str) -> None:
    """A zero heartbeat or flush interval would spin a loop; say so instead of starting."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[streaming]\n{line}\n")
    with pytest.raises(SettingsError, match=message):
        load_settings(env={}, cli={"config": str(cfg)})
