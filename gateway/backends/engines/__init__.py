"""Engines: what serves a model behind the gateway's one lifecycle.

- `transformers`: the gateway's own worker (`gateway/worker/`, started by `launcher.py`).
- `vllm`: vLLM's OpenAI server, one preset of a started command (`argv.vllm_argv`).
- `command`: any OpenAI-compatible server started from an argv template.

A started engine runs under `guard.py`, which owns its whole process tree: the tree goes
when the gateway stops it, when the engine's main process exits, and when the gateway
dies without a word (EOF on the guard's stdin). `process.py` is the gateway's side: start,
readiness, health path, stop.
"""
