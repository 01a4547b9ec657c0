"""HTTPS without a proxy: the server's TLS context from `tls_cert` / `tls_key`.

A team reaching the server over a network sends API keys and session cookies with
every request; without TLS (here, or in a proxy in front) anyone on the path reads
them. A bad certificate or key is a one-line startup error, never a traceback.
"""

from __future__ import annotations

import ssl

from app.auth import is_loopback
from app.settings import Settings, SettingsError


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context to serve with, or None for plain HTTP; SettingsError says what is wrong."""
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # TLS 1.2 or later
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as exc:  # (an OSError too: first)
        raise SettingsError(
            f"tls_cert {settings.tls_cert} and tls_key {settings.tls_key} do not make a "
            f"certificate and its key in PEM ({exc.reason or exc})"
        ) from None
    except OSError as exc:  # missing, a directory, no permission
        raise SettingsError(
            f"cannot read {exc.filename or 'tls_cert/tls_key'}: {exc.strerror}"
        ) from None
    return ctx


def cleartext_warning(settings: Settings) -> str | None:
    """A warning when API keys would cross a network unencrypted, or None."""
    if settings.tls_cert or is_loopback(settings.host) or settings.auth.mode != "api_key":
        return None
    return (
        f"serving plain HTTP on {settings.host}: API keys and session cookies cross the "
        "network unencrypted. Set tls_cert and tls_key, or put a TLS proxy in front and "
        "listen on 127.0.0.1."
    )
