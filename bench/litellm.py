"""LiteLLM's proxy as another column: the same fake upstream, relayed by the gateway we compare.

Installed from PyPI into its own virtualenv (`bench/.venv-litellm`, made on first use;
about a minute) so none of its dependencies touch streamchat's. Started with one worker,
pinned to the server's core while streamchat idles, as the issue's reference figures were.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from bench import procs

VERSION = "1.108.7"
VENV = os.path.join(procs.ROOT, "bench", ".venv-litellm")
# LiteLLM refuses to start without a master key; the load generator sends this one
MASTER_KEY = "sk-bench-" + "0123456789abcdef" * 2
HEADERS = {"Authorization": f"Bearer {MASTER_KEY}"}


def ensure_installed() -> str:
    """The `litellm` command of the bench's LiteLLM virtualenv, installed if missing."""
    exe = os.path.join(VENV, "bin", "litellm")
    marker = os.path.join(VENV, f".litellm-{VERSION}")
    if os.path.exists(exe) and os.path.exists(marker):
        return exe
    print(f"installing litellm[proxy]=={VERSION} into {VENV} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True)
    pip = [os.path.join(VENV, "bin", "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"litellm[proxy]=={VERSION}"], check=True)
    open(marker, "w").close()
    return exe


def write_config(path: str, upstream: str) -> None:
    """The proxy's config: one model, `bench`, at the fake upstream."""
    with open(path, "w") as fh:
        fh.write(
            "model_list:\n"
            "  - model_name: bench\n"
            "    litellm_params:\n"
            "      model: openai/bench\n"
            f"      api_base: {upstream}\n"
            "      api_key: none\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
        )


async def start(
    exe: str, cpus: Sequence[int], log_dir: str, upstream: str
) -> tuple[procs.Proc, str]:
    """Start the proxy in front of `upstream` (its …/v1 URL); return it and its URL."""
    port = procs.free_port()
    config = os.path.join(log_dir, "litellm.yaml")
    write_config(config, upstream)
    env = dict(
        os.environ,
        LITELLM_MASTER_KEY=MASTER_KEY,
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # no fetch from GitHub at startup
        LITELLM_LOG="ERROR",
    )
    args = [exe, "--config", config, "--host", "127.0.0.1", "--port", str(port)]
    proc = procs.Proc("litellm", [*args, "--num_workers", "1"], cpus, log_dir, env, pipe=False)
    proc.start()
    base = f"http://127.0.0.1:{port}"
    await procs.wait_healthy(proc, f"{base}/health/liveliness", 120.0, HEADERS)
    return proc, base
