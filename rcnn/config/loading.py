"""Pipeline configuration: ``pipelines.yaml`` loaded into frozen, typed dataclasses.

The file is read once; unknown keys, wrong types and bad choices are rejected with
the key and the file named. ``--set key=value`` overrides are typed the same way.
Nothing mutates a configuration after loading; stages receive plain values from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rcnn.config.checks import check_number, check_path, check_together
from rcnn.config.schema import PipelineConfig
from rcnn.config.seeds import SEED_KEYS, SEEDED_NAME, split_seeded_name
from rcnn.config.yamlfile import load_yaml, parse_override
from rcnn.data.filenames import name_problem
from rcnn.errors import ConfigError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: str, where: str) -> str:
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        return default

    return _ENV.sub(sub, value)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is tuple:
        return "a list"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return "a mapping" if dataclasses.is_dataclass(tp) else str(tp)


def _coerce(tp: Any, value: Any, key: str, where: str, base: Path | None) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it; raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1 and dataclasses.is_dataclass(alternatives[0]):  # an optional section: its key's error
            return _coerce(alternatives[0], value, key, where, base)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, where, base)
            except ConfigError as e:
                errors.append(str(e))
        allowed = " or ".join(_type_name(a) for a in args if a is not type(None))
        allowed += " or null" if type(None) in args else ""
        raise ConfigError(f"{where}: '{key}' must be {allowed}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{key}[{i}]", where, base) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key, where, base)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond a float's range: refused as not finite, as 1e400 is
            return math.inf if value > 0 else -math.inf
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        return _expand_env(value, where)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, raw: dict, prefix: str, where: str, base: Path | None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{where}: unknown key '{full}' (known keys here: {known})")
        written, value = value, _coerce(hints[key], value, full, where, base)
        keywords = fields[key].metadata.get("keywords", ())
        is_keyword = value in keywords or (isinstance(value, str) and value.startswith("pipeline:"))
        if fields[key].metadata.get("path") and isinstance(value, str) and not is_keyword:
            check_path(value, written, full, where)
            value = os.path.expanduser(value)
            value = str((base / value).resolve()) if base is not None and not os.path.isabs(value) else value
        check_number(fields[key].metadata.get("range"), value, full, where)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{where}: {prefix or 'pipeline'}: {e}") from None


def _dotted_keys(raw: dict, prefix: str = "") -> list[str]:
    """The leaf keys of a nested mapping, dotted (``{"a": {"b": 1}}`` -> ``["a.b"]``)."""
    keys = []
    for key, value in raw.items():
        full = f"{prefix}{key}"
        keys.extend(_dotted_keys(value, full + ".") if isinstance(value, dict) and value else [full])
    return keys


def _anchor_paths(cls: type, raw: dict, base: Path) -> dict:
    """``raw`` with each relative path made absolute against ``base``, in a plain value or in the default of a
    ``${VAR:-default}`` (the variable itself is kept, so that hints can still name it)."""

    def absolute(text: str) -> str:
        return text if not text or os.path.isabs(text := os.path.expanduser(text)) else str((base / text).resolve())

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(raw)
    for key, value in raw.items():
        if key not in fields:
            continue  # refused, naming the key, when the pipeline is built
        tp = hints[key]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if isinstance(value, dict) and dataclasses.is_dataclass(tp):
            out[key] = _anchor_paths(tp, value, base)
        elif fields[key].metadata.get("path") and isinstance(value, str):
            if value in fields[key].metadata.get("keywords", ()) or value.startswith("pipeline:"):
                continue
            if _ENV.search(value):
                out[key] = _ENV.sub(lambda m: m[0] if m[2] is None else f"${{{m[1]}:-{absolute(m[2])}}}", value)
            else:
                out[key] = absolute(value)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_override_path(cls: type, dotted: str) -> None:
    """Reject ``--set`` keys that name no field, naming the first wrong part."""
    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        # Unwrap Optional[Dataclass] so nested optional sections can be overridden.
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--set {dotted}: '{'.'.join(parts[:i])}' is not a section")
        hints = typing.get_type_hints(tp)
        if part not in hints or part == "name":
            known = ", ".join(h for h in hints if h != "name")
            raise ConfigError(f"--set {dotted}: unknown key '{part}' (known keys here: {known})")
        tp = hints[part]


def _apply_override(raw: dict, dotted: str, value: Any) -> dict:
    parts = dotted.split(".")
    node = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        node = {part: node}
    return _merge(raw, node)


class PipelineFile:
    """The parsed ``pipelines.yaml``: raw sections per pipeline, built on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"pipeline file '{self.path}' does not exist")
        try:
            doc = load_yaml(self.path.read_text(), str(self.path))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{self.path}: not valid YAML{at}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("pipelines"), dict):
            raise ConfigError(f"{self.path}: expected a top-level 'pipelines:' mapping")
        unknown = set(doc) - {"pipelines"}
        if unknown:
            raise ConfigError(f"{self.path}: unknown top-level key '{sorted(unknown)[0]}' (only 'pipelines')")
        self._raw: dict[str, dict] = doc["pipelines"]
        for name, section in self._raw.items():
            # A pipeline's name is its folder in the runs folder, beside the runs folder's own '_data'.
            problem = name_problem(name) or ("it starts with '_' or '.'" if name.startswith(("_", ".")) else None)
            if problem is None and SEEDED_NAME.match(name):
                problem = "NAME@seed<k> means pipeline NAME with seed k"
            if problem is not None:
                raise ConfigError(f"{self.path}: pipeline name {name!r} cannot be a folder name ({problem})")
            if not isinstance(section, dict):
                raise ConfigError(f"{self.path}: pipeline '{name}' must be a mapping")
        # A file of your own adds to the pipelines shipped with the package: a name it does not define (as a
        # pipeline or as a parent to extend) is the shipped one; one it defines replaces the shipped one.
        shipped = self.path.resolve() == SHIPPED_PIPELINES.resolve() or not SHIPPED_PIPELINES.is_file()
        self._shipped: PipelineFile | None = None if shipped else PipelineFile(SHIPPED_PIPELINES)

    def file_of(self, name: str) -> Path:
        """The file pipeline ``name`` is defined in: this one, or the package's for a shipped one it leaves alone."""
        name = split_seeded_name(name)[0]
        return self._shipped.path if name not in self._raw and self._shipped and name in self._shipped._raw else self.path

    @property
    def relative_to(self) -> Path:
        """The folder relative paths in the file are resolved against: the file's own, except for the copy
        installed inside the package, whose relative paths can only mean the working directory."""
        folder = self.path.resolve().parent
        return Path.cwd() if folder == SHIPPED_PIPELINES.parent.resolve() else folder

    @property
    def names(self) -> list[str]:
        """This file's pipelines, then the shipped ones it does not redefine."""
        return [*self._raw, *(n for n in (self._shipped.names if self._shipped else ()) if n not in self._raw)]

    def _resolved_raw(self, name: str, seen: tuple[str, ...] = ()) -> dict:
        if name not in self._raw and self._shipped is not None and name in self._shipped._raw:
            # Its parents are the shipped file's own (no cycle through this file), and its relative paths mean what
            # they mean there, also in a pipeline of this file that extends it.
            return _anchor_paths(PipelineConfig, self._shipped._resolved_raw(name), self._shipped.relative_to)
        if name not in self._raw:
            known = ", ".join(self.names)
            mine = "pipelines of yours: ./pipelines.yaml, or the file --pipelines-file FILE or $RCNN_PIPELINES names"
            where = f"{self.path} or the shipped {SHIPPED_PIPELINES.name}" if self._shipped else f"{self.path} ({mine})"
            raise ConfigError(f"unknown pipeline '{name}' in {where} (known: {known})")
        if name in seen:
            raise ConfigError(f"{self.path}: pipeline '{name}' extends itself through {' -> '.join(seen)}")
        raw = dict(self._raw[name])
        parent = raw.pop("extends", None)
        if parent is None:
            return raw
        if not isinstance(parent, str):
            raise ConfigError(f"{self.path}: '{name}.extends' must be a pipeline name")
        base = self._resolved_raw(parent, seen + (name,))
        base.pop("description", None)
        return _merge(base, raw)

    def environment_variables(self, name: str, dotted: str) -> list[str]:
        """The ``${VAR}`` names the raw (unexpanded) value of ``dotted`` reads, e.g. ``["RCNN_VOC07_MINI"]``."""
        node: Any = self._resolved_raw(split_seeded_name(name)[0])
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return [m[0] for m in _ENV.findall(node)] if isinstance(node, str) else []

    def origins(self, name: str, overrides: typing.Sequence[str] = ()) -> dict[str, str]:
        """Where each dotted key that is set comes from: ``--set``, ``pipeline`` or ``parent NAME``.

        Keys absent from the result keep their defaults.
        """
        base, seed = split_seeded_name(name)
        if seed is not None:
            return {**self.origins(base, overrides), **dict.fromkeys(SEED_KEYS, f"name @seed{seed}")}
        if name not in self._raw and self._shipped is not None and name in self._shipped._raw:
            return self._shipped.origins(name, overrides)
        chain: list[tuple[str, dict]] = []  # (name, section) from the pipeline up to its farthest ancestor
        current, sections = name, self._raw
        while current is not None:
            if current not in sections and self._shipped is not None:
                sections = self._shipped._raw  # a shipped parent: its own ancestors are shipped ones too
            section = sections.get(current, {})
            chain.append((current, section))
            current = section.get("extends")
        out: dict[str, str] = {}
        for k, (section_name, section) in enumerate(reversed(chain)):  # the farthest ancestor first, so nearer ones win
            origin = "pipeline" if k == len(chain) - 1 else f"parent {section_name}"
            raw = {key: v for key, v in section.items() if key != "extends"}
            if section_name != name:
                raw.pop("description", None)
            out.update(dict.fromkeys(_dotted_keys(raw), origin))
        for text in overrides:
            key, value = parse_override(text)
            if not isinstance(value, dict):  # a mapping merges into the section; anything else replaces it whole
                out = {k: v for k, v in out.items() if k != key and not k.startswith(key + ".")}
            out.update(dict.fromkeys(_dotted_keys({key: value}), "--set"))
        return out

    def load(self, name: str, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
        """Build pipeline ``name`` with ``--set`` style overrides applied, fully validated.

        ``NAME@seed<k>`` builds NAME with :data:`SEED_KEYS` set to k, named ``NAME@seed<k>``.
        """
        if name not in self._raw and self._shipped is not None and name in self._shipped._raw:
            return self._shipped.load(name, overrides)  # its relative paths mean what they mean in the shipped file
        base, seed = split_seeded_name(name)
        if seed is not None:
            for text in overrides:
                key = parse_override(text)[0]
                if key in SEED_KEYS:
                    raise ConfigError(f"--set {key}: pipeline '{name}' has seed {seed} by its name; run '{base}' to set it")
            cfg = self.load(base, [*overrides, *(f"{key}={seed}" for key in SEED_KEYS)])
            return dataclasses.replace(cfg, name=name)
        where = f"{self.path} (pipeline '{name}')"
        raw = self._resolved_raw(name)
        cfg = _build(PipelineConfig, {"name": name, **raw}, "", where, self.relative_to)
        if not overrides:
            check_together(cfg, where)
            return cfg
        # Overrides are resolved against the working directory, as a user typing
        # a path on the command line expects; values from the file were already
        # resolved against the file's folder above.
        raw = dataclasses.asdict(cfg)
        for text in overrides:
            key, value = parse_override(text)
            _check_override_path(PipelineConfig, key)
            raw = _apply_override(raw, key, value)
        where = f"--set on pipeline '{name}'"
        cfg = _build(PipelineConfig, raw, "", where, Path.cwd())
        check_together(cfg, where)
        return cfg


def fingerprint_params(section: Any) -> dict:
    """The fields of a config section that change a stage's output, as plain JSON values."""
    out = {}
    for f in dataclasses.fields(section):
        if not f.metadata.get("fingerprint", True):
            continue
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            value = fingerprint_params(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def section_kwargs(cls: type, section: Any) -> dict:
    """A config section's values for the fields of the dataclass ``cls`` that it names alike: how a stage
    hands a section to a library class as plain keyword arguments (``cls(**section_kwargs(cls, section))``)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(cls) if hasattr(section, f.name)}


# The pipelines shipped with the package (in a checkout, a link to the top-level pipelines.yaml).
SHIPPED_PIPELINES = Path(__file__).parent.parent / "pipelines.yaml"


def default_pipelines_file() -> Path:
    """``$RCNN_PIPELINES``, else ``./pipelines.yaml``, else the one shipped with the package."""
    env = os.environ.get("RCNN_PIPELINES")
    if env:
        return Path(env)
    local = Path("pipelines.yaml")
    if local.is_file():
        return local
    return SHIPPED_PIPELINES
