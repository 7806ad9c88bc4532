"""The on-disk artifact store: one folder per pipeline, stage and split.

A unit (pipeline, stage, split) is complete when its ``manifest.json`` exists;
the manifest is written last, atomically, and records what the outputs were made
from. A unit is *fresh* when the fingerprint of its parameters, inputs and code
matches the manifest's; otherwise it is *stale*, with the reasons. Work in
progress lives in ``<unit>/.work`` (tagged with its fingerprint, so a change of
parameters never resumes from records made under the old ones), and a lock file
stops two processes writing one unit.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcnn.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
WORK = ".work"
LOCK = ".lock"


def file_digest(path: Path) -> str:
    """blake2b-128 of a file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_digest(value: Any) -> str:
    """Stable hash of a JSON-serialisable value."""
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=16).hexdigest()


def library_versions() -> dict[str, str]:
    import cv2
    import h5py
    import numpy
    import sklearn
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "opencv": cv2.__version__,
        "scikit-learn": sklearn.__version__,
        "h5py": h5py.__version__,
    }


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temporary file beside ``path``, fsync it and rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Fingerprint:
    """What a unit's outputs depend on: parameters, input digests, code digest, schema."""

    stage: str
    schema_version: int
    params: dict
    inputs: dict[str, str]
    code: str

    @property
    def digest(self) -> str:
        return json_digest(
            {"stage": self.stage, "schema": self.schema_version, "params": self.params, "inputs": self.inputs, "code": self.code}
        )


@dataclass
class UnitStatus:
    state: str  # "done" | "stale" | "missing"
    reasons: list[str] = field(default_factory=list)
    manifest: dict | None = None


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def read_manifest(unit_dir: Path) -> dict | None:
    """The unit's manifest, or None when absent; a damaged one is an error naming the file."""
    path = Path(unit_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"'{path}' is damaged (not valid JSON); rerun the stage with --force") from None
    required = {"manifest_schema", "fingerprint", "outputs", "params", "inputs"}
    if not isinstance(manifest, dict) or not required <= set(manifest):
        raise UserError(f"'{path}' is not an rcnn manifest; rerun the stage with --force")
    if manifest["manifest_schema"] != MANIFEST_SCHEMA:
        raise UserError(f"'{path}' has manifest schema {manifest['manifest_schema']}, expected {MANIFEST_SCHEMA}")
    return manifest


def unit_status(unit_dir: Path, expected: Fingerprint) -> UnitStatus:
    """Compare the unit on disk with what its inputs, parameters and code now call for."""
    manifest = read_manifest(unit_dir)
    if manifest is None:
        return UnitStatus("missing", ["never completed"])
    if manifest["fingerprint"] == expected.digest:
        missing = [name for name in manifest["outputs"] if not (Path(unit_dir) / name).is_file()]
        if missing:
            return UnitStatus("stale", [f"output {missing[0]} was deleted"], manifest)
        return UnitStatus("done", [], manifest)
    reasons = []
    if manifest.get("schema_version") != expected.schema_version:
        reasons.append(f"output format changed (v{manifest.get('schema_version')} -> v{expected.schema_version})")
    reasons += [f"parameter {d}" for d in _diff(manifest["params"], expected.params)]
    for name in sorted(set(manifest["inputs"]) | set(expected.inputs)):
        if manifest["inputs"].get(name) != expected.inputs.get(name):
            reasons.append(f"input {name} changed")
    if manifest.get("code", {}).get("digest") != expected.code:
        reasons.append("code changed")
    return UnitStatus("stale", reasons or ["fingerprint changed"], manifest)


@contextmanager
def unit_lock(unit_dir: Path, wait: bool = False, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on a unit; the OS releases it if the process dies."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(unit_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise UserError(
                f"another rcnn process is writing {what or unit_dir} (lock {unit_dir / LOCK}); wait for it or rerun with --wait"
            ) from None
        yield
    finally:
        os.close(fd)


def work_dir(unit_dir: Path, fingerprint: Fingerprint) -> Path:
    """The unit's scratch folder, emptied first if it holds work for another fingerprint."""
    work = Path(unit_dir) / WORK
    tag = work / "fingerprint"
    if work.exists() and (not tag.is_file() or tag.read_text().strip() != fingerprint.digest):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not tag.is_file():
        tag.write_text(fingerprint.digest + "\n")
    return work


def commit(unit_dir: Path, staged: dict[str, Path], manifest: dict) -> dict:
    """Move finished outputs into the unit and write its manifest last.

    ``staged`` maps output names (relative to the unit) to files already complete
    on the same filesystem. The old manifest goes first, so a crash in between
    leaves the unit incomplete rather than wrongly complete.
    """
    unit_dir = Path(unit_dir)
    try:
        previous = read_manifest(unit_dir)
    except UserError:
        previous = None
    (unit_dir / MANIFEST).unlink(missing_ok=True)
    # Outputs of the previous run that this one does not rewrite would only waste disk.
    root = unit_dir.resolve()
    for name in (previous or {}).get("outputs", {}):
        old = (unit_dir / name).resolve()
        if name not in staged and root in old.parents:  # a tampered manifest must not delete elsewhere
            old.unlink(missing_ok=True)
    outputs = {}
    for name, src in staged.items():
        dst = unit_dir / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        outputs[name] = {"digest": file_digest(dst), "bytes": dst.stat().st_size}
    manifest = {**manifest, "manifest_schema": MANIFEST_SCHEMA, "outputs": outputs}
    write_json_atomic(unit_dir / MANIFEST, manifest)
    shutil.rmtree(unit_dir / WORK, ignore_errors=True)
    return manifest


def outputs_digest(manifest: dict) -> str:
    """What downstream units record as this unit's input: the digest of its outputs."""
    return json_digest({k: v["digest"] for k, v in manifest["outputs"].items()})


def find_equivalent(runs_dir: Path, stage: str, split: str, fingerprint: Fingerprint, exclude: Path) -> Path | None:
    """A complete unit of another pipeline with the same fingerprint, if any."""
    for manifest_path in sorted(Path(runs_dir).glob(f"*/{stage}/{split}/{MANIFEST}")):
        unit = manifest_path.parent
        if unit.resolve() == Path(exclude).resolve():
            continue
        try:
            status = unit_status(unit, fingerprint)
        except UserError:
            continue
        if status.state == "done":
            return unit
    return None


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no extra disk), copying where links are impossible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)
