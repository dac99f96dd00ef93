"""The command line of a started engine: vLLM's flags from the registry entry, or a
`command` template with its placeholders filled."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from gateway.backends.engines.memory import EngineConfigError, derived_utilization, flag_value
from gateway.registry.config import ModelEntry

__all__ = ["EngineConfigError", "command_argv", "engine_args", "vllm_argv", "vllm_dtype"]

VLLM_SERVER = ("-m", "vllm.entrypoints.openai.api_server")


def vllm_argv(
    name: str,
    entry: ModelEntry,
    model_path: str,
    host: str,
    port: int,
    gpu_totals: Mapping[str, int] | None = None,
    chat_template: Path | None = None,
) -> list[str]:
    """vLLM's arguments (after the interpreter) for this entry.

    Everything the entry says has a vLLM flag: `devices` → tensor parallelism over the
    visible GPUs (CUDA_VISIBLE_DEVICES is set by the caller), `dtype`, the context length,
    remote code, the revision, `max_memory` → `gpu_memory_utilization`, `chat_template`
    (written by the caller to the file `chat_template`) → `--chat-template`. `engine_args`
    come last, so they may override what the gateway derived.
    """
    args = [*VLLM_SERVER, "--model", model_path, "--served-model-name", name]
    args += ["--host", host, "--port", str(port)]
    args += ["--dtype", vllm_dtype(entry)]
    if isinstance(entry.devices, list) and len(entry.devices) > 1:
        args += ["--tensor-parallel-size", str(len(entry.devices))]
    if entry.limits.context_length is not None:
        args += ["--max-model-len", str(entry.limits.context_length)]
    if entry.trust_remote_code:
        args.append("--trust-remote-code")
    if entry.revision and entry.hub != "local":
        args += ["--revision", entry.revision]
    # Derived only when `engine_args` does not set it: a set one needs no nvidia-smi.
    given = flag_value(entry, "gpu-memory-utilization")
    utilization = None if given is not None else derived_utilization(entry, gpu_totals)
    if utilization is not None:
        args += ["--gpu-memory-utilization", f"{utilization:.4f}"]
    if chat_template is not None:
        args += ["--chat-template", str(chat_template)]
    return args + engine_args(entry.engine_args)


def vllm_dtype(entry: ModelEntry) -> str:
    """The gateway's `auto` means float32 on CPU; on GPUs vLLM's own `auto` already picks
    a 16-bit type the GPUs support."""
    if entry.dtype != "auto":
        return entry.dtype
    return "float32" if entry.devices == "cpu" else "auto"


def engine_args(value: list[str] | Mapping[str, object] | None) -> list[str]:
    """`engine_args` as argv: a list as given; a mapping flag → value (true: the bare
    flag, false: left out, a list: the flag then each value, a mapping: its JSON)."""
    if value is None:
        return []
    if isinstance(value, list):
        return list(value)
    out: list[str] = []
    for flag, item in value.items():
        option = flag if flag.startswith("-") else f"--{flag}"
        if item is True:
            out.append(option)
        elif item is False:
            continue
        elif isinstance(item, list):
            out += [option, *(str(v) for v in item)]
        elif isinstance(item, dict):
            out += [option, json.dumps(item)]
        else:
            out += [option, str(item)]
    return out


def command_argv(argv: list[str], values: Mapping[str, str]) -> list[str]:
    """A `command` template filled in; `{{`/`}}` stay literal braces."""
    filled = [item.format_map(values) for item in argv]
    program = filled[0]
    if "/" not in program and shutil.which(program) is None:
        raise EngineConfigError(f"the command {program!r} is not on PATH")
    if "/" in program and not Path(program).exists():
        raise EngineConfigError(f"the command {program!r} does not exist")
    return filled
