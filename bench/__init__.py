"""The relay benchmark: a fake OpenAI-compatible upstream, a load generator and a runner.

`python -m bench.run` (or `make bench`) measures streamchat against the upstream
directly in the same run; see docs/performance.md.
"""
