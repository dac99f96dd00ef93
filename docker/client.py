"""HTTP checks that docker/test.sh runs against a gateway in a container (stdlib only).

python3 docker/client.py URL health|seed|requests|vllm
python3 docker/client.py URL drain "COMMAND THAT SENDS SIGTERM"
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any


def post(url: str, body: dict[str, Any], timeout: float = 120) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=timeout)


def health(base: str) -> None:
    with urllib.request.urlopen(f"{base}/health", timeout=5) as reply:
        assert reply.status == 200, reply.status


def wait(base: str) -> None:
    for _ in range(120):
        try:
            return health(base)
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{base} did not become healthy")


def seed(base: str) -> None:
    with post(f"{base}/demo", {"prompt": "你好", "max_length": 16}) as reply:
        answer = json.load(reply)
    assert answer["status"] == 200 and answer["model"] == "demo" and answer["response"], answer
    print("seed:", answer["response"])


def stream_chat(
    base: str, model: str, max_tokens: int, at: dict[int, Callable[[], None]] | None = None
) -> dict[str, Any]:
    """A streamed chat; `at[n]` runs once the n-th chunk has arrived."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": max_tokens, "stream": True}  # fmt: skip
    text, finish, chunks = "", None, 0
    with post(f"{base}/v1/chat/completions", body) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            chunks += 1
            if at and chunks in at:
                at[chunks]()
            for choice in chunk.get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
                finish = choice.get("finish_reason") or finish
    return {"text": text, "finish_reason": finish, "chunks": chunks}


def requests(base: str) -> None:
    health(base)
    seed(base)
    chat = stream_chat(base, "demo", 32)
    assert chat["text"] and chat["finish_reason"] in ("stop", "length"), chat
    print("stream:", chat)


def vllm(base: str) -> None:
    """A chat completion from the demo model served by vLLM (`engine: vllm`), through the
    gateway; /v1/models then shows it ready on that engine."""
    body = {"model": "demo-vllm", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8, "temperature": 0}  # fmt: skip
    with post(f"{base}/v1/chat/completions", body, timeout=300) as reply:
        answer = json.load(reply)
    assert answer["choices"][0]["message"]["content"], answer
    assert answer["usage"]["completion_tokens"] > 0, answer
    with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as reply:
        [model] = [m for m in json.load(reply)["data"] if m["id"] == "demo-vllm"]
    assert model["state"] == "ready" and model["engine"] == "vllm", model
    print("vllm chat:", answer["choices"][0]["message"]["content"], answer["usage"])


def cluster(base: str) -> None:
    """The demo model deployed on the container's own Ray (`serve --cluster ray`): the seed
    route answers, and /v1/models shows the replica that served it."""
    seed(base)
    with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as reply:
        [model] = [m for m in json.load(reply)["data"] if m["id"] == "demo"]
    replicas = (model["runtime"] or {}).get("cluster", {}).get("replicas", [])
    assert model["state"] == "ready" and replicas and replicas[0]["node"], model
    print("cluster replicas:", replicas)


def not_ready(base: str) -> None:
    try:
        urllib.request.urlopen(f"{base}/ready", timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.code == 503, exc.code
        return
    raise AssertionError("the gateway still reports ready while it drains")


def drain(base: str, command: str) -> None:
    """SIGTERM while a long reply streams: the gateway stops being ready, the reply finishes."""

    def signal() -> None:
        subprocess.run(command, shell=True, check=True)

    chat = stream_chat(base, "long", 800, at={1: signal, 300: lambda: not_ready(base)})
    assert chat["finish_reason"] == "length" and chat["chunks"] > 300, chat
    print(
        f"drain: not ready after SIGTERM; the in-flight stream finished ({chat['chunks']} chunks)"
    )


def host_network(port: str) -> None:
    """`docker-compose config` on stdin, out the same services on the host's network.

    An engine started with --bridge=none has no bridge to publish ports from, and
    docker-compose 1.29 cannot drop a `ports:` list in an override file; everything else
    (volumes, healthcheck, profiles, stop settings) stays as compose.yaml says.
    """
    import yaml  # not stdlib: only this check needs it

    config = yaml.safe_load(sys.stdin)
    config.pop("networks", None)
    for service in config["services"].values():
        service.pop("ports", None)
        service.pop("networks", None)
        service["network_mode"] = "host"
        service.setdefault("environment", {})["LLMGW_HEALTH_URL"] = (
            f"http://127.0.0.1:{port}/health"
        )
        service["command"] = ["serve", "--config", "/etc/llm-gateway/models.yaml",
                              "--host", "127.0.0.1", "--port", port]  # fmt: skip
    yaml.safe_dump(config, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    if sys.argv[1] == "host-network":
        host_network(sys.argv[2])
        sys.exit(0)
    base, what, *rest = sys.argv[1:]
    checks: dict[str, Callable[..., None]] = {
        "health": health, "wait": wait, "seed": seed, "requests": requests, "drain": drain,
        "vllm": vllm, "cluster": cluster,
    }  # fmt: skip
    checks[what](base, *rest)
