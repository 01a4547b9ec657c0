"""What a benchmark stream asks for and what its answer must be, byte for byte.

The request travels inside the last user message ("bench id=<id> n=<tokens> ms=<pace>"),
so it reaches the fake upstream unchanged whether the load generator talks to it
directly or through streamchat. The answer is a deterministic function of the id,
so every stream can be checked byte-exactly on arrival.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

# Mostly word-like tokens, plus the ones relays get wrong: multi-byte UTF-8, emoji
# (a surrogate pair in escaped JSON), newlines and CRs (SSE line breaks if unescaped),
# "data:" and "id:" look-alikes, quotes, backslashes, a JS line separator.
VOCAB: tuple[str, ...] = (
    " the",
    " stream",
    " token",
    ",",
    " relay",
    ".",
    " é",
    "中文",
    " 🙂",
    "\n",
    "\n\ndata: [DONE]\n\n",
    "id: 7\r\n",
    ' "quoted"',
    " back\\slash",
    "\t",
    "\u2028",
    " a",
    " of",
    " model",
    " ok",
)

_SPEC_RE = re.compile(r"bench id=(\S+) n=(\d+) ms=(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class StreamSpec:
    """One benchmark stream: its id, how many tokens, and the pause before each token."""

    id: str
    tokens: int
    pace_ms: float = 0.0
    text: str = ""  # for a real model: the prompt to send instead of the spec

    def prompt(self) -> str:
        """The user message that carries this spec to the upstream."""
        return self.text or f"bench id={self.id} n={self.tokens} ms={self.pace_ms:g}"

    def token(self, i: int) -> str:
        """The i-th token of the answer."""
        return VOCAB[(_seed(self.id) + i * 7) % len(VOCAB)]

    def expected(self) -> str:
        """The whole answer."""
        return "".join(self.token(i) for i in range(self.tokens))


def _seed(stream_id: str) -> int:
    return zlib.crc32(stream_id.encode())


def parse(prompt: str) -> StreamSpec | None:
    """The spec inside a prompt, or None when the prompt carries none."""
    m = _SPEC_RE.search(prompt)
    if m is None:
        return None
    return StreamSpec(m.group(1), int(m.group(2)), float(m.group(3)))
