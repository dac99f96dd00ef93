"""Client mistakes through the real gateway: the right status, the OpenAI error envelope,
the field named in `param`, no stack trace; and the gateway keeps serving afterwards."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Gateway, write_config

MAX_BODY = 65536
CONTEXT = 64
MAX_MESSAGES = 9
USER = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "hello " * 80  # about 88 tokens: more than the whole context
TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    503: "service_unavailable",
}


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with Gateway(errors_config(tiny_model, tmp_path_factory.mktemp("errors"))) as gw:
        yield gw


def errors_config(tiny_model: Path, directory: Path) -> Path:
    """The registry these tests run against (tests/test_cluster_front_door.py reuses it)."""
    return write_config(
        directory,
        f"""
        gateway:
          default_model: tiny
          max_body_bytes: {MAX_BODY}
        models:
          tiny:
            source: {tiny_model}
            generation: {{max_new_tokens: 8}}
            limits: {{max_new_tokens: 32, context_length: {CONTEXT}, max_messages: {MAX_MESSAGES}}}
          broken:
            source: {tiny_model.parent / "missing"}
        """,
    )


def check_envelope(response: httpx.Response, status: int) -> dict[str, Any]:
    """The reply is exactly the OpenAI error envelope with `status`; returns the error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = response.json()
    assert list(body) == ["error"]
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == TYPES[status]
    return error


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, **fields}


JSON = {"Content-Type": "application/json"}

# (method, path, request keyword arguments, status, param, code)
CASES: list[Any] = [
    # malformed JSON
    pytest.param(
        "POST", "/tiny", {"content": b'{"prompt": "hi"', "headers": JSON}, 400, None,
        "invalid_json", id="seed-malformed-json",
    ),
    pytest.param(
        "POST", "/v1/chat/completions", {"content": b"{model: tiny}", "headers": JSON}, 400,
        None, "invalid_json", id="chat-malformed-json",
    ),
    pytest.param("POST", "/tiny", {}, 400, None, None, id="seed-no-body"),
    pytest.param("POST", "/tiny", {"json": ["hi"]}, 400, None, "invalid_value", id="seed-array"),
    # wrong types
    pytest.param("POST", "/tiny", {"json": {"prompt": 5}}, 400, "prompt", "invalid_value",
                 id="seed-prompt-number"),
    pytest.param("POST", "/tiny", {"json": {"prompt": "hi", "max_length": "ten"}}, 400,
                 "max_length", "invalid_value", id="seed-max-length-string"),
    pytest.param("POST", "/tiny", {"json": {"prompt": "hi", "temperature": "hot"}}, 400,
                 "temperature", "invalid_value", id="seed-temperature-string"),
    pytest.param("POST", "/tiny", {"json": {"prompt": "hi", "history": "before"}}, 400,
                 "history", "invalid_value", id="seed-history-string"),
    pytest.param("POST", "/tiny", {"json": {"prompt": "hi", "history": [["only one"]]}}, 400,
                 "history", "invalid_value", id="seed-history-short-pair"),
    pytest.param("POST", "/v1/chat/completions", {"json": chat_body(messages="hi")}, 400,
                 "messages", "invalid_value", id="chat-messages-string"),
    pytest.param("POST", "/v1/chat/completions",
                 {"json": chat_body(messages=[{"role": "user", "content": 5}])}, 400,
                 "messages.content", "invalid_value", id="chat-content-number"),
    pytest.param("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": ["a"]}}, 400,
                 "prompt", "invalid_value", id="completion-prompt-list"),
    pytest.param("POST", "/v1/chat/completions", {"json": chat_body(model=7)}, 400, "model",
                 "invalid_value", id="chat-model-number"),
    pytest.param("POST", "/v1/chat/completions", {"json": {"messages": USER}}, 400, "model",
                 "missing_field", id="chat-model-missing"),
    # empty or blank input
    pytest.param("POST", "/tiny", {"json": {"prompt": ""}}, 400, "prompt", "invalid_value",
                 id="seed-empty-prompt"),
    pytest.param("POST", "/tiny", {"json": {"prompt": "  \n "}}, 400, "prompt", "invalid_value",
                 id="seed-blank-prompt"),
    pytest.param("POST", "/tiny", {"json": {"max_length": 4}}, 400, "prompt", "missing_field",
                 id="seed-no-prompt"),
    pytest.param("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": ""}}, 400,
                 "prompt", "invalid_value", id="completion-empty-prompt"),
    pytest.param("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": " \n"}}, 400,
                 "prompt", "invalid_value", id="completion-blank-prompt"),
    pytest.param("POST", "/v1/chat/completions", {"json": chat_body(messages=[])}, 400,
                 "messages", "invalid_value", id="chat-empty-messages"),
    pytest.param("POST", "/v1/chat/completions",
                 {"json": chat_body(messages=[{"role": "system", "content": "Be kind."}])}, 400,
                 "messages", "invalid_value", id="chat-no-user-message"),
    pytest.param("POST", "/v1/chat/completions",
                 {"json": chat_body(messages=[{"role": "user", "content": " "}])}, 400,
                 "messages", "invalid_value", id="chat-blank-user-message"),
    # lengths
    pytest.param("POST", "/tiny", {"json": {"prompt": "hi", "max_length": 0}}, 400, "max_length",
                 "invalid_value", id="seed-max-length-zero"),
    pytest.param("POST", "/tiny", {"json": {"prompt": "hi", "max_length": -5}}, 400,
                 "max_length", "invalid_value", id="seed-max-length-negative"),
    pytest.param("POST", "/tiny", {"json": {"prompt": "hi", "max_length": 33}}, 400,
                 "max_length", "max_tokens_exceeded", id="seed-max-length-above-limit"),
    pytest.param("POST", "/", {"json": {"prompt": "hi", "max_length": 1000}}, 400, "max_length",
                 "max_tokens_exceeded", id="root-max-length-above-limit"),
    pytest.param("POST", "/v1/chat/completions", {"json": chat_body(max_tokens=0)}, 400,
                 "max_tokens", "invalid_value", id="chat-max-tokens-zero"),
    pytest.param("POST", "/v1/chat/completions", {"json": chat_body(max_tokens=-1)}, 400,
                 "max_tokens", "invalid_value", id="chat-max-tokens-negative"),
    pytest.param("POST", "/v1/chat/completions", {"json": chat_body(max_tokens=33)}, 400,
                 "max_tokens", "max_tokens_exceeded", id="chat-max-tokens-above-limit"),
    pytest.param("POST", "/v1/chat/completions", {"json": chat_body(max_completion_tokens=99)},
                 400, "max_tokens", "max_tokens_exceeded", id="chat-max-completion-above-limit"),
    pytest.param("POST", "/v1/completions",
                 {"json": {"model": "tiny", "prompt": "x", "max_tokens": 10**6}}, 400,
                 "max_tokens", "max_tokens_exceeded", id="completion-max-tokens-above-limit"),
    # booleans are not numbers
    pytest.param("POST", "/tiny", {"json": {"prompt": "hi", "max_length": True}}, 400,
                 "max_length", "invalid_value", id="seed-max-length-true"),
    pytest.param("POST", "/v1/chat/completions", {"json": chat_body(max_tokens=True)}, 400,
                 "max_tokens", "invalid_value", id="chat-max-tokens-true"),
    pytest.param("POST", "/v1/completions",
                 {"json": {"model": "tiny", "prompt": "x", "temperature": False}}, 400,
                 "temperature", "invalid_value", id="completion-temperature-false"),
    # messages per request
    pytest.param("POST", "/tiny", {"json": {"prompt": "hi", "history": [["u", "a"]] * 5}}, 400,
                 "history", "too_many_messages", id="seed-too-many-messages"),
    pytest.param("POST", "/tiny",
                 {"json": {"prompt": "hi", "system": "s", "history": [["u", "a"]] * 4}}, 400,
                 "history", "too_many_messages", id="seed-system-counts"),
    pytest.param("POST", "/v1/chat/completions",
                 {"json": chat_body(messages=USER * (MAX_MESSAGES + 1))}, 400, "messages",
                 "too_many_messages", id="chat-too-many-messages"),
    # trailing slashes are not redirected (to a Host the client chose) but not found
    pytest.param("POST", "/tiny/", {"json": {"prompt": "hi"}, "headers": {"Host": "evil.test"}},
                 404, None, None, id="seed-trailing-slash"),
    pytest.param("GET", "/health/", {"headers": {"Host": "evil.test"}}, 404, None, None,
                 id="health-trailing-slash"),
    pytest.param("GET", "/v1/models/", {}, 404, None, None, id="models-trailing-slash"),
    # unknown models
    pytest.param("POST", "/nope", {"json": {"prompt": "hi"}}, 404, "model", "model_not_found",
                 id="seed-unknown-model"),
    pytest.param("POST", "/v1/chat/completions", {"json": chat_body(model="nope")}, 404,
                 "model", "model_not_found", id="chat-unknown-model"),
    pytest.param("POST", "/v1/chat/completions", {"json": chat_body(model="nope", stream=True)},
                 404, "model", "model_not_found", id="chat-stream-unknown-model"),
    pytest.param("POST", "/v1/completions", {"json": {"model": "nope", "prompt": "x"}}, 404,
                 "model", "model_not_found", id="completion-unknown-model"),
    pytest.param("GET", "/v1/models/nope", {}, 404, "model", "model_not_found",
                 id="retrieve-unknown-model"),
    pytest.param("POST", "/v1", {"json": {"prompt": "hi"}}, 404, "model", "model_not_found",
                 id="seed-route-prefix-is-not-a-model"),
    # fields the API does not have or does not support
    pytest.param("POST", "/tiny", {"json": {"prompt": "hi", "maxlength": 4}}, 400, "maxlength",
                 "unknown_field", id="seed-unknown-field"),
    pytest.param("POST", "/v1/chat/completions", {"json": chat_body(tools=[])}, 400, "tools",
                 "unknown_field", id="chat-unknown-field"),
    pytest.param("POST", "/v1/chat/completions", {"json": chat_body(n=2)}, 400, "n",
                 "invalid_value", id="chat-n-2"),
    pytest.param("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "x", "n": 3}},
                 400, "n", "invalid_value", id="completion-n-3"),
    # transport
    pytest.param("POST", "/tiny",
                 {"content": b'{"prompt": "hi"}', "headers": {"Content-Type": "text/plain"}},
                 415, None, "unsupported_media_type", id="seed-text-plain"),
    pytest.param("POST", "/v1/chat/completions", {"data": {"model": "tiny"}}, 415, None,
                 "unsupported_media_type", id="chat-form-encoded"),
    pytest.param("GET", "/nothing/here", {}, 404, None, None, id="unknown-route"),
    pytest.param("POST", "/v1/nothing", {"json": {}}, 404, None, None, id="unknown-v1-route"),
    pytest.param("GET", "/tiny", {}, 405, None, None, id="get-a-seed-route"),
    pytest.param("PUT", "/v1/chat/completions", {"json": chat_body()}, 405, None, None,
                 id="put-chat"),
    pytest.param("DELETE", "/health", {}, 405, None, None, id="delete-health"),
    # the model
    pytest.param("POST", "/broken", {"json": {"prompt": "hi"}}, 503, None, "model_unavailable",
                 id="model-that-failed-to-load"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "param", "code"), CASES)
def test_a_client_mistake_gets_its_status_and_the_error_envelope(
    gateway: Gateway,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    error = check_envelope(gateway.client.request(method, path, **kwargs), status)
    assert (error["param"], error["code"]) == (param, code)


def test_a_request_at_the_message_limit_is_served(gateway: Gateway) -> None:
    body = {"prompt": "hi", "history": [["u", "a"]] * 4, "max_length": 1}  # 9 messages
    assert gateway.post("/tiny", body).status_code == 200
    error = check_envelope(gateway.post("/tiny", {**body, "system": "s"}), 400)
    assert "10 messages, above the limit of 9 (limits.max_messages)" in error["message"]


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_load_balancers_may_probe_with_head(gateway: Gateway, path: str) -> None:
    reply = gateway.client.head(path)
    assert reply.status_code == 200
    assert reply.content == b""


def test_a_trailing_slash_never_redirects_to_the_host_the_client_names(gateway: Gateway) -> None:
    for method, path in [("POST", "/tiny/"), ("GET", "/health/"), ("GET", "/ready/")]:
        reply = gateway.client.request(method, path, headers={"Host": "evil.test"})
        assert reply.status_code == 404 and "location" not in reply.headers


BAD = "a\ud800b"  # a lone surrogate: valid JSON, no UTF-8 form
SURROGATES: list[Any] = [
    pytest.param("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": BAD}]),
                 "messages.content", id="chat-content"),
    pytest.param("/v1/chat/completions",
                 chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": BAD}]}]),
                 "messages.content.text", id="chat-content-part"),
    pytest.param("/v1/chat/completions",
                 chat_body(messages=[{"role": "system", "content": BAD}, *USER]),
                 "messages.content", id="chat-system-message"),
    pytest.param("/v1/chat/completions",
                 chat_body(messages=[{"role": "user", "content": "hi", "name": BAD}]),
                 "messages.name", id="chat-name"),
    pytest.param("/v1/chat/completions", chat_body(stop=BAD), "stop", id="chat-stop"),
    pytest.param("/v1/chat/completions", chat_body(stop=["x", BAD]), "stop", id="chat-stops"),
    pytest.param("/v1/chat/completions", chat_body(user=BAD), "user", id="chat-user"),
    pytest.param("/v1/chat/completions", chat_body(model=BAD), "model", id="chat-model"),
    pytest.param("/v1/completions", {"model": "tiny", "prompt": BAD}, "prompt", id="completion"),
    pytest.param("/v1/completions", {"model": "tiny", "prompt": "x", "stop": BAD}, "stop",
                 id="completion-stop"),
    pytest.param("/v1/completions", {"model": "tiny", "prompt": "x", "user": BAD}, "user",
                 id="completion-user"),
    pytest.param("/tiny", {"prompt": BAD}, "prompt", id="seed-prompt"),
    pytest.param("/tiny", {"prompt": "hi", "system": BAD}, "system", id="seed-system"),
    pytest.param("/tiny", {"prompt": "hi", "stop": BAD}, "stop", id="seed-stop"),
    pytest.param("/tiny", {"prompt": "hi", "history": [["hi", BAD]]}, "history",
                 id="seed-history-pair"),
    pytest.param("/tiny", {"prompt": "hi", "history": [{"role": "user", "content": BAD}]},
                 "history.content", id="seed-history-turn"),
    pytest.param("/tiny", {"prompt": "hi", BAD: 1}, None, id="seed-unknown-key"),
]  # fmt: skip


def test_a_lone_surrogate_in_any_field_is_a_400_on_the_same_connection(
    gateway: Gateway,
) -> None:
    connects: list[str] = []

    def trace(event: str, info: dict[str, Any]) -> None:
        if event.startswith("connection.connect_tcp.complete"):
            connects.append(event)

    with httpx.Client(base_url=gateway.url, timeout=60.0) as client:

        def post(path: str, body: Any) -> httpx.Response:
            content = json.dumps(body).encode()  # ASCII, the surrogate as a \ud800 escape
            headers = {"Content-Type": "application/json"}
            extensions = {"trace": trace}
            return client.post(path, content=content, headers=headers, extensions=extensions)

        opened = client.get("/health", extensions={"trace": trace})  # opens the one connection
        assert opened.status_code == 200
        for case in SURROGATES:
            path, body, param = case.values
            error = check_envelope(post(path, body), 400)
            assert (error["param"], error["code"]) == (param, "invalid_value"), case.id
        assert post("/tiny", {"prompt": "hi", "max_length": 1}).status_code == 200
    assert len(connects) == 1  # every reply kept the connection open


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/nope", {"prompt": "hi"}),
        ("/v1/chat/completions", chat_body(model="nope")),
        ("/v1/completions", {"model": "nope", "prompt": "x"}),
    ],
)
def test_an_unknown_model_lists_the_valid_names(
    gateway: Gateway, path: str, body: dict[str, Any]
) -> None:
    error = check_envelope(gateway.post(path, body), 404)
    assert error["message"] == "model 'nope' does not exist; valid models: broken, tiny"


def test_a_failed_model_says_why(gateway: Gateway) -> None:
    error = check_envelope(gateway.post("/v1/completions", {"model": "broken", "prompt": "x"}), 503)
    assert "does not exist" in error["message"]


def test_an_unknown_field_is_named_in_the_message(gateway: Gateway) -> None:
    error = check_envelope(gateway.post("/tiny", {"prompt": "hi", "maxlength": 4}), 400)
    assert error["message"] == "unknown field 'maxlength'"


def test_a_length_above_the_limit_says_both_numbers(gateway: Gateway) -> None:
    error = check_envelope(gateway.post("/tiny", {"prompt": "hi", "max_length": 33}), 400)
    assert error["message"] == "max_length is 33, above the limit of 32 new tokens for model 'tiny'"


def test_malformed_json_says_what_is_wrong(gateway: Gateway) -> None:
    error = check_envelope(
        gateway.client.post("/tiny", content=b'{"prompt": "hi"', headers=JSON), 400
    )
    assert error["message"].startswith("malformed JSON body: ")


# -- the context window (checked by the worker, which knows the prompt's tokens) ------------

CONTEXT_MESSAGE = re.compile(
    rf"this model's context is {CONTEXT} tokens, but the input \((\w+)\) is (\d+) tokens "
    r"and max_tokens asks for (\d+) more \((\d+) in all\)"
)


def context_numbers(message: str) -> tuple[int, int, int]:
    match = CONTEXT_MESSAGE.fullmatch(message)
    assert match, message
    prompt, asked, total = (int(match.group(i)) for i in (2, 3, 4))
    assert prompt + asked == total > CONTEXT
    return prompt, asked, total


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tiny", {"prompt": LONG_PROMPT, "max_length": 4}, "prompt"),
        ("/tiny", {"prompt": LONG_PROMPT, "max_length": 4, "stream": True}, "prompt"),
        ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": LONG_PROMPT}]),
         "messages"),
        ("/v1/completions", {"model": "tiny", "prompt": LONG_PROMPT, "stream": True}, "prompt"),
    ],
)  # fmt: skip
def test_a_prompt_longer_than_the_context_is_a_400_naming_the_prompt(
    gateway: Gateway, path: str, body: dict[str, Any], param: str
) -> None:
    error = check_envelope(gateway.post(path, body), 400)
    assert (error["param"], error["code"]) == (param, "context_length_exceeded")
    prompt, _, _ = context_numbers(error["message"])
    assert prompt > CONTEXT


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tiny", {"prompt": "hello " * 40, "max_length": 32}, "max_length"),
        ("/v1/completions", {"model": "tiny", "prompt": "hello " * 40, "max_tokens": 32},
         "max_tokens"),
    ],
)  # fmt: skip
def test_a_reply_that_would_overflow_the_context_is_a_400_naming_the_length(
    gateway: Gateway, path: str, body: dict[str, Any], param: str
) -> None:
    error = check_envelope(gateway.post(path, body), 400)
    assert (error["param"], error["code"]) == (param, "context_length_exceeded")
    prompt, asked, _ = context_numbers(error["message"])
    assert prompt < CONTEXT and asked == 32


def test_regression_an_unset_length_shrinks_to_the_room_left_instead_of_failing(
    gateway: Gateway,
) -> None:
    # The registry default (8 new tokens) was sent as an explicit max_tokens, so a prompt
    # leaving less room got a 400 about a max_tokens the client never sent.
    for path, body in [
        ("/tiny", {"prompt": "hello " * 53, "temperature": 0}),
        ("/v1/completions", {"model": "tiny", "prompt": "hello " * 60}),
    ]:
        reply = gateway.post(path, body)
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        assert CONTEXT - 8 < usage["prompt_tokens"] < CONTEXT  # less room than the default
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= CONTEXT


# -- body size ------------------------------------------------------------------------------


def test_an_oversized_body_is_refused_by_its_content_length(gateway: Gateway) -> None:
    body = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    error = check_envelope(gateway.client.post("/tiny", content=body, headers=JSON), 413)
    assert error["code"] == "payload_too_large"
    assert str(MAX_BODY) in error["message"]


def test_regression_an_oversized_chunked_body_is_413_not_a_parse_error(gateway: Gateway) -> None:
    # Without Content-Length the limit trips while the body is read, and FastAPI used to
    # turn that into 400 "There was an error parsing the body".
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    response = gateway.client.post("/v1/completions", content=chunks(), headers=JSON)
    assert "content-length" not in response.request.headers
    assert check_envelope(response, 413)["code"] == "payload_too_large"


# -- afterwards -----------------------------------------------------------------------------


def test_after_all_of_that_the_gateway_is_healthy_and_serves(gateway: Gateway) -> None:
    assert gateway.client.get("/health").json() == {"status": "ok"}
    assert gateway.client.get("/ready").status_code == 200
    reply = gateway.post("/tiny", {"prompt": "hi", "max_length": 3})
    assert reply.status_code == 200
    assert reply.json()["usage"]["completion_tokens"] == 3
    chat = gateway.post("/v1/chat/completions", chat_body(max_tokens=2))
    assert chat.json()["choices"][0]["finish_reason"] == "length"
    if gateway.on_cluster:  # tests/test_cluster_errors.py: workers run in Serve replicas
        cards = gateway.models()
        assert len(cards["tiny"]["runtime"]["cluster"]["replicas"]) == 1
        assert cards["broken"]["runtime"] is None
    else:
        assert len(gateway.workers()) == 1  # the tiny model's; the broken one left nothing


def test_no_client_mistake_caused_an_internal_error(gateway: Gateway) -> None:
    log = gateway.log.read_text()
    assert "Traceback" not in log
    assert "unhandled error" not in log
    assert " 500 " not in log


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/openapi.json", "/docs"])
def test_a_post_to_one_of_the_gateways_own_routes_is_the_wrong_method(
    gateway: Gateway, path: str
) -> None:
    reply = gateway.client.post(path, json={"prompt": "hi"})
    assert reply.status_code == 405, reply.text
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert reply.headers["allow"] == "GET, HEAD"


def test_a_body_without_a_content_type_is_415(gateway: Gateway) -> None:
    reply = gateway.client.post(
        "/tiny", content=b'{"prompt": "hi", "max_length": 2}', headers={"Content-Type": ""}
    )
    assert reply.status_code == 415, reply.text
    assert reply.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "body", [b'{"prompt": "\xff\xfe"}', b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
)
def test_a_body_the_framework_cannot_decode_is_invalid_json(gateway: Gateway, body: bytes) -> None:
    reply = gateway.client.post("/tiny", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("value", ["Infinity", "1e400", "NaN"])
def test_an_infinite_keep_alive_is_refused(gateway: Gateway, value: str) -> None:
    body = b'{"prompt": "hi", "max_length": 1, "keep_alive": ' + value.encode() + b"}"
    reply = gateway.client.post("/tiny", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "keep_alive"
