"""Every way a registry file can fail to read or parse is a config error, at bounded cost."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cli import main
from gateway.registry.load import ConfigError, load_registry
from gateway.registry.yaml_reader import MAX_DEPTH, MAX_FILE_BYTES

GOOD = "models:\n  m: {source: ./m}\n"


def alias_bomb(levels: int) -> str:
    """The classic: each level lists the one before nine times (9**levels values)."""
    lines = ["x:", "  a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in range(1, levels + 1):
        lines.append(f"  a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    return "\n".join([*lines, "gateway:", f"  memory_budget: {{cpu: *a{levels}}}", GOOD])


def alias_chain(length: int) -> str:
    """Aliases that nest without brackets: each line wraps the one before."""
    lines = ["x:", "  a0: &a0 [1]"]
    lines += [f"  a{i}: &a{i} [*a{i - 1}]" for i in range(1, length + 1)]
    return "\n".join([*lines, GOOD])


# name -> (file contents, what the message says, the line it names or None)
BAD_TEXTS: dict[str, tuple[bytes, str, int | None]] = {
    "invalid utf-8": (b'models:\n  m: {source: ./m, description: "\xff"}\n', "not valid UTF-8", 2),
    "truncated utf-8": (b"models:\n  m: {source: ./m}\n# caf\xc3", "not valid UTF-8", 3),
    "deep brackets": (b"models: " + b"[" * 20_000 + b"]" * 20_000, "nest", 1),
    "deep blocks": (
        ("models:\n" + "".join(" " * i + "- \n" for i in range(1, 200))).encode(),
        "nested deeper",
        None,
    ),
    "alias bomb": (alias_bomb(6).encode(), "once its aliases are expanded", 6),
    "larger alias bomb": (alias_bomb(9).encode(), "once its aliases are expanded", None),
    "alias chain": (alias_chain(5000).encode(), "aliases nest deeper", None),
    "recursive alias": (b"x: &a [*a]\n" + GOOD.encode(), "refers to a node that contains it", 1),
    "impossible date": (
        b"models:\n  m: {source: ./m, description: 2024-02-30}\n",
        "day is out of range",
        2,
    ),
    "bad explicit int": (b"models:\n  m: {source: ./m, pinned: !!int x}\n", "not valid YAML", 2),
    "empty explicit int": (b"models:\n  m: {source: ./m, pinned: !!int }\n", "not valid YAML", 2),
    "bad explicit bool": (b"models:\n  m: {source: ./m, pinned: !!bool x}\n", "not valid YAML", 2),
    "python tag": (b"models: !!python/object:os.system {}\n", "not valid YAML", 1),
    "control character": (b'models:\n  m: {source: "a\x01b"}\n', "unacceptable character", 2),
    "too large": (b"# " + b"x" * MAX_FILE_BYTES + b"\n" + GOOD.encode(), "larger than", None),
}


@pytest.mark.parametrize("name", sorted(BAD_TEXTS))
def test_a_file_that_cannot_be_parsed_is_a_short_config_error_with_its_line(
    name: str, tmp_path: Path
) -> None:
    data, message, line = BAD_TEXTS[name]
    path = tmp_path / "models.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        load_registry(path)
    (issue,) = caught.value.issues
    assert message in issue.message
    if line is not None:
        assert issue.line == line
    assert len(caught.value.render()) < 1000


def test_a_value_quoted_back_in_an_error_is_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    big = "9" * 100_000 + "x"
    path.write_text(f"gateway:\n  memory_budget: {{cpu: '{big}'}}\n{GOOD}")
    with pytest.raises(ConfigError) as caught:
        load_registry(path)
    assert "expected a size" in caught.value.render()
    assert len(caught.value.render()) < 2000


def test_a_file_wrong_everywhere_reports_a_bounded_list(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n" + "".join(f"  m{i}: {{sourc: ./m}}\n" for i in range(5000)))
    with pytest.raises(ConfigError) as caught:
        load_registry(path)
    assert len(caught.value.issues) == 5000  # every entry is listed; the text is not
    rendered = caught.value.render()
    assert rendered.endswith("more") and len(rendered) < 50_000


def test_anchors_and_merge_keys_within_bounds_still_work(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        "  a: &shared {source: ./m, limits: {max_concurrency: 3}}\n"
        "  b: {<<: *shared, pinned: true}\n"
        "  c: *shared\n"
    )
    models = load_registry(path).registry.models
    assert models["b"].limits.max_concurrency == 3 and models["b"].pinned
    assert models["c"] == models["a"]


def make_directory(path: Path) -> None:
    path.mkdir()


def make_symlink_loop(path: Path) -> None:
    other = path.with_name("other.yaml")
    other.symlink_to(path)
    path.symlink_to(other)


def make_fifo(path: Path) -> None:
    os.mkfifo(path)  # opening it blocks until a writer comes, unless the reader refuses


def make_dangling_symlink(path: Path) -> None:
    path.symlink_to(path.with_name("gone.yaml"))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (make_directory, "not a regular file"),
        (make_symlink_loop, "Too many levels of symbolic links"),
        (make_fifo, "not a regular file"),
        (make_dangling_symlink, "No such file or directory"),
    ],
)
def test_a_path_that_is_not_a_readable_file_is_a_config_error(
    make: Callable[[Path], None], message: str, tmp_path: Path
) -> None:
    path = tmp_path / "models.yaml"
    make(path)
    with pytest.raises(ConfigError, match=message):
        load_registry(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(GOOD)
    path.chmod(0)
    with pytest.raises(ConfigError, match="Permission denied"):
        load_registry(path)


def test_the_digest_is_of_the_bytes_that_were_parsed(tmp_path: Path) -> None:
    # One read of the whole file: a file replaced while it is read is parsed as one version.
    path = tmp_path / "models.yaml"
    path.write_text(GOOD)
    first = load_registry(path)
    path.write_text(GOOD.replace("./m", "./n"))
    second = load_registry(path)
    assert first.digest != second.digest and second.text == path.read_text()


@pytest.mark.parametrize("name", ["invalid utf-8", "deep brackets", "alias bomb"])
def test_check_reports_a_broken_file_without_a_traceback(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "models.yaml"
    path.write_bytes(BAD_TEXTS[name][0])
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert BAD_TEXTS[name][1] in err and "Traceback" not in err and len(err) < 1000


def test_depth_within_the_bound_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    nested = "[" * (MAX_DEPTH - 4) + "]" * (MAX_DEPTH - 4)
    path.write_text(f"x: {nested}\n{GOOD}")
    with pytest.raises(ConfigError) as caught:
        load_registry(path)
    assert [issue.message for issue in caught.value.issues] == ["unknown key 'x'"]


@pytest.mark.parametrize(
    "text",
    [
        "gateway: {cache_dir: ~no-such-user-here/cache}\n" + GOOD,
        "models:\n  m: {source: ~no-such-user-here/m}\n",
    ],
)
def test_a_home_folder_of_an_unknown_user_is_a_config_error(text: str, tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="cannot expand the path '~no-such-user-here/"):
        load_registry(path)


def test_a_path_through_a_symlink_loop_is_kept_as_written(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  m: {source: ./loop/m}\n")
    assert load_registry(path).registry.models["m"].source == str(tmp_path / "loop" / "m")


YAML_PIECES = st.sampled_from(
    [
        "models:", "gateway:", "\n", "  ", "- ", "[", "]", "{", "}", ": ", ", ", "&a ", "*a",
        "<<: ", "!!int ", "!!binary ", "!!python/name:os.system ", "'", '"', "\\", "#", "~",
        "2024-02-30", "1e9999", "0x", "\t", "\x00", "\ufeff", "\ud800", "m", "source: ./m",
        "memory_budget: ", "22GiB", "null", "---", "...", "%YAML 1.1", "? ",
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.lists(YAML_PIECES, max_size=40).map("".join)))
def test_any_file_contents_give_a_registry_or_a_config_error(contents: bytes | str) -> None:
    data = contents if isinstance(contents, bytes) else contents.encode("utf-8", "surrogatepass")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "models.yaml"
        path.write_bytes(data)
        try:
            load_registry(path)
        except ConfigError as exc:
            assert len(exc.render()) < 5000
