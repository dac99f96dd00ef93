"""How a registry entry becomes an engine's command line (gateway/backends/engines/argv.py) and
which `engine:` settings the registry refuses."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.backends.engines.argv import (
    EngineConfigError,
    command_argv,
    engine_args,
    vllm_argv,
)
from gateway.backends.engines.memory import derived_utilization
from gateway.registry.config import ModelEntry

GIB = 2**30


def entry(**fields: Any) -> ModelEntry:
    return ModelEntry.model_validate({"source": "/models/m", "engine": "vllm", **fields})


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_deepseek_moe_on_two_gpus_gets_tensor_parallelism_and_its_settings() -> None:
    argv = vllm_argv(
        "deepseek",
        entry(
            devices=[0, 1],
            dtype="bfloat16",
            trust_remote_code=True,
            hub="modelscope",
            revision="v1.0",
            limits={"context_length": 4096},
            max_memory={0: "21GiB", 1: "22GiB"},
        ),
        "/cache/deepseek",
        "127.0.0.1",
        8123,
        gpu_totals={"0": 24 * GIB, "1": 24 * GIB},
    )
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--model") == "/cache/deepseek"
    assert flag(argv, "--served-model-name") == "deepseek"
    assert flag(argv, "--port") == "8123" and flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--tensor-parallel-size") == "2"
    assert flag(argv, "--dtype") == "bfloat16"
    assert flag(argv, "--max-model-len") == "4096"
    assert flag(argv, "--revision") == "v1.0"
    assert "--trust-remote-code" in argv
    # One fraction for every GPU: the smaller budget's share (21 of 24 GiB).
    assert flag(argv, "--gpu-memory-utilization") == "0.8750"


def test_a_cpu_entry_gets_float32_for_auto_and_no_gpu_flags() -> None:
    argv = vllm_argv("m", entry(), "/models/m", "127.0.0.1", 1)
    assert flag(argv, "--dtype") == "float32"
    for absent in ("--tensor-parallel-size", "--gpu-memory-utilization", "--revision"):
        assert absent not in argv
    assert "--trust-remote-code" not in argv
    gpu = vllm_argv("m", entry(devices=[3]), "/models/m", "127.0.0.1", 1)
    assert flag(gpu, "--dtype") == "auto"  # vLLM's own choice of a 16-bit type per GPU
    assert "--tensor-parallel-size" not in gpu


def test_engine_args_come_last_so_they_override_what_the_gateway_derived() -> None:
    argv = vllm_argv(
        "m",
        entry(
            engine_args={"dtype": "float16", "enforce-eager": True, "enable-chunked-prefill": False}
        ),
        "/models/m",
        "127.0.0.1",
        1,
    )
    assert argv[-3:] == ["--dtype", "float16", "--enforce-eager"]
    assert "--enable-chunked-prefill" not in argv


def test_engine_args_as_a_mapping_become_flags() -> None:
    assert engine_args(
        {
            "max-num-seqs": 64,
            "--swap-space": 0.5,
            "x": ["a", 1],
            "limit-mm-per-prompt": {"image": 2},
        }
    ) == [
        "--max-num-seqs",
        "64",
        "--swap-space",
        "0.5",
        "--x",
        "a",
        "1",
        "--limit-mm-per-prompt",
        '{"image": 2}',
    ]
    assert engine_args(["--max-num-seqs", "8"]) == ["--max-num-seqs", "8"]
    assert engine_args(None) == []


def test_max_memory_beyond_a_gpu_is_capped_and_an_unknown_gpu_is_an_error() -> None:
    big = entry(devices=[0], max_memory={0: "80GiB"})
    assert derived_utilization(big, {"0": 24 * GIB}) == 0.95
    with pytest.raises(EngineConfigError, match="GPU 0 is not listed"):
        derived_utilization(big, {"1": 24 * GIB})
    assert derived_utilization(entry(devices=[0]), {"0": 24 * GIB}) is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"engine_args": ["--port", "9"]}, "--port is set by the gateway"),
        ({"engine_args": {"served_model_name": "x"}}, "--served-model-name is set by the gateway"),
        ({"engine_args": {"api-key": "x"}}, "--api-key is set by the gateway"),
        # vLLM's parser takes an unambiguous prefix of a long flag as the flag.
        ({"engine_args": ["--por", "9"]}, "--port is set by the gateway"),
        ({"engine_args": ["--served-model", "evil"]}, "--served-model-name is set"),
        ({"engine_args": {"api-k": "x"}}, "--api-key is set by the gateway"),
        ({"engine_args": ["--hos=0.0.0.0"]}, "--host is set by the gateway"),
        ({"env": {"VLLM_API_KEY": "s"}}, "env.VLLM_API_KEY is --api-key"),
        ({"threads": 2}, "`threads` is for the gateway's own worker"),
        ({"engine_args": {"bad flag": 1}}, "not a flag name"),
        ({"engine_args": ["--x\x00"]}, "NUL"),
        ({"engine": "transformers", "engine_args": ["--x"]}, "only for `engine: vllm`"),
        ({"command": {"argv": ["srv"]}}, "only for `engine: command`"),
        ({"upstream": {"url": "http://h"}, "source": None}, "drop `engine: vllm`"),
        ({"source": None}, "give either `source`"),
    ],
)
def test_the_registry_refuses_engine_settings_that_cannot_work(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        entry(**fields)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (None, "needs `command"),
        ({"argv": []}, "at least 1 item"),
        ({"argv": ["srv", "--port", "{prot}"]}, "names {prot}; the placeholders are"),
        ({"argv": ["srv", "{"]}, "write {{ and }} for braces"),
        ({"argv": ["srv", "{port:>300000000}"]}, "no format spec or conversion"),
        ({"argv": ["srv", "{port!r}"]}, "no format spec or conversion"),
        ({"argv": ["srv", "{port:d}"]}, "no format spec or conversion"),
        ({"argv": ["srv", "{port}"], "ready_path": "/h"}, None),
        ({"argv": ["srv", "-m", "{model_path}"]}, "names {model_path}: give `source`"),
        ({"argv": ["srv"], "ready_path": "health"}, "ready_path"),
    ],
)
def test_a_command_engine_is_checked_when_the_registry_loads(
    command: dict[str, Any] | None, message: str | None
) -> None:
    fields: dict[str, Any] = {"engine": "command"}
    if command is not None:
        fields["command"] = command
    if message is None:  # the control: a good command loads
        assert ModelEntry.model_validate(fields).command is not None
        return
    with pytest.raises(ValidationError, match=message):
        ModelEntry.model_validate(fields)


def test_a_command_template_is_filled_and_keeps_literal_braces() -> None:
    values = {"port": "5", "host": "127.0.0.1", "model_path": "/m", "socket": "/s", "name": "n"}
    assert command_argv(["sh", "-c", "echo {{}} {port} {model_path} {name}"], values) == [
        "sh",
        "-c",
        "echo {} 5 /m n",
    ]
    with pytest.raises(EngineConfigError, match="not on PATH"):
        command_argv(["no-such-program-here", "{port}"], values)
    with pytest.raises(EngineConfigError, match="does not exist"):
        command_argv(["/no/such/program"], values)
    entry = ModelEntry.model_validate({"engine": "command", "command": {"argv": ["srv", "{port}"]}})
    assert entry.relays and entry.source is None


def test_engine_args_that_only_look_like_owned_flags_pass() -> None:
    args = ["--max-model-len", "64", "--model-impl", "vllm", "--seed", "-1", "--enforce-eager"]
    assert entry(engine_args=args).engine_args == args


@pytest.mark.parametrize("threads", ["4", True, 1.5, 0, 99999999999999999999])
def test_threads_is_a_whole_number_of_threads_within_reason(threads: object) -> None:
    with pytest.raises(ValidationError, match="threads"):
        ModelEntry.model_validate({"source": "/m", "threads": threads})
    assert ModelEntry.model_validate({"source": "/m", "threads": 1024}).threads == 1024
