"""Through the real gateway: one request's settings or prompt never fail the requests it
shares a batch with. Normal requests get exactly the reply they get alone; the bad one a
400 where its settings can never work, or its own 500 where the model's output for its
prompt leaves no token to choose."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Gateway, write_config

NORMAL = ["hello", "你好,你是谁？", "a much longer prompt with many more words in it"]
POISON_PROMPT = "天地玄黄"


def poison_copy(tiny_model: Path, out: Path) -> Path:
    """The tiny model with NaN as the embedding of a token only POISON_PROMPT has."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(tiny_model, out)
    tokenizer = AutoTokenizer.from_pretrained(out)

    def ids(text: str) -> set[int]:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return set(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    only_poison = ids(POISON_PROMPT).difference(*(ids(p) for p in NORMAL))
    assert only_poison, "the poison prompt needs a token of its own"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[min(only_poison)] = math.nan
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("isolation")
    poisoned = poison_copy(tiny_model, folder / "poisoned")
    config = write_config(
        folder,
        f"""
        models:
          tiny:
            source: {tiny_model}
          poisoned:
            source: {poisoned}
        """,
    )
    with Gateway(config) as gw:
        yield gw


def together(gateway: Gateway, path: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: gateway.post(path, body), bodies))


def test_a_vanishing_repetition_penalty_is_refused_and_its_batch_is_unharmed(
    gateway: Gateway,
) -> None:
    normal = [
        {"prompt": p, "max_length": 60, "temperature": 0.7, "seed": i} for i, p in enumerate(NORMAL)
    ]
    alone = [gateway.post("/tiny", body).json()["response"] for body in normal]
    bad = {"prompt": "x", "max_length": 2, "temperature": 1, "repetition_penalty": 1e-38}
    *replies, refused = together(gateway, "/tiny", [*normal, bad])
    assert [(r.status_code, r.json()["response"]) for r in replies] == [(200, a) for a in alone]
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "repetition_penalty"


def test_a_prompt_with_nan_logits_fails_alone_and_the_others_get_their_alone_reply(
    gateway: Gateway,
) -> None:
    normal = [{"prompt": p, "max_length": 30, "temperature": 0} for p in NORMAL]
    alone = [gateway.post("/poisoned", body).json()["response"] for body in normal]
    for temperature in (0, 0.8):
        bad = {"prompt": POISON_PROMPT, "max_length": 30, "temperature": temperature}
        first, failed, *rest = together(gateway, "/poisoned", [normal[0], bad, *normal[1:]])
        replies = [first, *rest]
        assert [(r.status_code, r.json()["response"]) for r in replies] == [(200, a) for a in alone]
        assert failed.status_code == 500, failed.text
        error = failed.json()["error"]
        assert error["code"] == "sampling_failed"
        assert "no finite logit" in error["message"]


def test_a_streamed_request_with_nan_logits_ends_with_its_own_error_event(
    gateway: Gateway,
) -> None:
    body = {"model": "poisoned", "prompt": POISON_PROMPT, "max_tokens": 8, "stream": True}
    reply = gateway.post("/v1/completions", body)
    assert reply.status_code == 200  # the stream had begun before the first token
    events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert [error["code"] for error in errors] == ["sampling_failed"]
    assert gateway.post("/poisoned", {"prompt": "hello", "max_length": 2}).status_code == 200
