"""Which changes to a model's entry its running process must be restarted for.

The gateway applies some fields itself, on every request or every decision, reading the
entry in force each time: a reload that changes only those keeps the loaded model (a 16B
model is not reloaded for a new system prompt). Everything else (weights, engine, devices,
memory, the worker's own settings) reaches the model's process when it starts, so a change
to it restarts the model, or on a cluster rolls its replicas over.
"""

from __future__ import annotations

from typing import Any

from gateway.registry.config import ModelEntry

# Read by the gateway per request: the card's text, the system prompt it inserts, the
# sampling defaults it fills in, and the request checks it makes before forwarding.
PER_REQUEST_FIELDS = ("description", "system_prompt", "generation")
# Except the default token count for the gateway's own worker: the worker takes it at its
# start, to clamp it to the room each prompt leaves in the context. To a relayed engine
# (vLLM, a command, an upstream) the gateway sends it with every request.
WORKER_GENERATION = ("max_new_tokens",)
PER_REQUEST_LIMITS = ("max_new_tokens", "max_messages", "queue_timeout_s")
# Applied by the gateway on one machine (its queue, its idle reaper, its eviction); on a
# cluster they are Serve options of the model's deployment, so they are not listed here.
LOCAL_POLICY_FIELDS = ("idle_unload_s", "pinned")
LOCAL_POLICY_LIMITS = ("max_queue",)


def restart_needed(old: ModelEntry, new: ModelEntry, *, cluster: bool) -> bool:
    """Whether `new` differs from `old` in anything the model's process read at its start."""
    return _what_a_start_reads(old, cluster) != _what_a_start_reads(new, cluster)


def what_a_replica_reads(entry: ModelEntry) -> ModelEntry:
    """The entry as a cluster replica sees it: without the fields the gateway applies and
    those that are Serve's options of the deployment (its replica counts, idle time and
    queue), which Serve changes without restarting replicas."""
    return _what_a_start_reads(entry, cluster=False).model_copy(update={"replicas": None})


def _what_a_start_reads(entry: ModelEntry, cluster: bool) -> ModelEntry:
    fields = PER_REQUEST_FIELDS + (() if cluster else LOCAL_POLICY_FIELDS)
    limits = PER_REQUEST_LIMITS + (() if cluster else LOCAL_POLICY_LIMITS)
    # Blanked, not validated: the copies are only compared with each other.
    update: dict[str, Any] = dict.fromkeys(fields)
    if not entry.relays:
        kept = {name: getattr(entry.generation, name) for name in WORKER_GENERATION}
        update["generation"] = kept
    update["limits"] = entry.limits.model_copy(update=dict.fromkeys(limits))
    return entry.model_copy(update=update)
