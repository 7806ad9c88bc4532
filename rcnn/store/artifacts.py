"""The on-disk artifact store: one folder per pipeline, stage and split.

A unit (pipeline, stage, split) is complete when its ``manifest.json`` exists;
the manifest is written last, atomically, and records what the outputs were made
from. A unit is *fresh* when the fingerprint of its parameters, inputs and code
matches the manifest's; otherwise it is *stale*, with the reasons. A unit whose
outputs no longer match the sizes (or, checked on demand, the digests) its manifest
recorded is *damaged*; readers check each file against the manifest before using
it (:class:`Verifier`), hashing each file once per process. Work in
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
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcnn.errors import UserError
from rcnn.store.code_identity import changed_modules

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


# Digests computed by this process, keyed by the file (inode) and what any write to it changes:
# the change time too, which no tool can set back as `touch` or `rsync -t` set back the mtime.
_DIGESTS: dict[tuple[int, ...], str] = {}


def _file_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def cached_file_digest(path: Path, st: os.stat_result | None = None) -> str:
    """:func:`file_digest`, computed once per process for a file that has not changed since."""
    key = _file_key(st or os.stat(path))
    if key not in _DIGESTS:
        digest = file_digest(path)
        if _file_key(os.stat(path)) == key:  # not rewritten while being read
            _DIGESTS[key] = digest
        return digest
    return _DIGESTS[key]


def forget_digests() -> None:
    """Drop the digests remembered by :func:`cached_file_digest`."""
    _DIGESTS.clear()


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
    # The digest of each module ``code`` combines, recorded so a status can name the one that changed.
    code_modules: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def digest(self) -> str:
        return json_digest(
            {"stage": self.stage, "schema": self.schema_version, "params": self.params, "inputs": self.inputs, "code": self.code}
        )


@dataclass
class UnitStatus:
    state: str  # "done" | "stale" | "missing" | "damaged"
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


def rerun_hint(unit_dir: Path) -> str:
    """The command that rebuilds a unit ``<runs>/<pipeline>/<stage>/<split>``, as a clause of an error: with
    ``--runs-dir`` where the unit is not in the default runs folder, or the command would act on that one."""
    unit_dir = Path(unit_dir)
    stage, pipeline = unit_dir.parent.name, unit_dir.parent.parent.name
    # Each stage folder is named as the `rcnn` command that writes it.
    return f"rerun `rcnn {stage} {pipeline}{runs_dir_option(unit_dir.parent.parent.parent)} --force`"


def runs_dir_option(runs_dir: Path) -> str:
    """`` --runs-dir DIR`` for a command on ``runs_dir``, or nothing where it is the default runs folder
    (``$RCNN_RUNS_DIR``, else ``./runs``)."""
    if Path(runs_dir).resolve() == Path(os.environ.get("RCNN_RUNS_DIR", "runs")).resolve():
        return ""
    return f" --runs-dir {shlex.quote(str(runs_dir))}"


def _well_formed(manifest: dict) -> bool:
    """The parts of a manifest that are read as they are: its fingerprint, and each output's size and digest."""
    outputs = manifest["outputs"]
    return (
        isinstance(manifest["fingerprint"], str)
        and isinstance(manifest["params"], dict)
        and isinstance(manifest["inputs"], dict)
        and isinstance(outputs, dict)
        and all(
            isinstance(o, dict) and isinstance(o.get("bytes"), int) and isinstance(o.get("digest"), str) for o in outputs.values()
        )
    )


def read_manifest(unit_dir: Path) -> dict | None:
    """The unit's manifest, or None when absent; a damaged one is an error naming the file."""
    path = Path(unit_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"'{path}' is damaged (not valid JSON); {rerun_hint(unit_dir)}") from None
    required = {"manifest_schema", "fingerprint", "outputs", "params", "inputs"}
    if not isinstance(manifest, dict) or not required <= set(manifest) or not _well_formed(manifest):
        raise UserError(f"'{path}' is not an rcnn manifest; {rerun_hint(unit_dir)}")
    if manifest["manifest_schema"] != MANIFEST_SCHEMA:
        raise UserError(f"'{path}' has manifest schema {manifest['manifest_schema']}, expected {MANIFEST_SCHEMA}")
    return manifest


def unit_status(unit_dir: Path, expected: Fingerprint, verify: bool = False) -> UnitStatus:
    """Compare the unit on disk with what its inputs, parameters and code now call for.

    A current unit whose outputs differ in size from the manifest's record is damaged;
    with ``verify``, so is one whose outputs' bytes differ from the recorded digests.
    """
    try:
        manifest = read_manifest(unit_dir)
    except UserError as e:  # shown, and recomputed by the next run, rather than stopping every command
        return UnitStatus("damaged", [str(e).split("; rerun")[0]])
    if manifest is None:
        return UnitStatus("missing", ["never completed"])
    if manifest["fingerprint"] == expected.digest:
        missing = [name for name in manifest["outputs"] if not (Path(unit_dir) / name).is_file()]
        if missing:
            return UnitStatus("stale", [f"output {missing[0]} was deleted"], manifest)
        damage = output_damage(unit_dir, manifest, verify)
        if damage:
            return UnitStatus("damaged", damage, manifest)
        return UnitStatus("done", [], manifest)
    reasons = []
    if manifest.get("schema_version") != expected.schema_version:
        reasons.append(f"output format changed (v{manifest.get('schema_version')} -> v{expected.schema_version})")
    reasons += [f"parameter {d}" for d in _diff(manifest["params"], expected.params)]
    for name in sorted(set(manifest["inputs"]) | set(expected.inputs)):
        if manifest["inputs"].get(name) != expected.inputs.get(name):
            reasons.append(f"input {name} changed")
    if manifest.get("code", {}).get("digest") != expected.code:
        reasons.append(_code_change(manifest.get("code", {}).get("modules"), expected.code_modules))
    return UnitStatus("stale", reasons or ["fingerprint changed"], manifest)


def _code_change(recorded: Any, now: dict[str, str]) -> str:
    # Manifests written before per-module digests were recorded list only the module names.
    if not isinstance(recorded, dict) or not now:
        return "code changed"
    changed = changed_modules(recorded, now)
    if not changed:
        return "code changed"
    more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
    return f"code changed: {', '.join(changed[:4])}{more}"


class DamagedOutput(UserError):
    """A completed unit's output file no longer matches what its manifest recorded."""


class Verifier:
    """Checks files of a completed unit against its manifest before they are read.

    Call it with a file's path: it raises :class:`DamagedOutput` (naming the file and the
    stage to rerun) unless the file is one of the unit's outputs with the recorded size
    and digest. Each file is hashed once per process. Picklable, for worker processes: a
    copy carries the digests already computed, so workers need not hash the files again.
    """

    def __init__(self, unit_dir: Path, manifest: dict):
        self.unit_dir = Path(unit_dir)
        self.outputs = {name: (o["digest"], o["bytes"]) for name, o in manifest["outputs"].items()}

    def __call__(self, path: Path) -> None:
        path = Path(path)
        problem = self._problem(path)
        if problem:
            raise DamagedOutput(f"'{path}' {problem}; {rerun_hint(self.unit_dir)}")

    def _problem(self, path: Path) -> str | None:
        try:
            name = path.resolve().relative_to(self.unit_dir.resolve()).as_posix()
        except ValueError:
            name = None
        if name not in self.outputs:
            return f"is not among the outputs of {self._unit} its manifest lists"
        digest, size = self.outputs[name]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return f"is missing from {self._unit}"
        if st.st_size != size:
            return f"is damaged: {st.st_size} bytes, but {self._unit} wrote {size}"
        if cached_file_digest(path, st) != digest:
            return f"is damaged: its bytes differ from those {self._unit} wrote (digest {digest[:12]})"
        return None

    @property
    def _unit(self) -> str:
        return f"{self.unit_dir.parent.name}/{self.unit_dir.name}"

    def __getstate__(self) -> dict:
        known = {}
        for name in self.outputs:
            try:
                key = _file_key(os.stat(self.unit_dir / name))
            except OSError:
                continue
            if key in _DIGESTS:
                known[key] = _DIGESTS[key]
        return {**self.__dict__, "_known": known}

    def __setstate__(self, state: dict) -> None:
        _DIGESTS.update(state.pop("_known", {}))
        self.__dict__.update(state)


def output_damage(unit_dir: Path, manifest: dict, verify: bool = False) -> list[str]:
    """What is wrong with a unit's outputs: sizes always, digests too with ``verify`` (hashing each file once)."""
    unit_dir = Path(unit_dir)
    found = []
    for name, o in sorted(manifest["outputs"].items()):
        path = unit_dir / name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            found.append(f"output {name} was deleted")
            continue
        if st.st_size != o["bytes"]:
            found.append(f"output {name} is {st.st_size} bytes, {o['bytes']} when written")
        elif verify and cached_file_digest(path, st) != o["digest"]:
            found.append(f"output {name} has other bytes than when written")
    return found


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


def work_fingerprint(unit_dir: Path) -> str | None:
    """The fingerprint digest the unit's scratch folder holds work towards; None if it has no tag (or no folder)."""
    tag = Path(unit_dir) / WORK / "fingerprint"
    return tag.read_text().strip() if tag.is_file() else None


def work_dir(unit_dir: Path, fingerprint: Fingerprint) -> Path:
    """The unit's scratch folder, emptied first if it holds work for another fingerprint."""
    work = Path(unit_dir) / WORK
    tag = work / "fingerprint"
    if work.exists() and work_fingerprint(unit_dir) != fingerprint.digest:
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
        st = dst.stat()
        outputs[name] = {"digest": cached_file_digest(dst, st), "bytes": st.st_size}
    manifest = {**manifest, "manifest_schema": MANIFEST_SCHEMA, "outputs": outputs}
    write_json_atomic(unit_dir / MANIFEST, manifest)
    shutil.rmtree(unit_dir / WORK, ignore_errors=True)
    return manifest


def outputs_digest(manifest: dict) -> str:
    """What downstream units record as this unit's input: the digest of its outputs."""
    return json_digest({k: v["digest"] for k, v in manifest["outputs"].items()})


def find_equivalent(runs_dir: Path, stage: str, split: str, fingerprint: Fingerprint, exclude: Path) -> Path | None:
    """A complete, undamaged unit of another pipeline with the same fingerprint, if any.

    Its outputs are hashed (once per process) before they are shared, so damage is never copied.
    """
    for manifest_path in sorted(Path(runs_dir).glob(f"*/{stage}/{split}/{MANIFEST}")):
        unit = manifest_path.parent
        if unit.resolve() == Path(exclude).resolve():
            continue
        try:
            status = unit_status(unit, fingerprint, verify=True)
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
