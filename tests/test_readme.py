"""The README stays true to the code it describes."""

from __future__ import annotations

import re

from pydantic import BaseModel

from gateway.api.protocol import SeedRequest
from gateway.registry.config import (
    Auth,
    Batching,
    CommandEngine,
    GatewaySettings,
    Generation,
    Limits,
    ModelEntry,
    PythonEnv,
    Upstream,
)
from tests.support import ROOT

README = (ROOT / "README.md").read_text()


def code_blocks() -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)


def test_it_opens_with_the_two_commands() -> None:
    first = code_blocks()[0]
    assert [line.split("#")[0].strip() for line in first.splitlines()] == [
        "make serve",
        "make test",
    ]


def test_it_shows_the_seed_curl_example() -> None:
    assert (
        "curl -X POST localhost:6006/demo -H 'Content-Type: application/json' "
        """-d '{"prompt": "你好", "max_length": 16}'"""
    ) in README


def test_every_registry_key_is_documented() -> None:
    sections: list[type[BaseModel]] = [
        GatewaySettings,
        ModelEntry,
        Generation,
        Limits,
        Batching,
        Auth,
        PythonEnv,
        Upstream,
        CommandEngine,
    ]
    missing = [
        f"{section.__name__}.{key}"
        for section in sections
        for key in section.model_fields
        if not re.search(rf"[`{{ ]{key}[`}},:]", README)
    ]
    assert missing == []


def test_every_seed_body_field_is_documented() -> None:
    assert [key for key in SeedRequest.model_fields if f"`{key}`" not in README] == []


def test_it_links_the_seed_model_guide() -> None:
    assert "## Serving the seed models on a GPU box" in README
    assert "(docs/SEED_MODELS.md)" in README
