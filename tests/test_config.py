"""The registry: `models.yaml` rules, one test per rule, from inline YAML; and the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.backends.launcher import Backend, Progress
from gateway.cli import main
from gateway.registry.config import RESERVED_NAMES, ModelEntry, parse_bytes
from gateway.registry.load import ConfigError, ConfigIssue, load_registry, parse_registry
from tests.support import ROOT, write_config


def issues_of(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse_registry(textwrap.dedent(text))
    return caught.value.issues


def only_issue(text: str) -> ConfigIssue:
    issues = issues_of(text)
    assert len(issues) == 1, [issue.render("models.yaml") for issue in issues]
    return issues[0]


# -- the shipped file and the defaults ------------------------------------------------------


def test_the_shipped_models_yaml_is_valid() -> None:
    registry = load_registry(ROOT / "models.yaml").registry
    assert registry.gateway.default_model == "demo"
    assert {"demo", "deepseek-moe", "transnormer"} <= set(registry.models)


def test_a_minimal_entry_gets_the_documented_defaults() -> None:
    registry = parse_registry("models:\n  m:\n    source: ./m\n")
    entry = registry.models["m"]
    assert (entry.hub, entry.adapter, entry.dtype, entry.devices) == (
        "local",
        "chat_template",
        "auto",
        "cpu",
    )
    assert entry.generation.max_new_tokens == 256
    assert entry.limits.max_new_tokens == 4096
    assert entry.limits.max_concurrency == 32
    assert entry.batching.max_batch_size == "auto"
    assert not entry.trust_remote_code
    gateway = registry.gateway
    assert (gateway.host, gateway.port, gateway.default_model) == ("127.0.0.1", 6006, None)
    assert gateway.max_body_bytes == 4 * 2**20


def test_an_upstream_entry_needs_no_source() -> None:
    registry = parse_registry("models:\n  r:\n    upstream: {url: 'http://10.0.0.2:8000/v1'}\n")
    assert registry.models["r"].is_remote


# -- unknown keys ---------------------------------------------------------------------------


def test_an_unknown_key_is_rejected_with_did_you_mean() -> None:
    issue = only_issue(
        """
        models:
          m:
            source: ./m
            adaptor: chat_template
        """
    )
    assert issue.path == "models.m.adaptor"
    assert issue.message == "unknown key 'adaptor'"
    assert issue.hint == "did you mean 'adapter'?"
    assert issue.line == 5


def test_a_key_at_the_wrong_level_is_pointed_to_where_it_belongs() -> None:
    issue = only_issue("models:\n  m:\n    source: ./m\n    max_new_tokens: 8\n")
    assert issue.path == "models.m.max_new_tokens"
    assert issue.hint == "did you mean 'generation.max_new_tokens'?"


def test_an_unknown_gateway_key_is_rejected_with_did_you_mean() -> None:
    issue = only_issue("gateway:\n  defualt_model: m\nmodels:\n  m: {source: ./m}\n")
    assert (issue.path, issue.line) == ("gateway.defualt_model", 2)
    assert issue.hint == "did you mean 'default_model'?"


def test_an_unknown_top_level_key_is_rejected() -> None:
    issue = only_issue("modles: {}\nmodels:\n  m: {source: ./m}\n")
    assert (issue.path, issue.line) == ("modles", 1)
    assert issue.hint == "did you mean 'models'?"


# -- bad values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "path", "hint"),
    [
        ("gateway: {port: abc}\n", "gateway.port", 'the file says "abc"; leave the key out'),
        ("gateway: {port: 70000}\n", "gateway.port", "the file says 70000; leave the key out"),
        (
            "models:\n  m: {source: ./m, trust_remote_code: maybe}\n",
            "models.m.trust_remote_code",
            "default, false",
        ),
        (
            "models:\n  m: {source: ./m, limits: {max_concurrency: -1}}\n",
            "models.m.limits.max_concurrency",
            "the file says -1; leave the key out to get the default, 32",
        ),
        (
            "models:\n  m: {source: ./m, generation: {temperature: 3}}\n",
            "models.m.generation.temperature",
            "the file says 3",
        ),
    ],
)
def test_a_value_of_the_wrong_type_or_range_is_rejected_with_what_the_file_says(
    yaml_text: str, path: str, hint: str
) -> None:
    text = yaml_text if "models:" in yaml_text else yaml_text + "models:\n  m: {source: ./m}\n"
    issue = only_issue(text)
    assert issue.path == path
    assert hint in issue.hint
    assert issue.line is not None


def test_an_unknown_dtype_is_rejected_with_the_choices() -> None:
    issue = only_issue("models:\n  m:\n    source: ./m\n    dtype: fp8\n")
    assert (issue.path, issue.line) == ("models.m.dtype", 4)
    assert "float32, bfloat16, float16, auto" in issue.hint


@pytest.mark.parametrize(
    ("devices", "path"),
    [("gpu", "models.m.devices"), ("[-1]", "models.m.devices.0"), ("[0, x]", "models.m.devices.1")],
)
def test_devices_are_cpu_or_gpu_indices(devices: str, path: str) -> None:
    issue = only_issue(f"models:\n  m:\n    source: ./m\n    devices: {devices}\n")
    assert (issue.path, issue.line) == (path, 4)
    assert "`devices: cpu` or a list of GPU indices" in issue.hint


def test_regression_a_negative_gpu_index_is_not_reported_as_should_be_cpu() -> None:
    issue = only_issue("models:\n  m: {source: ./m, devices: [0, -1]}\n")
    assert issue.path == "models.m.devices.1"
    assert "greater than or equal to 0" in issue.message


def test_an_empty_device_list_is_rejected() -> None:
    issue = only_issue("models:\n  m: {source: ./m, devices: []}\n")
    assert issue.path == "models.m"
    assert "non-empty list of GPU indices" in issue.message


def test_an_unknown_hub_is_rejected_with_the_choices() -> None:
    issue = only_issue("models:\n  m: {source: org/m, hub: github}\n")
    assert issue.path == "models.m.hub"
    assert issue.hint == "one of local, modelscope, huggingface"


@pytest.mark.parametrize("body", ["{adapter: chat_template}", "{source: ./m, upstream: {url: u}}"])
def test_an_entry_needs_exactly_one_of_source_and_upstream(body: str) -> None:
    issue = only_issue(f"models:\n  m: {body}\n")
    assert (issue.path, issue.line) == ("models.m", 2)
    assert "give either `source`" in issue.message


def test_python_env_takes_requirements_or_an_interpreter_not_both() -> None:
    issue = only_issue(
        "models:\n  m: {source: ./m, python_env: {requirements: [x], python: /usr/bin/python3}}\n"
    )
    assert issue.path == "models.m.python_env"
    assert "not both" in issue.message


def test_default_generation_length_may_not_exceed_the_limit() -> None:
    issue = only_issue(
        "models:\n  m:\n    source: ./m\n    generation: {max_new_tokens: 10}\n"
        "    limits: {max_new_tokens: 5}\n"
    )
    assert issue.message == "generation.max_new_tokens (10) exceeds limits.max_new_tokens (5)"


def test_regression_a_limit_below_the_default_length_alone_is_accepted() -> None:
    # `limits: {max_new_tokens: 100}` was rejected: the unwritten default of 256 exceeded it.
    entry = parse_registry("models:\n  m: {source: ./m, limits: {max_new_tokens: 100}}\n").models[
        "m"
    ]
    assert entry.generation.max_new_tokens == 100


# -- cross-references -----------------------------------------------------------------------


def test_a_default_model_that_does_not_exist_is_rejected_with_did_you_mean() -> None:
    issue = only_issue("gateway:\n  default_model: dmeo\nmodels:\n  demo: {source: ./m}\n")
    assert (issue.path, issue.line) == ("gateway.default_model", 2)
    assert issue.message == "'dmeo' is not a model in `models`"
    assert issue.hint == "did you mean 'demo'?"


def test_a_default_model_far_from_any_name_lists_the_names() -> None:
    issue = only_issue("gateway: {default_model: zzz}\nmodels:\n  a: {source: ./a}\n")
    assert issue.hint == "choose one of: a"


def test_an_unknown_adapter_is_rejected_with_did_you_mean() -> None:
    issue = only_issue("models:\n  m:\n    source: ./m\n    adapter: deepseek-moe\n")
    assert (issue.path, issue.line) == ("models.m.adapter", 4)
    assert issue.message == "unknown adapter 'deepseek-moe'"
    assert issue.hint == "did you mean 'deepseek_moe'?"


# -- model names ----------------------------------------------------------------------------

ROUTE_NAMES = ["v1", "health", "ready", "admin", "metrics", "docs", "redoc", "openapi.json"]


@pytest.mark.parametrize("name", ROUTE_NAMES)
def test_a_model_named_like_a_gateway_route_is_rejected(name: str) -> None:
    issue = only_issue(f"models:\n  {name}:\n    source: ./m\n")
    assert (issue.path, issue.line) == (f"models.{name}", 2)
    assert f"collides with the gateway route /{name}" in issue.message
    assert issue.hint == f"rename the model, e.g. '{name}-model'"


def test_every_route_the_gateway_serves_is_a_reserved_name(tmp_path: Path) -> None:
    from gateway.app import create_app

    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  m: {{source: {tmp_path}}}\n")
    app = create_app(load_registry(config), launcher=NoLauncher())
    with TestClient(app):  # runs the lifespan, which cleans up after create_app
        paths = {*app.openapi()["paths"], app.openapi_url, app.docs_url, app.redoc_url}
    first_segments = {str(p).strip("/").split("/")[0] for p in paths} - {"", "{model}"}
    assert {"health", "ready", "v1", "docs", "openapi.json"} <= first_segments
    assert first_segments <= RESERVED_NAMES


class NoLauncher:
    async def launch(self, name: str, entry: ModelEntry, on_progress: Progress) -> Backend:
        raise AssertionError("no model is loaded in this test")


@pytest.mark.parametrize("name", ["'a b'", "-dash-first", "a/b", "'模型'", "x" * 65])
def test_a_model_name_that_cannot_be_a_route_is_rejected(name: str) -> None:
    issue = only_issue(f"models:\n  {name}: {{source: ./m}}\n")
    assert "is not a usable model name" in issue.message
    assert "letters, digits" in issue.hint


@pytest.mark.parametrize("name", ["demo", "Qwen2.5-7B-Instruct", "deepseek_moe", "m1", "x" * 64])
def test_usual_model_names_are_accepted(name: str) -> None:
    assert name in parse_registry(f"models:\n  {name}: {{source: ./m}}\n").models


# -- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("22GiB", 22 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5 GB", 1_500_000_000),
        ("64kb", 64_000),
        ("10", 10),
        (1024, 1024),
    ],
)
def test_sizes_parse_binary_and_decimal_units(text: object, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["lots", "22 GiBs", "-1GiB", "GiB", True, 1.5, None])
def test_a_size_without_a_known_unit_is_rejected(text: object) -> None:
    with pytest.raises(ValueError, match="expected a size such as 22GiB"):
        parse_bytes(text)


def test_memory_maps_take_sizes_keyed_by_device() -> None:
    registry = parse_registry(
        """
gateway:
  memory_budget: {0: 22GiB, cpu: 16GiB}
models:
  m: {source: org/m, hub: modelscope, devices: [0, 1], max_memory: {0: 22GiB, 1: 512MiB}}
"""
    )
    assert registry.gateway.memory_budget == {"0": 22 * 2**30, "cpu": 16 * 2**30}
    assert registry.models["m"].max_memory == {"0": 22 * 2**30, "1": 512 * 2**20}


def test_every_bad_size_in_a_memory_map_is_listed() -> None:
    issues = issues_of("models:\n  m:\n    source: ./m\n    max_memory: {0: lots, 1: more}\n")
    assert [issue.path for issue in issues] == ["models.m.max_memory.0", "models.m.max_memory.1"]
    assert all("max_memory: {0: 22GiB" in issue.hint for issue in issues)


def test_a_zero_size_is_rejected() -> None:
    issue = only_issue("models:\n  m: {source: ./m, memory_bytes: 0GiB}\n")
    assert issue.path == "models.m.memory_bytes"


# -- paths ----------------------------------------------------------------------------------


def test_relative_paths_are_resolved_against_the_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "conf"
    home.mkdir()
    (home / "models.yaml").write_text(
        textwrap.dedent(
            """
            models:
              local:
                source: ./weights/m
                cache_dir: hub-cache
                planning_config: ../plans/m.json
                python_env: {python: ./envs/m/bin/python}
              hubbed:
                source: org/name
                hub: modelscope
                python_env: {python: python3.10}
              absolute:
                source: /opt/models/x
            """
        )
    )
    monkeypatch.chdir(tmp_path)  # somewhere else: the file's directory decides, not the cwd
    loaded = load_registry("conf/models.yaml")
    assert loaded.base_dir == home
    models = loaded.registry.models
    assert models["local"].source == str(home / "weights" / "m")
    assert models["local"].cache_dir == str(home / "hub-cache")
    assert models["local"].planning_config == str(tmp_path / "plans" / "m.json")
    assert models["local"].python_env is not None
    assert models["local"].python_env.python == str(home / "envs" / "m" / "bin" / "python")
    assert models["hubbed"].source == "org/name"  # a hub id, not a path
    assert models["hubbed"].python_env is not None
    assert models["hubbed"].python_env.python == "python3.10"  # looked up on PATH
    assert models["absolute"].source == "/opt/models/x"
    assert loaded.registry.gateway.cache_dir == str(home / ".cache")
    assert loaded.registry.gateway.envs_dir == str(home / ".cache" / "envs")


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file: No such file or directory"):
        load_registry(tmp_path / "nope.yaml")


# -- the file as a whole --------------------------------------------------------------------


def test_a_yaml_syntax_error_reports_its_line() -> None:
    issue = only_issue("models:\n  m:\n    source: ./m\n   dtype: [\n")
    assert issue.message.startswith("not valid YAML")
    assert issue.line == 4


@pytest.mark.parametrize("text", ["", "- a list\n", "just a string\n"])
def test_a_file_that_is_not_a_mapping_is_rejected(text: str) -> None:
    assert "expected a mapping with a `models:` key" in only_issue(text).message


def test_the_models_key_is_required() -> None:
    issue = only_issue("gateway: {port: 6006}\n")
    assert (issue.path, issue.message, issue.hint) == (
        "models",
        "this key is required",
        "add `models:`",
    )


MANY_MISTAKES = """\
gateway:
  default_model: nope
  port: abc
models:
  a:
    source: ./a
    dtype: fp8
    adaptor: chat_template
  v1:
    source: ./v1
  b:
    adapter: nonsense
"""


def test_every_mistake_is_listed_at_once_in_file_order() -> None:
    issues = issues_of(MANY_MISTAKES)
    assert [(issue.line, issue.path) for issue in issues] == [
        (2, "gateway.default_model"),
        (3, "gateway.port"),
        (7, "models.a.dtype"),
        (8, "models.a.adaptor"),
        (9, "models.v1"),
        (11, "models.b"),  # neither source nor upstream
        (12, "models.b.adapter"),
    ]


def test_the_rendered_error_gives_file_line_path_message_and_hint() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_registry(MANY_MISTAKES, "conf/models.yaml")
    text = caught.value.render()
    assert text.startswith("conf/models.yaml: 7 errors\n")
    assert (
        "conf/models.yaml:8: models.a.adaptor: unknown key 'adaptor'\n"
        "    hint: did you mean 'adapter'?"
    ) in text


# -- the CLI --------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], cwd=cwd, capture_output=True, text=True
    )


def shipped_registry(directory: Path) -> Path:
    """The shipped models.yaml beside a built demo model (what `make demo` leaves)."""
    (directory / ".cache" / "demo-model").mkdir(parents=True)
    (directory / "models.yaml").write_text((ROOT / "models.yaml").read_text())
    return directory


def test_check_passes_on_the_shipped_models_yaml_once_the_demo_is_built(tmp_path: Path) -> None:
    result = run_cli("check", cwd=shipped_registry(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "models.yaml: OK (3 models)\n"


def test_check_fails_when_a_local_source_folder_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text((ROOT / "models.yaml").read_text())  # no demo built
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 2
    demo = tmp_path / ".cache" / "demo-model"
    lines = (tmp_path / "models.yaml").read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if "source: ./.cache/demo-model" in text)
    assert f"models.yaml:{line}: models.demo.source: the folder {demo} does not exist" in (
        result.stderr
    )
    assert "hint: fix the path" in result.stderr
    file = tmp_path / "file"
    file.write_text("")
    config = write_config(tmp_path, f"models:\n  m:\n    source: {file}\n")
    assert f"{file} is not a folder" in run_cli("check", "-c", str(config)).stderr


def test_check_fails_for_remote_code_in_a_folder_whose_name_has_a_dot(tmp_path: Path) -> None:
    (tmp_path / "org" / "my-model.v1").mkdir(parents=True)
    config = write_config(
        tmp_path,
        """
        models:
          plain: {source: ./org/my-model.v1}
          coded:
            source: ./org/my-model.v1
            trust_remote_code: true
        """,
    )
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 2
    assert "1 error" in result.stderr  # the same folder without remote code loads fine
    assert "models.yaml:5: models.coded.source: the folder name 'my-model.v1' contains a dot" in (
        result.stderr
    )
    assert "rename the folder, e.g. to 'my-model_v1'" in result.stderr


def test_check_fails_listing_every_error_with_path_line_and_hint(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(MANY_MISTAKES)
    result = run_cli("check", "--config", str(config))
    assert result.returncode != 0
    assert result.stdout == ""
    err = result.stderr
    assert err.startswith(f"{config}: 7 errors\n")
    for line, path in [(2, "gateway.default_model"), (3, "gateway.port"), (7, "models.a.dtype")]:
        assert f"{config}:{line}: {path}: " in err
    assert f"{config}:9: models.v1: the name 'v1' collides" in err
    assert "hint: did you mean 'adapter'?" in err
    assert "hint: rename the model, e.g. 'v1-model'" in err
    assert "Traceback" not in err


def test_check_on_a_missing_file_fails_without_a_traceback(tmp_path: Path) -> None:
    result = run_cli("check", "-c", str(tmp_path / "absent.yaml"))
    assert result.returncode != 0
    assert "cannot read the file" in result.stderr
    assert "Traceback" not in result.stderr


def test_models_lists_every_entry_and_marks_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--config", str(ROOT / "models.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "HUB", "SOURCE", "ADAPTER", "DEVICES"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["demo"][0] == "(default)"
    assert rows["demo"][1:] == [
        "local",
        str(ROOT / ".cache" / "demo-model"),
        "chat_template",
        "cpu",
    ]
    assert rows["deepseek-moe"] == [
        "modelscope",
        "deepseek-ai/deepseek-moe-16b-chat",
        "deepseek_moe",
        "0,1",
    ]
    assert rows["transnormer"] == ["modelscope", "OpenNLPLab/TransNormerLLM-7B", "transnormer", "0"]


def test_models_shows_a_remote_entry_by_its_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  r: {upstream: {url: 'http://10.0.0.2:8000/v1'}}\n")
    assert main(["models", "-c", str(config)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == [
        "r",
        "remote",
        "http://10.0.0.2:8000/v1",
        "chat_template",
        "cpu",
    ]


def test_the_llm_gateway_script_is_installed_and_runs_check(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("llm-gateway")
    directory = shipped_registry(tmp_path)
    result = subprocess.run([str(script), "check"], cwd=directory, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "OK (3 models)" in result.stdout


def test_no_command_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: llm-gateway" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["'models:[x'", "'list[int]'", "'a]['"])
def test_a_key_with_brackets_is_reported_as_an_unknown_key(key: str) -> None:
    issues = issues_of(f"{key}: 1\nmodels: {{}}\n")
    assert [i.message for i in issues] == [f"unknown key {key.strip(chr(39))!r}"]


@pytest.mark.parametrize(
    "setting",
    [
        "probe_interval_s: 1e-300",
        "load_timeout_s: .inf",
        "drain_timeout_s: .inf",
        "idle_unload_s: .nan",
    ],
)
def test_an_interval_or_timeout_that_cannot_work_is_rejected(setting: str) -> None:
    # An infinite timeout never fires; a vanishing probe interval is a busy loop.
    issue = only_issue(f"gateway:\n  {setting}\nmodels:\n  m: {{source: ./m}}\n")
    assert issue.path == f"gateway.{setting.split(':')[0]}"


@pytest.mark.parametrize(
    ("stop", "path"),
    [
        ('[""]', "models.m.generation.stop.0"),
        ("[a, b, c, d, e, f, g, h, i]", "models.m.generation.stop"),
        (f"[{'x' * 257}]", "models.m.generation.stop.0"),
    ],
)
def test_default_stop_strings_are_held_to_what_a_request_may_send(stop: str, path: str) -> None:
    """Filled into every request that sends none, a default a request could not send would
    fail them all with an error naming the client's `stop`."""
    issue = only_issue(f"models:\n  m: {{source: ./m, generation: {{stop: {stop}}}}}\n")
    assert issue.path == path and issue.line is not None


def test_eight_default_stop_strings_are_accepted() -> None:
    registry = parse_registry("models:\n  m: {source: ./m, generation: {stop: [a,b,c,d,e,f,g,h]}}")
    assert len(registry.models["m"].generation.stop) == 8
