"""The JSON Schema of models.yaml: generated, committed, complete, and in step with the
validator, as an independent JSON Schema implementation reads it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, get_args

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from adapters import ADAPTERS
from gateway.registry.config import RESERVED_NAMES, Registry, parse_bytes
from gateway.registry.load import ConfigError, parse_registry
from gateway.registry.schema import render
from tests.support import ROOT

SCHEMA_FILE = ROOT / "docs" / "models.schema.json"
MODELINE = "# yaml-language-server: $schema="


@cache
def validator() -> Any:
    schema = json.loads(render())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(text: str) -> list[str]:
    """What the JSON Schema finds wrong with a registry, seen as an editor sees YAML:
    as JSON, where every mapping key is a string."""
    instance = json.loads(json.dumps(yaml.safe_load(text)))
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator().iter_errors(instance)]


def pydantic_accepts(text: str) -> bool:
    try:
        parse_registry(text)
    except ConfigError:
        return False
    return True


# --- generated and committed ---------------------------------------------------------------


def test_the_committed_schema_is_the_generated_one() -> None:
    stale = "docs/models.schema.json is stale: run `make schema` (llm-gateway schema > it)"
    assert SCHEMA_FILE.read_text(encoding="utf-8") == render(), stale


def test_the_schema_is_a_valid_2020_12_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_the_schema_command_prints_it_without_importing_torch() -> None:
    code = (
        "import sys; from gateway.cli import main; code = main(['schema']); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == render()


def test_models_yaml_points_editors_at_the_committed_schema() -> None:
    first = (ROOT / "models.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(MODELINE)
    # The YAML language server resolves a relative path against the YAML file's directory.
    assert (ROOT / first.removeprefix(MODELINE)).resolve() == SCHEMA_FILE.resolve()


# --- every key described, with its default --------------------------------------------------


def _models_in(annotation: object) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)


def registry_sections() -> list[type[BaseModel]]:
    """Every model reachable from `Registry` through its fields' types."""
    found: list[type[BaseModel]] = [Registry]
    for section in found:
        for field in section.model_fields.values():
            found += [m for m in _models_in(field.annotation) if m not in found]
    return found


def test_the_walk_reaches_every_section_of_the_registry() -> None:
    names = {section.__name__ for section in registry_sections()}
    assert {"Registry", "GatewaySettings", "Auth", "ModelEntry", "Upstream"} <= names
    assert {"PythonEnv", "Generation", "Limits", "Batching"} <= names


def test_every_registry_key_has_a_description() -> None:
    undescribed = [
        f"{section.__name__}.{key}"
        for section in registry_sections()
        for key, field in section.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert undescribed == [], "add description= to these fields in gateway/registry/config.py"


def test_the_schema_gives_every_key_its_description_and_default() -> None:
    schema = json.loads(render())
    missing = []
    for section in registry_sections():
        node = schema if section is Registry else schema["$defs"][section.__name__]
        for key, field in section.model_fields.items():
            prop = node["properties"][key]
            if prop.get("description") != field.description:
                missing.append(f"{section.__name__}.{key}: description")
            if not field.is_required() and "default" not in prop:
                missing.append(f"{section.__name__}.{key}: default")
    assert missing == []


def test_the_schema_defaults_are_the_validator_defaults() -> None:
    schema = json.loads(render())
    minimal = Registry.model_validate({"models": {}})
    assert schema["properties"]["gateway"]["default"] == minimal.gateway.model_dump(mode="json")
    entry = schema["$defs"]["ModelEntry"]["properties"]
    assert entry["dtype"]["default"] == "auto"
    assert entry["devices"]["default"] == "cpu"
    assert entry["limits"]["default"]["max_new_tokens"] == 4096


# --- the shipped file and the README's examples ---------------------------------------------


def test_the_shipped_models_yaml_is_valid_by_the_schema() -> None:
    text = (ROOT / "models.yaml").read_text(encoding="utf-8")
    assert schema_errors(text) == []
    assert pydantic_accepts(text)


def readme_registry_examples() -> list[str]:
    """The README's ```yaml blocks that are registries or fragments of one: those whose top
    level has `models:` or `gateway:` (a fragment with only `gateway:` stands for a file
    whose `models:` is elsewhere, so it is checked with an empty one). Other YAML, such as
    a compose file, is not a registry."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^( *)```yaml\n(.*?)^\1```", readme, flags=re.S | re.M)
    examples = []
    for indent, body in blocks:
        text = "\n".join(line.removeprefix(indent) for line in body.splitlines())
        data = yaml.safe_load(text)
        if isinstance(data, dict) and {"models", "gateway"} & set(data):
            examples.append(text if "models" in data else text + "\nmodels: {}\n")
    return examples


def test_the_readme_has_registry_examples_to_check() -> None:
    examples = readme_registry_examples()
    assert len(examples) >= 2
    assert any("deepseek-moe" in example for example in examples)


@pytest.mark.parametrize("example", readme_registry_examples())
def test_every_readme_registry_example_is_valid_by_the_schema_and_the_validator(
    example: str,
) -> None:
    assert schema_errors(example) == []
    assert pydantic_accepts(example)


# --- the schema and the validator agree -----------------------------------------------------

VALID = {
    "minimal": "models: {m: {source: ./m}}",
    "no models": "models: {}",
    "sizes in every form": (
        "gateway: {memory_budget: {0: 22GiB, 1: 1.5 GB, cpu: 1073741824}}\n"
        "models: {m: {source: ./m, devices: [0, 1], memory_bytes: 512mib,"
        " max_memory: {0: ' 20 GiB ', 1: 20000000000, cpu: 64GiB}}}"
    ),
    "a remote model": "models: {r: {upstream: {url: 'http://10.0.0.2:8000', model: q}}}",
    "an interpreter": "models: {m: {source: ./m, python_env: {python: /usr/bin/python3}}}",
    "requirements": "models: {m: {source: ./m, python_env: {requirements: [x==1], python: null}}}",
    "every knob": (
        "gateway: {host: 0.0.0.0, port: 0, auth: {api_keys_env: K}, cors_origins: [x]}\n"
        "models:\n  Qwen2.5-7B_chat:\n    source: org/q\n    hub: huggingface\n"
        "    dtype: bfloat16\n    attention: sdpa\n    devices: [3]\n"
        "    generation: {temperature: 0.7, top_p: 0.9, top_k: 40, stop: ['\\n']}\n"
        "    limits: {context_length: 2048, max_queue: 0}\n"
        "    batching: {continuous: false, batch_wait_ms: 2}\n    idle_unload_s: 0\n"
    ),
}

INVALID = {
    "an unknown top-level key": "modles: {}\nmodels: {}",
    "an unknown gateway key": "gateway: {prot: 6006}\nmodels: {}",
    "an unknown model key": "models: {m: {source: ./m, adaptor: chat_template}}",
    "an unknown key deeper down": "models: {m: {source: ./m, limits: {max_tokens: 9}}}",
    "no models": "gateway: {port: 6006}",
    "a bad dtype": "models: {m: {source: ./m, dtype: fp16}}",
    "a negative port": "gateway: {port: -1}\nmodels: {}",
    "a port past 65535": "gateway: {port: 65536}\nmodels: {}",
    "a size without a number": "models: {m: {source: ./m, memory_bytes: GiB}}",
    "a size in an unknown unit": "models: {m: {source: ./m, memory_bytes: 22 gigs}}",
    "a zero size": "models: {m: {source: ./m, memory_bytes: 0}}",
    "a boolean size": "models: {m: {source: ./m, memory_bytes: true}}",
    "a budget for a device that is not one": "gateway: {memory_budget: {gpu0: 1GiB}}\nmodels: {}",
    "a disk budget": "gateway: {memory_budget: {disk: 1GiB}}\nmodels: {}",
    "an offload to disk": "models: {m: {source: ./m, devices: [0], max_memory: {0: 1, disk: 2}}}",
    "devices that are a word": "models: {m: {source: ./m, devices: gpu}}",
    "no devices": "models: {m: {source: ./m, devices: []}}",
    "a negative GPU": "models: {m: {source: ./m, devices: [-1]}}",
    "an unknown adapter": "models: {m: {source: ./m, adapter: chatml}}",
    "an unknown hub": "models: {m: {source: ./m, hub: github}}",
    "neither source nor upstream": "models: {m: {adapter: chat_template}}",
    "both source and upstream": "models: {m: {source: ./m, upstream: {url: u}}}",
    "an upstream without a url": "models: {m: {upstream: {model: q}}}",
    "both requirements and python": (
        "models: {m: {source: ./m, python_env: {requirements: [x], python: python3}}}"
    ),
    "an empty python_env": "models: {m: {source: ./m, python_env: {}}}",
    "a temperature past 2": "models: {m: {source: ./m, generation: {temperature: 3}}}",
    "a zero batch size": "models: {m: {source: ./m, batching: {max_batch_size: 0}}}",
    "a negative queue": "models: {m: {source: ./m, limits: {max_queue: -1}}}",
    "a string where a number goes": "models: {m: {source: ./m, idle_unload_s: soon}}",
}


@pytest.mark.parametrize("text", VALID.values(), ids=VALID.keys())
def test_a_registry_the_validator_accepts_the_schema_accepts(text: str) -> None:
    assert pydantic_accepts(text)
    assert schema_errors(text) == []


@pytest.mark.parametrize("text", INVALID.values(), ids=INVALID.keys())
def test_a_registry_the_validator_rejects_the_schema_rejects(text: str) -> None:
    assert not pydantic_accepts(text)
    assert schema_errors(text) != []


NAMES = [
    "demo", "Qwen2.5-7B", "a", "a" * 64, "v2", "healthy", "0day",
    "a" * 65, "-x", ".x", "_x", "a b", "a/b", "ünï", "Health", "V1", "OpenAPI.json",
    *sorted(RESERVED_NAMES),
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_the_schema_and_the_validator_agree_on_model_names(name: str) -> None:
    text = f"models: {{{json.dumps(name)}: {{source: ./m}}}}"
    assert (schema_errors(text) == []) == pydantic_accepts(text)


def test_reserved_names_are_refused_in_any_case_by_the_schema() -> None:
    for name in RESERVED_NAMES:
        for spelling in (name, name.upper(), name.capitalize()):
            assert schema_errors(f"models: {{{json.dumps(spelling)}: {{source: ./m}}}}")


@pytest.mark.parametrize("adapter", [*ADAPTERS, "chatml", "Chat_Template"])
def test_the_schema_and_the_validator_agree_on_adapters(adapter: str) -> None:
    text = f"models: {{m: {{source: ./m, adapter: {adapter}}}}}"
    assert (schema_errors(text) == []) == pydantic_accepts(text)
    assert (schema_errors(text) == []) == (adapter in ADAPTERS)


SIZES = [
    "22GiB", "22gib", "22 GIB", "1.5 GB", " 512MiB ", "1024", "7b", "3kb", "2TiB", "1.25 tb",
    "22G", "22 gigs", "GiB", "1.5.5GB", "-1GiB", "22 GiBs", "1,5GB", "22 Gi B", "",
]  # fmt: skip


@pytest.mark.parametrize("size", SIZES)
def test_the_size_pattern_accepts_the_strings_parse_bytes_accepts(size: str) -> None:
    def parses(value: str) -> bool:
        try:
            parse_bytes(value)
        except ValueError:
            return False
        return True

    text = f"models: {{m: {{source: ./m, memory_bytes: {json.dumps(size)}}}}}"
    size_errors = [e for e in schema_errors(text) if "memory_bytes" in e]
    assert (size_errors == []) == parses(size)


def test_make_schema_writes_the_schema_file(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "models.schema.json").write_text("stale\n")
    # STAMP= leaves out the venv prerequisite: the interpreter running the tests writes it.
    command = ["make", "-f", str(ROOT / "Makefile"), "schema", f"PY={sys.executable}", "STAMP="]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "docs" / "models.schema.json").read_text(encoding="utf-8") == render()


@pytest.mark.parametrize("text", [*VALID.values(), *INVALID.values()], ids=[*VALID, *INVALID])
def test_a_draft_7_validator_gives_the_same_verdicts(text: str) -> None:
    # YAML language servers before JSON Schema 2020-12 support read the file as draft 7:
    # `$defs` still resolves as a pointer, and only annotations beside a `$ref` are lost.
    instance = json.loads(json.dumps(yaml.safe_load(text)))
    draft7 = jsonschema.Draft7Validator(json.loads(render()))
    assert draft7.is_valid(instance) == (schema_errors(text) == [])
