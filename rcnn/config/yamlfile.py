"""YAML as pipelines and ``--set`` values are written: ``1e-4`` is a number, ``yes`` is a word, a key is given once.

PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent (``1.0e-4``), so ``lr: 1e-4``
would load as the string ``"1e-4"`` and be refused as "not a number"; and where ``yes``, ``no``, ``on`` and
``off`` are booleans, so ``classes: [yes, no]`` would load as ``[True, False]``. YAML 1.2 reads the first as a
float and the others as strings (only ``true`` and ``false`` are booleans). This loader resolves plain scalars
as YAML 1.2's core schema does, integers too (``017`` is 17, not octal 15; ``1:30``, ``0b11``, ``1_000`` and
``2024-01-05`` stay strings, as typed). A key given twice in one mapping (PyYAML keeps the last one silently)
is refused, naming the key and its lines. It is otherwise PyYAML's safe loader.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from rcnn.errors import ConfigError

# YAML 1.2's core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution): the numbers, booleans and nulls
# there are; everything else (``1:30``, ``0b11``, ``2007_000``, ``2024-01-05``) is a string, as typed.
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_INT_1_2 = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_1_2 = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_BOOL_TAG = "tag:yaml.org,2002:bool"
_BOOL_1_2 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"{key!r} given twice")
        self.key, self.line, self.first = key, line, first


class _Loader(yaml.SafeLoader):
    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        # Checked as composed, before PyYAML flattens merges (in place, into the merged node too): the keys
        # written in this mapping. One brought in by ``<<: *anchor`` may be given again (what a merge is for).
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key_node.value, line, seen[key])
            seen[key] = line
        return node


_REPLACED = {_BOOL_TAG, _INT_TAG, _FLOAT_TAG, "tag:yaml.org,2002:timestamp"}
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _BOOL_1_2, list("tTfF"))
_Loader.add_implicit_resolver(_INT_TAG, _INT_1_2, list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_1_2, list("-+0123456789."))


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text)  # 017 is seventeen, as in YAML 1.2 (1.1 read it as octal 15)


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


_Loader.add_constructor(_INT_TAG, _construct_int)
_Loader.add_constructor(_FLOAT_TAG, _construct_float)


def load_yaml(text: str, where: str = "") -> Any:
    """Parse YAML text with PyYAML's safe loader, as YAML 1.2 reads numbers (``1e-4`` and ``5E3`` are floats) and
    booleans (only ``true`` and ``false``; ``yes``, ``no``, ``on``, ``off`` are strings).

    Raises:
        ConfigError: a key is given twice in one mapping, naming ``where``, the key and its lines.
        yaml.YAMLError: the text is not YAML.
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        lines = f"lines {e.first} and {e.line}" if e.first != e.line else f"line {e.line}"
        raise ConfigError(
            f"{where + ': ' if where else ''}key {e.key!r} is given twice in one mapping ({lines}); YAML would keep "
            "only the last: remove one, or rename it"
        ) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)`` with the value parsed as YAML (so 3 is an int)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw, f"--set {text}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
