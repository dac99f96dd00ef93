"""Wire models, seed → chat conversion, and the precedence of generation settings:
request > registry entry > the model's own defaults."""

from __future__ import annotations

from typing import Any, cast

import pytest
from pydantic import ValidationError

from adapters.base import SamplingDefaults
from gateway.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SeedReply,
    SeedRequest,
    completion_id,
    now_text,
    resolve_chat,
    resolve_completion,
    seed_to_chat,
)
from gateway.errors import ContextLengthExceeded
from gateway.registry.config import Generation
from gateway.worker.rows import SamplingParams
from gateway.worker.server import WorkerState, _sampling

USER_HI = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER_HI, **fields})


def error_of(model: type[Any], body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    errors = caught.value.errors()
    return dict(errors[0])


def roles(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    return [(m.role, m.text()) for m in request.messages]


# -- the seed body --------------------------------------------------------------------------


def test_a_seed_body_needs_only_a_prompt() -> None:
    body = SeedRequest.model_validate({"prompt": "你好"})
    assert body.max_length is None  # None: the registry's default length applies
    assert (body.history, body.system, body.stream, body.stop) == ([], None, False, None)


@pytest.mark.parametrize(
    ("body", "field", "kind"),
    [
        ({}, "prompt", "missing"),
        ({"prompt": ""}, "prompt", "string_too_short"),
        ({"prompt": " \n\t"}, "prompt", "value_error"),
        ({"prompt": 5}, "prompt", "string_type"),
        ({"prompt": "x", "max_length": 0}, "max_length", "greater_than"),
        ({"prompt": "x", "max_length": -3}, "max_length", "greater_than"),
        ({"prompt": "x", "max_length": "ten"}, "max_length", "int_type"),
        ({"prompt": "x", "temperature": 2.5}, "temperature", "less_than_equal"),
        ({"prompt": "x", "top_p": 0}, "top_p", "greater_than"),
        ({"prompt": "x", "top_k": -1}, "top_k", "greater_than_equal"),
        ({"prompt": "x", "seed": -1}, "seed", "greater_than_equal"),
        ({"prompt": "x", "keep_alive": -2}, "keep_alive", "greater_than_equal"),
        ({"prompt": "x", "stop": [""]}, "stop", "value_error"),
        ({"prompt": "x", "stop": ["s"] * 9}, "stop", "value_error"),
        ({"prompt": "x", "maxlength": 5}, "maxlength", "extra_forbidden"),
        ({"prompt": "x", "history": "earlier"}, "history", "list_type"),
    ],
)
def test_a_bad_seed_body_is_rejected_naming_the_field(
    body: dict[str, Any], field: str, kind: str
) -> None:
    error = error_of(SeedRequest, body)
    assert error["loc"][0] == field
    assert error["type"] == kind


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_length", True),
        ("max_length", "10"),
        ("max_length", 2.0),
        ("top_k", True),
        ("seed", False),
        ("temperature", True),
        ("top_p", True),
        ("repetition_penalty", True),
        ("keep_alive", True),
        ("temperature", "0.5"),
        ("stream", 1),
        ("stream", "true"),
    ],
)
def test_booleans_are_not_numbers_and_numbers_are_not_booleans(field: str, value: Any) -> None:
    # `max_length: true` was accepted as one new token.
    assert error_of(SeedRequest, {"prompt": "x", field: value})["loc"][0] == field


@pytest.mark.parametrize(
    "fields",
    [
        {"n": True},
        {"presence_penalty": False},
        {"frequency_penalty": False},
        {"logprobs": 0},
        {"max_tokens": True},
        {"max_completion_tokens": True},
        {"stream_options": {"include_usage": 1}},
    ],
)
def test_openai_fields_take_no_boolean_for_a_number_nor_a_number_for_a_boolean(
    fields: dict[str, Any],
) -> None:
    assert error_of(ChatCompletionRequest, {"model": "m", "messages": USER_HI, **fields})["loc"][
        0
    ] == next(iter(fields))


def test_json_integers_are_accepted_for_float_fields() -> None:
    body = chat(temperature=1, top_p=1, repetition_penalty=2, keep_alive=30, presence_penalty=0)
    assert (body.temperature, body.top_p, body.repetition_penalty) == (1.0, 1.0, 2.0)
    assert chat(presence_penalty=0.0, frequency_penalty=0).presence_penalty == 0


@pytest.mark.parametrize("pair", [["only one"], ["a", "b", "c"], [1, 2]])
def test_a_history_pair_must_be_two_strings(pair: list[Any]) -> None:
    error = error_of(SeedRequest, {"prompt": "x", "history": [pair]})
    assert error["loc"][:2] == ("history", 0)


def test_keep_alive_minus_one_means_forever_and_is_accepted() -> None:
    assert SeedRequest.model_validate({"prompt": "x", "keep_alive": -1}).keep_alive == -1


# -- seed → chat ----------------------------------------------------------------------------


def test_a_bare_prompt_becomes_one_user_message() -> None:
    converted = seed_to_chat(SeedRequest(prompt="你好"), "demo")
    assert converted.model == "demo"
    assert roles(converted) == [("user", "你好")]
    assert converted.max_tokens is None


def test_history_as_role_dicts_comes_before_the_prompt() -> None:
    body = SeedRequest.model_validate(
        {
            "prompt": "and now?",
            "history": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ],
        }
    )
    assert roles(seed_to_chat(body, "m")) == [
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "and now?"),
    ]


def test_history_as_user_assistant_pairs_becomes_alternating_turns() -> None:
    body = SeedRequest.model_validate(
        {"prompt": "3?", "history": [["1?", "one"], ["2?", "two"]], "system": "Count."}
    )
    assert roles(seed_to_chat(body, "m")) == [
        ("system", "Count."),
        ("user", "1?"),
        ("assistant", "one"),
        ("user", "2?"),
        ("assistant", "two"),
        ("user", "3?"),
    ]


def test_pairs_and_role_dicts_may_be_mixed() -> None:
    body = SeedRequest.model_validate(
        {"prompt": "p", "history": [["u", "a"], {"role": "system", "content": "s"}]}
    )
    assert roles(seed_to_chat(body, "m")) == [
        ("user", "u"),
        ("assistant", "a"),
        ("system", "s"),
        ("user", "p"),
    ]


@pytest.mark.parametrize(
    ("body", "count"),
    [
        ({"prompt": "p"}, 1),
        ({"prompt": "p", "system": "s"}, 2),
        ({"prompt": "p", "history": [["u", "a"], ["u", "a"]]}, 5),
        (
            {
                "prompt": "p",
                "system": "s",
                "history": [["u", "a"], {"role": "user", "content": "c"}],
            },
            5,
        ),
    ],
)
def test_the_seed_message_count_is_what_the_conversion_makes(
    body: dict[str, Any], count: int
) -> None:
    request = SeedRequest.model_validate(body)
    assert request.message_count() == count == len(seed_to_chat(request, "m").messages)


def test_an_empty_system_adds_no_message() -> None:
    assert roles(seed_to_chat(SeedRequest(prompt="p", system=""), "m")) == [("user", "p")]


def test_every_seed_setting_is_carried_into_the_chat_request() -> None:
    body = SeedRequest.model_validate(
        {
            "prompt": "p",
            "max_length": 7,
            "temperature": 0.3,
            "top_p": 0.8,
            "top_k": 5,
            "repetition_penalty": 1.1,
            "seed": 42,
            "stop": ["\n"],
            "stream": True,
            "keep_alive": 30,
        }
    )
    converted = seed_to_chat(body, "m")
    assert converted.max_tokens == 7  # max_length counts new tokens, as in the seeds
    assert (converted.temperature, converted.top_p, converted.top_k) == (0.3, 0.8, 5)
    assert (converted.repetition_penalty, converted.seed, converted.stop) == (1.1, 42, ["\n"])
    assert converted.stream
    assert converted.stream_options is not None and converted.stream_options.include_usage
    assert converted.keep_alive == 30


def test_an_unstreamed_seed_request_asks_for_no_stream_options() -> None:
    assert seed_to_chat(SeedRequest(prompt="p"), "m").stream_options is None


# -- the OpenAI bodies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "only a system"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages"),
        ({"messages": [{"role": "user", "content": []}]}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"model": ""}, "model"),
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"functions": []}, "functions"),
    ],
)
def test_a_bad_chat_body_is_rejected_naming_the_field(fields: dict[str, Any], field: str) -> None:
    body = {"model": "m", "messages": USER_HI, **fields}
    assert error_of(ChatCompletionRequest, body)["loc"][0] == field


def test_regression_messages_without_user_text_name_the_messages_field() -> None:
    # The check was a model validator, so the 400 said param null.
    error = error_of(
        ChatCompletionRequest, {"model": "m", "messages": [{"role": "assistant", "content": "x"}]}
    )
    assert error["loc"] == ("messages",)
    assert "a user message with non-empty content" in error["msg"]


def test_content_may_be_a_list_of_text_parts() -> None:
    message = ChatMessage.model_validate(
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    )
    assert message.text() == "ab"


def test_openai_defaults_that_change_nothing_are_accepted() -> None:
    body = chat(n=1, presence_penalty=0, frequency_penalty=0, logprobs=False, user="u")
    assert body.n == 1


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=5, max_completion_tokens=9).requested_tokens() == 9
    assert chat(max_tokens=5).requested_tokens() == 5
    assert chat().requested_tokens() is None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": " \n\t"}, "prompt"),
        ({"echo": True}, "echo"),
        ({"echo": 0}, "echo"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_a_bad_completion_body_is_rejected_naming_the_field(
    fields: dict[str, Any], field: str
) -> None:
    body = {"model": "m", "prompt": "Once", **fields}
    assert error_of(CompletionRequest, body)["loc"][0] == field


def test_stop_may_be_one_string_or_a_list() -> None:
    assert chat(stop="\n").stop_list() == ["\n"]
    assert chat(stop=["a", "b"]).stop_list() == ["a", "b"]
    assert chat().stop_list() == []


# -- precedence, gateway side: request > registry entry -------------------------------------

REGISTRY = Generation(max_new_tokens=64, temperature=0.7, top_p=0.9, top_k=40, stop=["</s>"])


def test_request_settings_win_over_the_registry_entry() -> None:
    resolved = resolve_chat(
        chat(max_tokens=5, temperature=0.2, top_p=0.5, top_k=3, stop=["x"]), REGISTRY, None
    )
    assert resolved.max_tokens == 5
    assert (resolved.temperature, resolved.top_p, resolved.top_k) == (0.2, 0.5, 3)
    assert resolved.stop == ["x"]


def test_an_explicit_zero_temperature_is_not_replaced_by_the_registry() -> None:
    assert resolve_chat(chat(temperature=0), REGISTRY, None).temperature == 0


def test_unset_request_settings_take_the_registry_entry() -> None:
    resolved = resolve_chat(chat(), REGISTRY, None)
    assert resolved.max_tokens == 64
    assert (resolved.temperature, resolved.top_p, resolved.top_k) == (0.7, 0.9, 40)
    assert resolved.stop == ["</s>"]


def test_settings_neither_sets_stay_unset_for_the_model_to_fill() -> None:
    resolved = resolve_chat(chat(), Generation(), None)
    assert resolved.max_tokens == 256  # the registry's default length always applies
    assert resolved.temperature is resolved.top_p is resolved.top_k is None
    assert resolved.repetition_penalty is None
    assert resolved.stop is None


def test_an_explicit_empty_stop_list_keeps_the_registry_stops_off() -> None:
    assert resolve_chat(chat(stop=[]), REGISTRY, None).stop == []


def test_max_completion_tokens_is_folded_into_max_tokens() -> None:
    resolved = resolve_chat(chat(max_tokens=3, max_completion_tokens=9), REGISTRY, None)
    assert (resolved.max_tokens, resolved.max_completion_tokens) == (9, None)


def test_the_entry_system_prompt_is_added_when_the_request_has_none() -> None:
    resolved = resolve_chat(chat(), REGISTRY, "Be brief.")
    assert roles(resolved) == [("system", "Be brief."), ("user", "hi")]


@pytest.mark.parametrize("role", ["system", "developer"])
def test_a_request_with_its_own_system_message_keeps_it_alone(role: str) -> None:
    body = chat(messages=[{"role": role, "content": "Mine."}, *USER_HI])
    assert roles(resolve_chat(body, REGISTRY, "Be brief.")) == [(role, "Mine."), ("user", "hi")]


def test_the_seed_system_field_wins_over_the_entry_system_prompt() -> None:
    converted = seed_to_chat(SeedRequest(prompt="p", system="Seed system."), "m")
    assert roles(resolve_chat(converted, REGISTRY, "Entry system."))[0] == (
        "system",
        "Seed system.",
    )


def test_resolving_leaves_the_request_untouched() -> None:
    original = chat()
    resolve_chat(original, REGISTRY, "sys")
    assert original.temperature is None and len(original.messages) == 1


def test_completions_resolve_with_the_same_precedence() -> None:
    body = CompletionRequest(model="m", prompt="Once", temperature=0.1)
    resolved = resolve_completion(body, REGISTRY)
    assert (resolved.max_tokens, resolved.temperature, resolved.top_k) == (64, 0.1, 40)
    assert resolve_completion(body.model_copy(update={"max_tokens": 2}), REGISTRY).max_tokens == 2


# -- precedence, worker side: then the model's own defaults ---------------------------------

MODEL_DEFAULTS = SamplingDefaults(temperature=1.0, top_p=0.95, top_k=50, repetition_penalty=1.2)


def worker_state(context_length: int = 100) -> WorkerState:
    return WorkerState(
        name="m",
        adapter=cast(Any, None),
        engine=cast(Any, None),
        defaults=MODEL_DEFAULTS,
        stop_ids=frozenset(),
        context_length=context_length,
        info=dict,
    )


def sampling(
    request: ChatCompletionRequest, registry: Generation, prompt: int = 10
) -> SamplingParams:
    resolved = resolve_chat(request, registry, None)
    return _sampling(worker_state(), resolved, prompt, "messages")


def test_each_setting_comes_from_the_first_layer_that_sets_it() -> None:
    registry = Generation(max_new_tokens=20, temperature=0.7)
    params = sampling(chat(top_p=0.5), registry)
    assert params.top_p == 0.5  # request
    assert params.temperature == 0.7  # registry entry
    assert params.top_k == 50  # model default
    assert params.repetition_penalty == 1.2  # model default
    assert params.max_new_tokens == 20  # registry entry


def test_the_model_defaults_apply_only_when_nothing_else_is_set() -> None:
    params = sampling(chat(temperature=0, top_k=0), Generation(max_new_tokens=20))
    assert (params.temperature, params.top_k) == (0, 0)
    assert params.greedy


def test_seed_and_stops_reach_the_sampler() -> None:
    params = sampling(chat(seed=7, stop=["a", "bc"]), REGISTRY)
    assert (params.seed, params.stop) == (7, ("a", "bc"))


def test_a_reply_that_would_overflow_the_context_names_max_tokens_and_both_numbers() -> None:
    body = resolve_chat(chat(max_tokens=20), Generation(), None)
    with pytest.raises(ContextLengthExceeded) as caught:
        _sampling(worker_state(100), body, 90, "messages")
    error = caught.value
    assert (error.status, error.param, error.code) == (400, "max_tokens", "context_length_exceeded")
    assert "context is 100 tokens" in error.message
    assert "input (messages) is 90 tokens" in error.message and "asks for 20" in error.message


def test_a_prompt_that_fills_the_context_names_the_prompt() -> None:
    body = resolve_chat(chat(max_tokens=1), Generation(), None)
    with pytest.raises(ContextLengthExceeded) as caught:
        _sampling(worker_state(100), body, 100, "messages")
    assert caught.value.param == "messages"
    assert "is 100 tokens" in caught.value.message


def test_a_reply_that_exactly_fills_the_context_is_allowed() -> None:
    body = resolve_chat(chat(max_tokens=10), Generation(), None)
    assert _sampling(worker_state(100), body, 90, "messages").max_new_tokens == 10


# -- replies --------------------------------------------------------------------------------


def test_the_seed_reply_has_the_seed_fields() -> None:
    reply = SeedReply(response="hi", time=now_text(), model="m").model_dump()
    assert {"response", "status", "time"} <= set(reply)
    assert reply["status"] == 200
    assert len(reply["time"]) == len("2024-01-31 12:00:00")


def test_completion_ids_are_prefixed_and_unique() -> None:
    ids = {completion_id("cmpl") for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("cmpl-") for i in ids)


@pytest.mark.parametrize(
    ("model", "value", "message"),
    [
        (ChatCompletionRequest, True, "returns no log-probabilities"),
        (ChatCompletionRequest, 1, "expected a boolean"),
        (CompletionRequest, 2, "returns no log-probabilities"),
        (CompletionRequest, True, "expected a whole number"),
    ],
)
def test_logprobs_on_the_worker_says_why_it_is_refused(
    model: type[ChatCompletionRequest] | type[CompletionRequest], value: object, message: str
) -> None:
    body: dict[str, Any] = {"model": "m", "logprobs": value}
    body |= {"messages": USER_HI} if model is ChatCompletionRequest else {"prompt": "x"}
    assert message in error_of(model, body)["msg"]
    body["logprobs"] = False if model is ChatCompletionRequest else 0
    assert model.model_validate(body).logprobs in (False, 0)
