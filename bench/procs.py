"""Processes under test: started pinned to cores, with raised fd limits, sampled from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import IO

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_fd_limit(want: int) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard when allowed) towards `want`; return the soft limit.

    Children inherit it, so call this before starting the server and the upstream.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, PermissionError):
            want = hard
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft


CPU_DMA_LATENCY = "/dev/cpu_dma_latency"


def idle_state() -> str:
    """How this machine's idle cores wait: the cpuidle driver and its halt-polling setting."""
    driver = _read("/sys/devices/system/cpu/cpuidle/current_driver") or "no cpuidle"
    poll_ns = _read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    return driver if poll_ns is None else f"{driver}, guest_halt_poll_ns={poll_ns}"


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


@contextlib.contextmanager
def idle_poll(wanted: bool) -> Iterator[str]:
    """While `wanted`, hold /dev/cpu_dma_latency at 0 µs: idle cores poll instead of halting.

    The request latency benchmarks such as cyclictest make by default. On a virtual
    machine a halted vCPU wakes only when the hypervisor gets to it, and a stream through
    the pinned server crosses between the two cores four times. The kernel drops the
    request when the file is closed. Yields what held: "poll (...)" or "halt (...)".
    """
    if not wanted:
        yield f"halt ({idle_state()})"
        return
    try:
        fd = os.open(CPU_DMA_LATENCY, os.O_RDWR)
    except OSError as exc:
        print(f"--idle-poll: cannot open {CPU_DMA_LATENCY} ({exc}); idle cores halt", flush=True)
        yield f"halt ({idle_state()}; --idle-poll refused: {exc.strerror})"
        return
    try:
        os.write(fd, struct.pack("i", 0))
        yield f"poll ({CPU_DMA_LATENCY} held at 0 µs; {idle_state()})"
    finally:
        os.close(fd)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(cpus: Sequence[int], pid: int = 0) -> None:
    """Restrict a process (0: this one) to `cpus`, ignoring cores that do not exist.

    Checked against the machine's cores, not the caller's affinity: a child starts with
    its parent's, and the load generator pins itself to the client core before it starts
    the server (checking against that put the server on the client core too).
    """
    available = set(range(os.cpu_count() or 1))
    wanted = {c for c in cpus if c in available} or available
    os.sched_setaffinity(pid, wanted)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # after the ")" of comm: field 3 is index 0, so utime (14) and stime (15) are 11 and 12
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kb(pid: int) -> int:
    """Resident set size of a process in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


class Proc:
    """A child process pinned to some cores, its stderr kept in a log file."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        cpus: Sequence[int],
        log_dir: str,
        env: Mapping[str, str] | None = None,
        pipe: bool = True,
    ) -> None:
        """`pipe`: stdout readable with read_line (else it goes to the log with stderr)."""
        self.name = name
        self.args = list(args)
        self.cpus = list(cpus)
        self.env = dict(env) if env is not None else None
        self.pipe = pipe
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        """Start the child; pinned before it runs any of its own code."""
        cpus = self.cpus
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE if self.pipe else self._log,
            stderr=self._log,
            preexec_fn=(lambda: pin(cpus)) if cpus else None,
        )

    def read_line(self, prefix: bytes, timeout: float = 30.0) -> str:
        """Block until the child prints a stdout line starting with `prefix`; return it."""
        assert self.popen is not None and self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.popen.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited early; see {self.log_path}")
            if line.startswith(prefix):
                return line.decode().strip()
        raise RuntimeError(f"{self.name} did not print {prefix!r} in {timeout:g} s")

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to stop (SIGINT), then kill it if it lingers."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(2)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self.popen is not None and self.popen.stdout is not None:
            self.popen.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None


def start_upstream(cpus: Sequence[int], log_dir: str, batch: int = 8) -> tuple[Proc, int, int]:
    """Start the fake upstream; return it, its HTTP/1.1 port and its h2c port."""
    proc = Proc(
        "upstream",
        [sys.executable, "-m", "bench.upstream", "--port", "0", "--batch", str(batch)],
        cpus,
        log_dir,
    )
    proc.start()
    words = proc.read_line(b"port ").split()
    return proc, int(words[1]), int(words[3])


def start_bare_relay(
    cpus: Sequence[int], log_dir: str, upstream: str, backend: str = "aiohttp"
) -> tuple[Proc, str]:
    """Start bench.bare_relay in front of `upstream` (its …/v1 URL); return it and its URL."""
    port = free_port()
    proc = Proc(
        "bare_relay",
        [
            *(sys.executable, "-m", "bench.bare_relay", "--port", str(port)),
            *("--upstream", upstream, "--backend", backend),
        ],
        cpus,
        log_dir,
    )
    proc.start()
    try:
        proc.read_line(b"port ")
    except BaseException:
        proc.stop()
        raise
    return proc, f"http://127.0.0.1:{port}"


def server_config(
    path: str, port: int, upstream_port: int, db: str, local: bool = False, http2: bool = False
) -> None:
    """Write a TOML config: one OpenAI-compatible provider at the fake upstream.

    `local`: the local model on too, and the default provider (for the local level).
    `http2`: the provider speaks HTTP/2 (`upstream_port` is then the upstream's h2c port).
    """
    lines = [
        'host = "127.0.0.1"',
        f"port = {port}",
        f'db = "{db}"',
        'log_level = "INFO"',
        f'default_provider = "{"local" if local else "upstream"}"',
        "presets = false",
        "[local]",
        f"enabled = {'true' if local else 'false'}",
        # one bench user opens thousands of streams: per-user limits off (0)
        "[limits]",
        "streams_per_minute = 0",
        "stream_burst = 0",
        "concurrent_runs = 0",
        "max_tokens = 0",
        "max_message_chars = 0",
        "max_conversations = 0",
        "tokens_per_day = 0",
        "[providers.upstream]",
        'kind = "openai"',
        f'base_url = "http://127.0.0.1:{upstream_port}/v1"',
        'models = ["bench"]',
        f"http2 = {'true' if http2 else 'false'}",
        "retries = 0",  # a failure shows as a failure; timeouts stay at their defaults
    ]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


async def wait_healthy(
    proc: Proc, url: str, wait: float, headers: Mapping[str, str] | None = None
) -> None:
    """Poll `url` until it answers 200; stop `proc` and raise if it exits or time runs out."""
    deadline = time.monotonic() + wait
    async with aiohttp.ClientSession(headers=headers) as session:
        while time.monotonic() < deadline:
            if proc.popen is not None and proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited early; see {proc.log_path}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"{proc.name} did not become healthy in {wait:g} s; see {proc.log_path}")


async def start_server(
    config: str,
    port: int,
    cpus: Sequence[int],
    log_dir: str,
    wait: float = 60.0,
    name: str = "server",
) -> Proc:
    """Start `python run.py --config <config>` and wait until /api/v1/healthz answers."""
    proc = Proc(name, [sys.executable, "run.py", "--config", config], cpus, log_dir)
    proc.start()
    await wait_healthy(proc, f"http://127.0.0.1:{port}/api/v1/healthz", wait)
    return proc


def start_profiler(pid: int, out: str) -> subprocess.Popen[bytes]:
    """Start `py-spy record` on a process (collapsed stacks, native frames off)."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return subprocess.Popen(
        [spy, "record", "-p", str(pid), "-o", out, "-f", "raw", "-r", "250", "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    """Stop py-spy (SIGINT makes it write its output)."""
    proc.send_signal(2)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Sampler:
    """Samples a process's RSS every `interval` seconds (peak kept) while a level runs."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, rss_kb(self.pid))
            await asyncio.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self.cpu0 = cpu_seconds(self.pid)
        self.rss0_kb = rss_kb(self.pid)
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.cpu = cpu_seconds(self.pid) - self.cpu0
        self.peak_kb = max(self.peak_kb, rss_kb(self.pid))
