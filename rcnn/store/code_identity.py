"""Which of our own modules a stage's output depends on, and their digests.

A stage's code is the module that defines it plus every first-party module
(``rcnn`` and below) it imports, followed transitively. The imports are read from
the source with :mod:`ast` (those inside functions too), not listed by hand, so a
helper a stage starts to use can never be forgotten. A package's ``__init__`` is
counted only where it is imported for itself (``from rcnn import __version__``),
not because a submodule lives in it: ``rcnn.stages``'s ``__init__`` imports every
stage, and counting it would tie each stage to all the others.
Everything is computed once per process (:func:`clear` forgets it, for tests).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path

FIRST_PARTY = "rcnn"


def _first_party(name: str) -> bool:
    return name == FIRST_PARTY or name.startswith(FIRST_PARTY + ".")


@functools.cache
def _spec(name: str):
    """The module's import spec, or None when ``name`` is no first-party module (an attribute, say)."""
    parent = name.rpartition(".")[0]
    if parent and (_spec(parent) is None or _spec(parent).submodule_search_locations is None):
        return None  # only a package has submodules; `rcnn.config.PipelineConfig` is a class
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def source_path(name: str) -> Path:
    spec = _spec(name)
    if spec is None or not spec.origin or not spec.has_location:
        raise LookupError(f"no source file for module '{name}'")
    return Path(spec.origin)


def read_source(path: Path) -> bytes:
    """A module's source bytes (the one place they are read: tests replace it to simulate an edit)."""
    return path.read_bytes()


@functools.cache
def _source(name: str) -> bytes:
    return read_source(source_path(name))


@functools.cache
def direct_imports(name: str) -> frozenset[str]:
    """The first-party modules that ``name``'s source imports anywhere in its body."""
    is_package = _spec(name).submodule_search_locations is not None
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(_source(name), filename=str(source_path(name)))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if _first_party(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            if not base or not _first_party(base):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import mod` imports the module; `from pkg import name` imports pkg itself.
                found.add(sub if alias.name != "*" and _spec(sub) is not None else base)
    return frozenset(m for m in found if _spec(m) is not None and m != name)


@functools.cache
def closure(name: str) -> tuple[str, ...]:
    """``name`` and every first-party module it imports, directly or through others, sorted."""
    seen, todo = {name}, [name]
    while todo:
        for dep in direct_imports(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return tuple(sorted(seen))


def module_digest(name: str) -> str:
    """blake2b-128 of one module's source bytes."""
    return hashlib.blake2b(_source(name), digest_size=16).hexdigest()


def module_digests(name: str) -> dict[str, str]:
    """Digest of each module in ``name``'s :func:`closure`."""
    return {m: module_digest(m) for m in closure(name)}


def combined_digest(digests: dict[str, str]) -> str:
    """One digest for a set of module digests: a change to any module changes it."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(digests):
        h.update(f"{name}={digests[name]}\n".encode())
    return h.hexdigest()


def changed_modules(recorded: dict[str, str], now: dict[str, str]) -> list[str]:
    """The modules whose source differs between two :func:`module_digests`, with those added or dropped."""
    out = []
    for name in sorted(set(recorded) | set(now)):
        if name not in recorded:
            out.append(f"{name} (newly imported)")
        elif name not in now:
            out.append(f"{name} (no longer imported)")
        elif recorded[name] != now[name]:
            out.append(name)
    return out


def clear() -> None:
    """Forget every source, import list and digest read so far."""
    for f in (_spec, _source, direct_imports, closure):
        f.cache_clear()
