"""Reading documents nobody vouched for: task files, submission metadata, result documents, manifests.

Every reader here bounds what it reads before parsing it, and turns every way a file can be wrong
into one SpecError line naming the file:

- size: at most ``max_bytes`` are read, whatever the file claims or grows to while read;
- kind: only a regular file is read (a FIFO would block, /dev/zero would never end), and a symbolic
  link only where the caller allows it;
- encoding: UTF-8, or one line saying which byte is not;
- YAML: no anchors or aliases (a 510-byte "billion laughs" document expands to gigabytes), bounded
  nesting and node count, no duplicate keys (the last one would silently win);
- JSON: bounded nesting (deep arrays exhaust the parser's stack).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError
from .limits import JSON_CONTAINERS, JSON_DEPTH, YAML_DEPTH, YAML_NODES, nesting_depth, size_text


def read_bounded(path: Path, max_bytes: int, follow_symlinks: bool = True) -> bytes:
    """The bytes of the regular file ``path``, refused if larger than ``max_bytes``."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    if not follow_symlinks and Path(path).is_symlink():  # O_NOFOLLOW is the guard; this gives the clear message
        raise SpecError(f"{path}: is a symbolic link; refused (commit the file itself)")
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SpecError(f"{path}: not a regular file; refused")
        if info.st_size > max_bytes:
            raise SpecError(f"{path}: {size_text(info.st_size)}, larger than the {size_text(max_bytes)} allowed; refused")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise SpecError(f"{path}: larger than the {size_text(max_bytes)} allowed; refused")
    return data


def decode_utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                        "save the file as UTF-8") from None


_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """yaml's safe loader, refusing duplicate keys in a mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the base class says so
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _line(event_or_error: Any) -> str:
    mark = getattr(event_or_error, "start_mark", None) or getattr(event_or_error, "problem_mark", None)
    return f":{mark.line + 1}" if mark is not None else ""


def parse_yaml(text: str, source: str, max_depth: int = YAML_DEPTH, max_nodes: int = YAML_NODES) -> Any:
    """YAML text to plain data, refusing anchors, aliases, deep nesting and too many nodes (checked on the
    event stream, before anything is built)."""
    try:
        depth = nodes = 0
        for event in yaml.parse(text, Loader=_BaseLoader):
            if isinstance(event, yaml.AliasEvent):
                raise SpecError(f"{source}{_line(event)}: YAML alias *{event.anchor} refused: anchors and aliases "
                                "are not allowed in this file (write the value out)")
            if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
                raise SpecError(f"{source}{_line(event)}: YAML anchor &{event.anchor} refused: anchors and aliases "
                                "are not allowed in this file (write the value out)")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > max_depth:
                    raise SpecError(f"{source}{_line(event)}: nested deeper than {max_depth} levels; refused")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            if isinstance(event, yaml.NodeEvent):
                nodes += 1
                if nodes > max_nodes:
                    raise SpecError(f"{source}{_line(event)}: more than {max_nodes} values; refused")
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a safe loader: no Python objects)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{source}{_line(exc)}: not valid YAML: {problem}") from None
    except (ValueError, OverflowError, TypeError) as exc:  # a tagged or implicit value yaml cannot build (2020-13-45)
        raise SpecError(f"{source}: not valid YAML: a value cannot be read ({str(exc)[:120]})") from None


def read_yaml_file(path: Path, max_bytes: int, follow_symlinks: bool = True) -> Any:
    return parse_yaml(decode_utf8(path, read_bounded(path, max_bytes, follow_symlinks)), str(path))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: json keeps the last of a repeated key silently, so
    what a reader sees first in the file would not be what is checked (YAML refuses them too)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {repeated[:40]!r} appears twice in one object")
    return data


def read_json_file(path: Path, max_bytes: int, max_depth: int = JSON_DEPTH, follow_symlinks: bool = True) -> Any:
    """A JSON document of at most ``max_bytes``, nested at most ``max_depth`` deep."""
    text = decode_utf8(path, read_bounded(path, max_bytes, follow_symlinks))
    containers = text.count("{") + text.count("[")  # an upper bound (brackets in strings count too), before parsing
    if containers > JSON_CONTAINERS:
        raise SpecError(f"{path}: not a readable JSON document: more than {JSON_CONTAINERS} lists and objects")
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise SpecError(f"{path}: not a readable JSON document: nested deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise SpecError(f"{path}: not a readable JSON document: {exc}") from None
    if nesting_depth(data) > max_depth:
        raise SpecError(f"{path}: not a readable JSON document: nested deeper than {max_depth} levels")
    try:  # JSON's \ud800-style escapes can spell half a character, which no UTF-8 page or file can hold
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError(f"{path}: not a readable JSON document: a string holds a lone surrogate (an escape "
                        "between \\ud800 and \\udfff that is not half of a pair), which is not text") from None
    return data
