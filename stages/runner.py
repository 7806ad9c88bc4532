"""The skip / reuse / compute / commit cycle every stage goes through, and the helpers of per-image stages.

A stage module declares ``NAME``, ``SCHEMA_VERSION``, ``splits(ctx)``, ``params(ctx)``,
``inputs(ctx, split)`` and ``compute(ctx, split, work) -> (outputs, metrics)``;
:func:`run_stage` does the rest. Its code identity is the stage module and every
first-party module it imports (:mod:`rcnn.store.code_identity`); it reads upstream outputs
only through readers that check them against their manifest (:func:`rcnn.stages.provenance.upstream_check`).
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from types import ModuleType

from rcnn import __version__
from rcnn.errors import UserError
from rcnn.runtime import release_device_caches, release_freed_memory, strict_float32
from rcnn.store import artifacts as store
from rcnn.store.machine import Stopwatch, machine_record

from .context import Context, data_record
from .provenance import fingerprint


def unit_status(ctx: Context, stage: ModuleType, split: str, verify: bool = False) -> store.UnitStatus:
    """Done, stale, missing or damaged (with ``verify``, every output is hashed against its digest)."""
    unit = ctx.unit_dir(stage.NAME, split)
    try:
        expected = fingerprint(ctx, stage, split)
    except UserError as e:
        # A unit that completed but can no longer be vouched for (its input changed or is gone) is stale.
        try:
            manifest = store.read_manifest(unit)
        except UserError:
            manifest = None
        return store.UnitStatus("stale" if manifest else "missing", [str(e)], manifest)
    status = store.unit_status(unit, expected, verify)
    # work without a tag is deleted by the next run, not resumed
    if status.state in ("missing", "stale") and store.work_fingerprint(unit) == expected.digest:
        note = _unfinished(unit / store.WORK)
        if note:
            status.reasons.append(note)
    before = ((status.manifest or {}).get("data") or {}).get("root")
    if status.state == "stale" and before and before != str(ctx.data_root.resolve()):
        # "changed" would suggest the files were edited: this configuration reads another folder
        changed = f"input data/{split} changed"
        where = f"input data/{split} is another folder: {ctx.data_root.resolve()}, where the unit read {before}"
        status.reasons[:] = [where if r == changed else r for r in status.reasons]
    return status


def run_stage(ctx: Context, stage: ModuleType) -> dict[str, dict]:
    """Bring every split of ``stage`` up to date; return each split's manifest."""
    manifests = {}
    for split in stage.splits(ctx):
        manifests[split] = _run_unit(ctx, stage, split)
    return manifests


def _run_unit(ctx: Context, stage: ModuleType, split: str) -> dict:
    unit = ctx.unit_dir(stage.NAME, split)
    label = f"{stage.NAME}/{split}"
    expected = fingerprint(ctx, stage, split)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(store.unit_lock(unit, wait=ctx.wait, what=f"{label} of pipeline '{ctx.cfg.name}'"))
        except OSError as e:
            # A runs folder one may read but not write (a shared or archived store): a complete unit needs no lock
            # to be skipped (its manifest is written last, atomically); anything else to do is refused as it was.
            status = store.unit_status(unit, expected)
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or status.state != "done" or ctx.force:
                raise
            ctx.log(f"{label}: up to date, skipped")
            return status.manifest
        return _run_locked(ctx, stage, split, unit, label, expected)


def _run_locked(ctx: Context, stage: ModuleType, split: str, unit: Path, label: str, expected: store.Fingerprint) -> dict:
    status = unit_status(ctx, stage, split)  # its reasons worded as rcnn status words them
    other_work = _work_of_another_configuration(unit, expected)
    if status.state == "done" and not ctx.force:
        if other_work:  # e.g. a --set variant stopped midway: it resumes when that configuration runs again
            ctx.log(f"{label}: up to date, skipped (its {store.WORK} folder keeps the unfinished work of another configuration)")
        else:  # left by an interrupted --force run of this configuration: nothing will resume it
            ctx.log(f"{label}: up to date, skipped")
            shutil.rmtree(unit / store.WORK, ignore_errors=True)
        return status.manifest
    if status.state in ("stale", "damaged") and not ctx.force:
        ctx.log(f"{label}: {status.state} ({'; '.join(status.reasons)}), recomputing")
    if other_work:
        ctx.log(f"{label}: the unfinished work of another configuration in its {store.WORK} folder is discarded")
    if not ctx.force:
        twin = store.find_equivalent(ctx.runs_dir, stage.NAME, split, expected, exclude=unit)
        if twin is not None:
            return _reuse(ctx, unit, twin, label)
    clock = Stopwatch()
    work = store.work_dir(unit, expected)
    try:
        with strict_float32(ctx.cfg.model.precision == "float32"):  # float32 means float32 on a GPU too, not TF32
            outputs, metrics = stage.compute(ctx, split, work)
    finally:
        release_freed_memory()  # so that the next stage in this process does not start on top of this one's peak
        release_device_caches()  # a GPU's cached blocks and page-locked host buffers alike
    manifest = {
        "stage": stage.NAME,
        "split": split,
        "pipeline": ctx.cfg.name,
        "data": data_record(ctx, split),
        "schema_version": stage.SCHEMA_VERSION,
        "fingerprint": expected.digest,
        "params": expected.params,
        "inputs": expected.inputs,
        "code": {"version": __version__, "digest": expected.code, "modules": expected.code_modules},
        "libraries": store.library_versions(),
        # the workers' machines are in "cluster"; this process's (and its load) would be only the client's
        "machine": machine_record(metrics.get("device")) if ctx.cluster is None else None,
        "timings": clock.timings(machine=ctx.cluster is None),
        "metrics": metrics,
    }
    if ctx.cluster is not None:  # where the work ran; not in the fingerprint, so either run is up to date for the other
        manifest["cluster"] = ctx.cluster.record(label)
    manifest = store.commit(unit, outputs, manifest)
    ctx.log(f"{label}: done in {manifest['timings']['wall_s']:.1f} s")
    return manifest


def _unfinished(work: Path) -> str | None:
    """What the unit's scratch folder holds towards this configuration, which the next run resumes from; None if
    nothing (fine-tuning's last checkpoint, or the images of a per-image stage already written)."""
    import json

    from rcnn.store import records

    if (work / "train_state.pt").is_file():
        try:
            done = json.loads((work / "history.json").read_text())[-1]["iteration"]
        except (OSError, ValueError, LookupError, TypeError):
            return "its unfinished work resumes"
        return f"its unfinished work resumes (fine-tuning checkpointed at iteration {done})"
    done = records.count_completed(work / "parts") if (work / "parts").is_dir() else 0
    return f"its unfinished work resumes ({done} images done)" if done else None


def _work_of_another_configuration(unit: Path, expected: store.Fingerprint) -> bool:
    """Whether the unit's scratch folder holds work towards another fingerprint than ``expected``."""
    return store.work_fingerprint(unit) not in (None, expected.digest)


def _reuse(ctx: Context, unit: Path, twin: Path, label: str) -> dict:
    """Share a twin unit's outputs (hard links) instead of computing them again."""
    manifest = store.read_manifest(twin)
    staging = store.work_dir(unit, store.Fingerprint("reuse", 0, {}, {}, twin.as_posix()))
    staged = {}
    for name in manifest["outputs"]:
        store.link_or_copy(twin / name, staging / name)
        staged[name] = staging / name
    reused = {**manifest, "pipeline": ctx.cfg.name, "data": data_record(ctx, unit.name), "reused_from": str(twin)}
    reused.pop("outputs")
    out = store.commit(unit, staged, reused)
    ctx.log(f"{label}: identical inputs and parameters to {twin}, reused its outputs")
    return out


def pending_images(ctx: Context, label: str, parts: Path, ids: list[str]) -> list[str]:
    """The ids without a complete per-image record in ``parts``, logging a resume when some have one."""
    from rcnn.store import records

    done = records.completed_parts(parts)
    if done:
        ctx.log(f"{label}: resuming, {len(done)} of {len(ids)} images already done")
    return [i for i in ids if i not in done]


def progress_bar(ctx: Context, total: int, desc: str, unit: str = "img"):
    """A tqdm bar that is off with --quiet and when the output is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if ctx.progress else True, leave=False)


def add_info(totals: dict, info: dict) -> dict:
    """Sum an image's numbers (``image_records``' info) into ``totals``; a text value (the device) is kept as is."""
    for k, v in info.items():
        totals[k] = v if isinstance(v, str) else totals.get(k, 0) + v
    return totals
