"""Summarize py-spy collapsed stacks: where the server's time goes, by self and total time.

`python -m bench.profile bench/results/profile/throughput.txt [--top 25]`
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter


def load(path: str) -> list[tuple[list[str], int]]:
    """(frames root-first, sample count) per line of a collapsed-stack file."""
    out = []
    with open(path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                out.append((stack.split(";"), int(count)))
    return out


def _name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{func} ({path.rsplit('/', 1)[-1]})" if path else func


def summarize(stacks: list[tuple[list[str], int]], top: int) -> str:
    """Self and inclusive time per function, as text."""
    total = sum(c for _, c in stacks) or 1
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, count in stacks:
        names = [_name(f) for f in frames]
        if names:
            own[names[-1]] += count
        for n in set(names):
            incl[n] += count
    lines = [f"{total} samples", "", "self %  function"]
    lines += [f"{100 * c / total:6.1f}  {n}" for n, c in own.most_common(top)]
    lines += ["", "total % function"]
    lines += [f"{100 * c / total:6.1f}  {n}" for n, c in incl.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("path")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    print(summarize(load(args.path), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
