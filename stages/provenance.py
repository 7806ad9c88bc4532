"""Where a stage's output comes from: its fingerprint (parameters, inputs, code), and the checks that an upstream
unit is complete, intact and built from this configuration's data before a stage reads it."""

from __future__ import annotations

import importlib
from types import ModuleType

from rcnn.errors import UserError
from rcnn.store import artifacts as store
from rcnn.store import code_identity

from .context import Context


class UpstreamMismatch(UserError):
    """An upstream unit on disk was built from other data or another class list than the configuration's."""


def code_digests(stage: ModuleType) -> dict[str, str]:
    """Digest of the stage module and of each first-party module it imports, transitively."""
    return code_identity.module_digests(stage.__name__)


def fingerprint(ctx: Context, stage: ModuleType, split: str) -> store.Fingerprint:
    modules = code_digests(stage)
    return store.Fingerprint(
        stage=stage.NAME,
        schema_version=stage.SCHEMA_VERSION,
        params=stage.params(ctx),
        inputs=stage.inputs(ctx, split),
        code=code_identity.combined_digest(modules),
        code_modules=modules,
    )


class UpstreamStale(UserError):
    """An upstream unit on disk is not what this configuration, its own upstream units and the code now call for."""


def upstream_digest(ctx: Context, stage: str, split: str) -> str:
    """The outputs digest of a completed, current upstream unit, or an error saying what to run.

    An upstream unit built from other data or another class list than this configuration's is refused
    (:class:`UpstreamMismatch`), never used; so is one that is stale (:class:`UpstreamStale`): its
    parameters, code or own upstream units changed since it ran. The check goes up the whole chain, so a
    change anywhere above makes every unit below stale, not only the one that reads the changed unit.
    """
    manifest = _completed(ctx, stage, split)
    check_same_origin(ctx, stage, split, manifest)
    unit = ctx.unit_dir(stage, split)
    expected = fingerprint(ctx, stage_module(stage), split)  # raises for a stale unit further up
    if manifest["fingerprint"] != expected.digest:
        reasons = store.unit_status(unit, expected).reasons
        raise UpstreamStale(
            f"{stage}/{split} of pipeline '{ctx.cfg.name}' is stale ({'; '.join(reasons)}); "
            f"`{ctx.command('run')}` (with the same settings) recomputes it and the stages after it"
        )
    return store.outputs_digest(manifest)


def stage_module(name: str) -> ModuleType:
    """The module of stage ``name`` (``train-svm``: ``rcnn.stages.train_svm``).

    Looked up by name, not imported: an import would put every upstream stage's code into each stage's code
    identity, and a code change above is already caught as that unit being stale (:func:`upstream_digest`).
    """
    return importlib.import_module(f"{__package__}.{name.replace('-', '_')}")


def upstream_check(ctx: Context, stage: str, split: str) -> store.Verifier:
    """What a reader of an upstream unit's files calls on each before using it (see :class:`rcnn.store.artifacts.Verifier`)."""
    return store.Verifier(ctx.unit_dir(stage, split), _completed(ctx, stage, split))


def _completed(ctx: Context, stage: str, split: str) -> dict:
    manifest = store.read_manifest(ctx.unit_dir(stage, split))
    if manifest is None:
        raise UserError(
            f"stage '{stage}' ({split}) of pipeline '{ctx.cfg.name}' has not run yet; run `{ctx.command(stage)}` first"
        )
    return manifest


def check_same_origin(ctx: Context, stage: str, split: str, manifest: dict) -> None:
    """Refuse an upstream unit whose recorded class list or data fingerprints differ from the configuration's."""
    what = f"{stage}/{split} of pipeline '{ctx.cfg.name}'"
    fix = f"rerun `{ctx.command(stage)}` (or `{ctx.command('run')}`) with this configuration to rebuild it"
    recorded = manifest.get("data", {})
    root, here = recorded.get("root", "an unrecorded dataset"), str(ctx.data_root.resolve())
    # The class list first: it also decides which images --skip-bad leaves out.
    classes = manifest["params"].get("classes")
    if classes is not None and tuple(classes) != ctx.classes:
        moved = f", and from dataset {root} but this configuration reads {here}" if root != here else ""
        raise UpstreamMismatch(
            f"{what} was built from classes ({', '.join(classes)}) but this configuration has "
            f"({', '.join(ctx.classes)}){moved}; {fix}"
        )
    for key, built in sorted(manifest["inputs"].items()):
        if not key.startswith("data/"):
            continue
        data_split = key.split("/", 1)[1]
        now = ctx.dataset(data_split).fingerprint
        if built == now:
            continue
        skipped = [s["id"] for s in recorded.get("skipped", [])]
        if skipped and not ctx.skip_bad:
            raise UpstreamMismatch(
                f"{what} was built with --skip-bad, leaving out {len(skipped)} image(s) of {data_split} "
                f"({', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}), but this run reads every image; "
                f"pass --skip-bad, or {fix}"
            )
        if root == here:
            raise UpstreamMismatch(
                f"{what} was built from {root} [{data_split}] before its files changed "
                f"(data fingerprint {built[:12]} then, {now[:12]} now); {fix}"
            )
        raise UpstreamMismatch(
            f"{what} was built from dataset {root} [{data_split}] (data fingerprint {built[:12]}) "
            f"but this configuration reads {here} [{data_split}] ({now[:12]}); {fix}"
        )


def built_with_skip_bad(ctx: Context) -> bool:
    """Whether any completed unit of the pipeline was built with --skip-bad (so status judges it that way)."""
    for path in sorted(ctx.root.glob(f"*/*/{store.MANIFEST}")):
        try:
            manifest = store.read_manifest(path.parent)
        except UserError:
            continue
        if manifest is not None and manifest.get("data", {}).get("skip_bad"):
            return True
    return False


def cached_mb(manifest: dict) -> float:
    """Size of a unit's outputs in MiB."""
    return sum(o["bytes"] for o in manifest["outputs"].values()) / 2**20
