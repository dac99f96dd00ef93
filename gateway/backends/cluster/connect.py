"""Joining (or starting) the Ray cluster that `serve --cluster` deploys models onto.

Addresses: `ray` starts a local Ray for this gateway alone (and stops it on shutdown);
`ray:auto` / `ray:HOST:PORT` joins a running cluster by its GCS address; `ray://HOST:PORT`
goes through Ray Client. The cluster's auth token is Ray's own business: it reads
`RAY_AUTH_TOKEN` or the file `RAY_AUTH_TOKEN_PATH` names (never models.yaml). A local Ray
keeps its files under a temporary directory, with no dashboard and no usage reporting.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SERVE_NAMESPACE = "llm-gateway"


class ClusterUnavailable(Exception):
    """Ray is not installed, or the cluster cannot be reached."""


@dataclass
class RayCluster:
    address: str
    started_here: bool
    temp_dir: str | None

    def close(self) -> None:
        """Disconnect; a Ray this gateway started stops with every process it ran."""
        import ray

        ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def ray_address(cluster: str) -> str | None:
    """What `ray.init(address=...)` takes for a `gateway.cluster` value (None: start one)."""
    if cluster == "ray":
        return None
    if cluster.startswith("ray://"):
        return cluster
    return cluster.removeprefix("ray:")


def connect(cluster: str, *, num_cpus: int | None = None) -> RayCluster:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The gateway's handles report queued requests each second, not every 10 s: a model at
    # zero replicas starts one that much sooner.
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ClusterUnavailable(
            f"`--cluster {cluster}` needs Ray Serve: pip install 'llm-gateway[cluster]' ({exc})"
        ) from None
    address = ray_address(cluster)
    options: dict[str, Any] = {
        "namespace": SERVE_NAMESPACE,
        "log_to_driver": False,  # each replica's worker log stays in the cluster's logs
        "configure_logging": False,
    }
    temp_dir = None
    if address is None:
        # Ray's sockets live under its temp dir, whose path must stay short.
        temp_dir = tempfile.mkdtemp(prefix="llmgw-ray-", dir="/tmp")
        options.update(include_dashboard=False, _temp_dir=temp_dir, num_cpus=num_cpus)
    # ray.init makes SIGTERM a bare sys.exit; the gateway drains on SIGTERM, as on one machine.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, **options)
        serve.start(http_options={"location": "NoServer"})  # the gateway is the front door
    except Exception as exc:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise ClusterUnavailable(f"could not join the Ray cluster {cluster!r}: {exc}") from exc
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    log.info("serving on the Ray cluster %s", cluster)
    return RayCluster(cluster, started_here=address is None, temp_dir=temp_dir)
