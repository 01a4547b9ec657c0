"""xllamacpp alone: the same llama.cpp runtime streamchat embeds, loaded the same way.

`python -m bench.llama_alone` prints `address <url>` once llama.cpp's OpenAI-compatible
server listens, then waits until interrupted. The local-model level streams from it
directly and through streamchat, to compare tokens/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from app.settings import LocalSettings
from providers.local import LocalRuntime


async def serve() -> None:
    """Load the model with streamchat's default local settings and wait."""
    runtime = LocalRuntime(LocalSettings())
    reason = runtime.unavailable_reason()
    if reason:
        print(f"unavailable {reason}", flush=True)
        return
    address = await runtime.start()
    print(f"address {address}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        runtime.close()


def main() -> int:
    """Entry point."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
