"""YAML as pipelines and ``--set`` values are written: ``1e-4`` is a number, ``yes`` is a word, a key is given once.

PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent (``1.0e-4``), so ``lr: 1e-4``
would load as the string ``"1e-4"`` and be refused as "not a number"; and where ``yes``, ``no``, ``on`` and
``off`` are booleans, so ``classes: [yes, no]`` would load as ``[True, False]``. YAML 1.2 reads the first as a
float and the others as strings (only ``true`` and ``false`` are booleans); this loader does too. A key given
twice in one mapping (PyYAML keeps the last one silently) is refused, naming the key and its lines. It is
otherwise PyYAML's safe loader.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from rcnn.errors import ConfigError

_FLOAT_1_2 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
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
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # The keys written in this mapping: one merged in by ``<<: *anchor`` may be given again (what a merge is for).
        seen: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: the base class refuses it
                continue
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _BOOL_1_2, list("tTfF"))


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
