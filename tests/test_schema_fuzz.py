"""Property-based fuzzing of every documented operation (schemathesis, hypothesis).

Whatever the generated input, the gateway answers without a 5xx, every 4xx carries the
OpenAI error envelope, and the gateway stays healthy afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Gateway, write_config

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

GenerationMode = schemathesis.GenerationMode
SKIP = {"/admin/events"}  # an endless event stream, not a request/response operation


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = write_config(
        tmp_path_factory.mktemp("fuzz"),
        f"""
        gateway: {{default_model: tiny, watch_config: false}}
        models:
          tiny:
            source: {tiny_model}
            generation: {{max_new_tokens: 4}}
            limits: {{max_new_tokens: 16, context_length: 256}}
        """,
    )
    with Gateway(config) as gw:
        yield gw


def focused(node: Any) -> Any:
    """The schema, steered where fuzzing finds most: model names drawn from a served one and
    an unknown one (random names only ever reach the 404), and no keep_alive (fuzzing it
    would reload the model for most cases: slow and uninteresting)."""
    if isinstance(node, dict):
        out = {k: focused(v) for k, v in node.items() if k != "keep_alive"}
        properties = out.get("properties")
        if isinstance(properties, dict) and "model" in properties:
            properties["model"] = {"type": "string", "enum": ["tiny", "nope"]}
        if out.get("in") == "path" and out.get("name") in ("model", "name"):
            out["schema"] = {"type": "string", "enum": ["tiny", "nope"]}
        return out
    if isinstance(node, list):
        return [focused(v) for v in node]
    return node


def test_no_input_makes_the_gateway_fail_or_break_its_error_contract(gateway: Gateway) -> None:
    raw = focused(gateway.client.get("/openapi.json").json())
    schema = schemathesis.openapi.from_dict(raw)
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in SKIP:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            check_operation(gateway, operation, mode)
        checked += 1
    assert checked >= 8
    assert gateway.client.get("/health").status_code == 200
    assert gateway.post("/tiny", {"prompt": "still fine", "max_length": 2}).status_code == 200


def check_operation(gateway: Gateway, operation: Any, mode: Any) -> None:
    @hypothesis.settings(  # type: ignore[untyped-decorator]
        max_examples=25,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))  # type: ignore[untyped-decorator]
    def run(case: Any) -> None:
        response = case.call(base_url=gateway.url, timeout=60)
        where = f"{case.method} {case.formatted_path} {case.body!r}"
        assert response.status_code < 500, f"{where} -> {response.status_code} {response.text}"
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, where
            assert error["message"] and "Traceback" not in error["message"], where

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # An operation with no inputs to get wrong (GET /health) has no negative cases.
        assert mode == GenerationMode.NEGATIVE, operation.path
