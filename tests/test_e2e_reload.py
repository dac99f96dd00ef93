"""Hot reload through the real gateway: what a reload reports is what the gateway does."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx

from tests.support import running, wait_until, write_config

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def registry(tiny_model: Path, gateway: str = "") -> str:
    return f"""
    gateway:
      default_model: tiny
      watch_config: false
      {gateway}
    models:
      tiny: {{source: {tiny_model}}}
    """


def test_turning_auth_on_by_reload_makes_unauthenticated_requests_401(
    tiny_model: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-one\nsk-two\n")
    config = write_config(tmp_path, registry(tiny_model))
    with running(config) as gw:
        assert gw.client.get("/v1/models").status_code == 200
        write_config(tmp_path, registry(tiny_model, f"auth: {{api_keys_file: {keys}}}"))
        report = gw.client.post("/admin/reload").json()
        assert report["applied"] is True and report["restart_required"] == []
        assert gw.client.get("/v1/models").status_code == 401
        one = {"Authorization": "Bearer sk-one"}
        two = {"Authorization": "Bearer sk-two"}
        assert gw.post("/v1/chat/completions", CHAT, headers=one).status_code == 200
        keys.write_text("sk-one\n")  # sk-two revoked
        assert gw.client.post("/admin/reload", headers=one).json()["keys_changed"] is True
        assert gw.client.get("/v1/models", headers=two).status_code == 401
        assert gw.client.get("/v1/models", headers=one).status_code == 200
        keys.unlink()  # a key source gone: the reload is refused, the keys in force stay
        rejected = gw.client.post("/admin/reload", headers=one)
        assert rejected.status_code == 400
        assert "gateway.auth.api_keys_file" in rejected.json()["error"]["message"]
        assert gw.client.get("/v1/models", headers=one).status_code == 200


def test_lowering_max_body_bytes_by_reload_refuses_larger_bodies(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, registry(tiny_model))
    big = json.dumps(CHAT) + " " * 5000  # 5 KB of body, the same small request
    headers = {"Content-Type": "application/json"}
    with running(config) as gw:
        assert (
            gw.client.post("/v1/chat/completions", content=big, headers=headers).status_code == 200
        )
        write_config(tmp_path, registry(tiny_model, "max_body_bytes: 1000"))
        assert gw.client.post("/admin/reload").json()["restart_required"] == []
        refused = gw.client.post("/v1/chat/completions", content=big, headers=headers)
        assert refused.status_code == 413
        assert gw.post("/v1/chat/completions", CHAT).status_code == 200


def test_a_changed_port_is_reported_as_needing_a_restart_and_logged(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, registry(tiny_model))
    with running(config) as gw:
        write_config(tmp_path, registry(tiny_model, "port: 6123\n      host: 0.0.0.0"))
        report = gw.client.post("/admin/reload").json()
        assert report["restart_required"] == ["host", "port"]
        assert wait_until(lambda: "takes effect after a restart" in gw.log.read_text())
        assert gw.client.get("/health").status_code == 200  # still where it was


def test_a_bad_byte_is_rejected_and_the_watcher_applies_the_next_good_edit(
    tiny_model: Path, tmp_path: Path
) -> None:
    good = registry(tiny_model).replace("watch_config: false", "watch_config: true")
    config = write_config(tmp_path, good)
    with running(config) as gw:
        config.write_bytes(config.read_bytes().replace(b"tiny:", b"ti\xffny:"))
        assert wait_until(lambda: gw.client.get("/admin/config").json()["last_error"], timeout=10)
        rejected = gw.client.post("/admin/reload")
        assert rejected.status_code == 400
        assert "not valid UTF-8" in rejected.json()["error"]["message"]
        renamed = good.replace("tiny: {", "tiny2: {").replace("model: tiny", "model: tiny2")
        write_config(tmp_path, renamed)
        assert wait_until(lambda: "tiny2" in gw.models(), timeout=10)
        assert gw.client.get("/admin/config").json()["last_error"] is None


def alias_bomb() -> str:
    lines = ["x:", "  a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in range(1, 7):
        lines.append(f"  a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    return "\n".join([*lines, "gateway:", "  memory_budget: {cpu: *a6}", "models: {}", ""])


def test_an_alias_bomb_is_refused_quickly_with_a_short_error_and_health_answers(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, registry(tiny_model))
    with running(config) as gw:
        config.write_text(alias_bomb())
        health: list[int] = []
        done = threading.Event()

        def probe_health() -> None:
            with httpx.Client(base_url=gw.url, timeout=5) as client:
                while not done.is_set():
                    health.append(client.get("/health").status_code)
                    time.sleep(0.01)

        prober = threading.Thread(target=probe_health)
        prober.start()
        assert wait_until(lambda: bool(health))  # probing before the reload starts
        try:
            rejected = gw.client.post("/admin/reload")
        finally:
            done.set()
            prober.join()
        assert rejected.status_code == 400
        message = rejected.json()["error"]["message"]
        assert "once its aliases are expanded" in message and len(message) < 2000
        assert set(health) == {200}
        assert len(gw.client.get("/admin/config").text) < 20_000


def test_a_new_system_prompt_or_request_limit_keeps_the_loaded_worker(
    tiny_model: Path, tmp_path: Path
) -> None:
    """What the gateway applies per request takes effect at the next request; what the
    worker read at its start (here `threads`) restarts it."""

    def text(prompt: str, extra: str = "") -> str:
        return f"""
        gateway: {{watch_config: false}}
        models:
          tiny:
            source: {tiny_model}
            system_prompt: {json.dumps(prompt)}
            {extra}
        """

    config = write_config(tmp_path, text("Be brief."))
    with running(config) as gw:
        first = gw.post("/v1/chat/completions", CHAT)
        assert first.status_code == 200, first.text
        pid = gw.models()["tiny"]["pid"]
        retuned = text(
            "You are a careful assistant who answers every question in full sentences.",
            "description: retuned\n            limits: {max_messages: 1}",
        )
        write_config(tmp_path, retuned)
        report = gw.client.post("/admin/reload").json()
        assert report["changed"] == ["tiny"] and report["retuned"] == ["tiny"], report
        card = gw.models()["tiny"]
        assert card["state"] == "ready" and card["pid"] == pid
        assert card["description"] == "retuned"
        second = gw.post("/v1/chat/completions", CHAT)
        assert second.status_code == 200, second.text
        tokens = (r.json()["usage"]["prompt_tokens"] for r in (first, second))
        assert next(tokens) < next(tokens)  # the new system prompt reached the model
        two = {**CHAT, "messages": [{"role": "user", "content": "hi"}] * 2}
        refused = gw.post("/v1/chat/completions", two)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"
        assert gw.models()["tiny"]["pid"] == pid

        write_config(tmp_path, retuned + "    threads: 1\n")
        report = gw.client.post("/admin/reload").json()
        assert report["changed"] == ["tiny"] and report["retuned"] == [], report
        assert gw.post("/v1/chat/completions", CHAT).status_code == 200
        assert gw.models()["tiny"]["pid"] not in (None, pid)
