"""Read and parse a YAML file with bounded cost, whatever the file holds.

Every way a file can fail (it cannot be opened, is not a regular file, is too large, is not
UTF-8, is not YAML, nests too deeply, or expands its aliases into something huge) becomes one
`YamlProblem` with a line where one exists, so callers report it like any other mistake. The
bounds keep a hostile or broken file from costing more than a small file would: an alias bomb
(`a1: &a1 [*a0, *a0, ...]` nested a few levels) grows exponentially, so expansion is counted
on the composed graph, where each alias is a shared node, before anything is constructed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

import yaml

MAX_FILE_BYTES = 256 << 10  # a registry of hundreds of models is a few tens of KiB
MAX_DEPTH = 64  # the schema nests five levels; PyYAML recurses per level
MAX_NODES = 200_000  # nodes after expanding every alias (more than 256 KiB can write out)
MAX_SCALAR_CHARS = 4 << 20  # characters of every scalar after expanding every alias
MAX_ECHO = 200  # characters of a value quoted back in a message


class YamlProblem(Exception):
    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """`text`, cut to `limit` characters with a note of how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole file, read once (so a file replaced mid-read is one version or the other)."""
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise YamlProblem(f"cannot read the file: {exc.strerror or exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise YamlProblem("cannot read the file: it is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise YamlProblem(f"cannot read the file: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise YamlProblem(f"the file is larger than {MAX_FILE_BYTES} bytes")
    return data


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        byte = data[exc.start : exc.start + 1].hex()
        raise YamlProblem(f"not valid UTF-8 (byte 0x{byte}): save it as UTF-8", line) from None


@dataclass(frozen=True)
class Parsed:
    root: yaml.Node | None  # the composed document, for line numbers
    data: Any


def parse(text: str) -> Parsed:
    """Compose and construct one YAML document, refusing what would cost too much."""
    try:
        _check_depth(text)
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            if root is not None:
                _check_expansion(root)
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except YamlProblem:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else _reader_line(exc, text)
        raise YamlProblem(f"not valid YAML: {clip(str(exc), 400)}", line) from None
    except RecursionError:  # not expected within the bounds above; never a traceback
        raise YamlProblem(f"nested deeper than {MAX_DEPTH} levels") from None
    return Parsed(root, data)


# libyaml's parser where PyYAML was built with it: the pure-Python one is ten times slower.
_Base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[valid-type,misc]
    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (YamlProblem, yaml.YAMLError):
            raise
        except Exception as exc:
            # The safe constructor's own conversions fail in their own ways: `!!int x` and
            # 2024-02-30 (ValueError), an empty `!!int` (IndexError), `!!bool x` (KeyError).
            message = f"not valid YAML: {clip(str(exc) or type(exc).__name__)}"
            raise YamlProblem(message, _line(node)) from None


def _reader_line(exc: yaml.YAMLError, text: str) -> int | None:
    position = getattr(exc, "position", None)  # a ReaderError: an unacceptable character
    return text.count("\n", 0, position) + 1 if isinstance(position, int) else None


def _check_depth(text: str) -> None:
    """The parser is iterative; the composer and constructor recurse per level."""
    depth = 0
    for event in yaml.parse(text, Loader=_Base):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else None
                raise YamlProblem(f"nested deeper than {MAX_DEPTH} levels", line)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_expansion(root: yaml.Node) -> None:
    """Count nodes, scalar characters and depth as if every alias were written out.

    Memoized per node, so the walk costs what the file's size does; aliases can also nest
    without brackets (`a2: &a2 [*a1]` line after line), hence the depth check here too.
    """
    sizes: dict[int, tuple[int, int, int]] = {}  # node -> (nodes, characters, height)
    busy: set[int] = set()

    def size(node: yaml.Node, depth: int) -> tuple[int, int, int]:
        key = id(node)
        if key in busy:
            raise YamlProblem("an alias refers to a node that contains it", _line(node))
        found = sizes.get(key)
        if found is None and depth <= MAX_DEPTH:
            found = sizes[key] = _measure(node, depth)
        if found is None or depth + found[2] > MAX_DEPTH:
            raise YamlProblem(f"its aliases nest deeper than {MAX_DEPTH} levels", _line(node))
        return found

    def _measure(node: yaml.Node, depth: int) -> tuple[int, int, int]:
        if isinstance(node, yaml.ScalarNode):
            return 1, len(node.value), 0
        busy.add(id(node))
        nodes, chars, height = 1, 0, 0
        children = node.value if isinstance(node, yaml.SequenceNode) else _pairs(node)
        for child in children:
            n, c, h = size(child, depth + 1)
            nodes, chars, height = nodes + n, chars + c, max(height, h + 1)
            if nodes > MAX_NODES or chars > MAX_SCALAR_CHARS:
                raise YamlProblem(
                    f"it holds more than {MAX_NODES} values or {MAX_SCALAR_CHARS} characters "
                    "once its aliases are expanded",
                    _line(child),
                )
        busy.discard(id(node))
        return nodes, chars, height

    size(root, 0)


def _pairs(node: yaml.Node) -> list[yaml.Node]:
    return [part for pair in node.value for part in pair]


def _line(node: yaml.Node) -> int | None:
    return node.start_mark.line + 1 if node.start_mark is not None else None
