"""The real server as a child process: start, wait for health, SIGKILL/SIGTERM, restart.

Used by the chaos and soak suites. The process runs `run.py` from the repo's venv
with a temp TOML config and database; its output goes to a log file whose tail is
shown when it fails to come up. Always `stop()` it in a finally or fixture teardown.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl as ssl_module
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
START_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def upstream_config(
    base_url: str,
    *,
    streaming: Mapping[str, Any] | None = None,
    provider: Mapping[str, Any] | None = None,
) -> str:
    """A TOML config: one OpenAI-compatible provider `up` (no key) at base_url, no limits."""
    sections: dict[str, dict[str, Any]] = {
        "local": {"enabled": False},
        "streaming": {"flush_interval": 0.25, **(streaming or {})},
        # 0 turns a per-user limit off: the suites start far more runs than a person
        "limits": {
            "streams_per_minute": 0,
            "stream_burst": 0,
            "concurrent_runs": 0,
            "tokens_per_day": 0,
            "max_conversations": 0,
        },
        "providers.up": {
            "kind": "openai",
            "base_url": base_url,
            "models": ["m"],
            "retries": 0,
            **(provider or {}),
        },
    }
    lines = ["presets = false", 'default_provider = "up"']
    for name, values in sections.items():
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


class ServerProcess:
    """One streamchat server process on a fixed port and database, restartable."""

    def __init__(
        self,
        workdir: Path,
        config: str,
        *,
        log_level: str = "INFO",
        port: int | None = None,
        entry: str = "run.py",
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.workdir = workdir
        self.config_path = workdir / "streamchat.toml"
        self.config_path.write_text(config)
        self.db = workdir / "streamchat.db"
        self.log_path = workdir / "server.log"
        self.port = port or free_port()
        self.log_level = log_level
        self.entry = entry  # the script to run (relative to the repo root)
        self.ssl = ssl  # trusts the server's certificate when it serves HTTPS
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self.proc is not None, "server is not running"
        return self.proc.pid

    async def start(self) -> None:
        """Start the process and wait until /api/v1/healthz answers 200."""
        self.spawn()
        await self.wait_healthy()

    def spawn(self) -> None:
        """Start the process without waiting for it."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    str(PYTHON),
                    self.entry,
                    "--config",
                    str(self.config_path),
                    "--port",
                    str(self.port),
                    "--db",
                    str(self.db),
                    "--log-level",
                    self.log_level,
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
            )

    async def wait_healthy(self, within: float = START_TIMEOUT) -> dict[str, Any]:
        """Poll healthz until it answers 200; fail with the log tail if the process dies."""
        deadline = time.monotonic() + within
        connector = aiohttp.TCPConnector(ssl=self.ssl) if self.ssl else None
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"server exited while starting:\n{self.log_tail()}")
                try:
                    async with session.get(
                        self.url + "/api/v1/healthz", timeout=aiohttp.ClientTimeout(total=2)
                    ) as resp:
                        if resp.status == 200:
                            body: dict[str, Any] = await resp.json()
                            return body
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not healthy after {within} s:\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    def kill(self) -> float:
        """SIGKILL the process, reap it, and return the monotonic time of the kill."""
        assert self.proc is not None
        at = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return at

    async def terminate(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """SIGTERM the process and return its exit code (SIGKILL after timeout)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait(10)
                raise RuntimeError(f"server ignored SIGTERM for {timeout} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        return int(self.proc.returncode)

    async def restart(self) -> float:
        """SIGKILL and start again on the same port and database; returns the kill time."""
        at = self.kill()
        await self.start()
        return at

    def stop(self) -> None:
        """Kill the process if it still runs (for finally blocks)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def rss_kib(self) -> int:
        """The process's resident set size (VmRSS) in KiB."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def print_now(*args: Any) -> None:
    """Print to the real stdout at once (shown with pytest -s, and in the -rA summary)."""
    print(*args, flush=True, file=sys.stdout)
