"""What one replica of a model asks the Ray scheduler for, and whether any node has it.

GPUs come from `devices` (how many, not which: the node's GPUs are Ray's to hand out),
CPUs from `threads` (one when unset: the worker's own share), custom resources from
`resources`. A model that no node of the cluster could ever hold is refused at once with
the resource named, where Ray itself would leave the replica pending forever.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gateway.registry.config import ModelEntry


def replica_resources(entry: ModelEntry) -> dict[str, float]:
    """The resources one replica holds while it runs."""
    needs: dict[str, float] = {"CPU": float(entry.threads or 1)}
    if isinstance(entry.devices, list):
        needs["GPU"] = float(len(entry.devices))
    needs.update(entry.resources)
    return needs


def actor_options(entry: ModelEntry) -> dict[str, Any]:
    """`ray_actor_options` for the model's deployment."""
    needs = replica_resources(entry)
    custom = {k: v for k, v in needs.items() if k not in ("CPU", "GPU")}
    options: dict[str, Any] = {"num_cpus": needs["CPU"], "num_gpus": needs.get("GPU", 0.0)}
    if custom:
        options["resources"] = custom
    if entry.env:
        options["runtime_env"] = {"env_vars": dict(entry.env)}
    return options


def unfit(needs: Mapping[str, float], nodes: Iterable[Mapping[str, float]]) -> str | None:
    """Why no node can hold one replica (None: some node can), naming the resource."""
    totals = list(nodes)
    if not totals:
        return "the cluster has no live node"
    if any(all(node.get(k, 0.0) >= v for k, v in needs.items()) for node in totals):
        return None
    wanted = ", ".join(f"{k}: {v:g}" for k, v in sorted(needs.items()))
    short = sorted({k for k, v in needs.items() if max(n.get(k, 0.0) for n in totals) < v})
    if short:
        most = ", ".join(f"{k} {max(n.get(k, 0.0) for n in totals):g}" for k in short)
        return (
            f"no node of the cluster has {' and '.join(short)} enough for one replica "
            f"({wanted}); the most any node has: {most}"
        )
    return f"no single node of the cluster has all of {wanted} at once"


def live_nodes() -> list[dict[str, float]]:
    """The total resources of every live node."""
    import ray

    nodes: list[dict[str, Any]] = ray.nodes()
    return [dict(node["Resources"]) for node in nodes if node.get("Alive")]
