"""What every stage shares: the run context and the skip / reuse / compute / commit cycle.

A stage module declares ``NAME``, ``SCHEMA_VERSION``, ``splits(ctx)``, ``params(ctx)``,
``inputs(ctx, split)`` and ``compute(ctx, split, work) -> (outputs, metrics)``;
:func:`run_stage` does the rest. Its code identity is the stage module and every
first-party module it imports (:mod:`rcnn.store.code_identity`); it reads upstream outputs
only through readers that check them against their manifest (:func:`upstream_check`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType

import click

from rcnn import __version__
from rcnn.config import PipelineConfig
from rcnn.data.datasets import VOCDataset, find_bad_images
from rcnn.errors import UserError
from rcnn.store import artifacts as store
from rcnn.store import code_identity

# Content digests of images known to decode to their annotated size (see find_bad_images).
CHECKED_IMAGES = "_data/checked-images.json"


class UpstreamMismatch(UserError):
    """An upstream unit on disk was built from other data or another class list than the configuration's."""


@dataclass
class Context:
    """One pipeline's configuration, its folder in the runs directory and run options.

    With ``skip_bad``, images whose data is unusable are left out of every split
    (each logged once), instead of ending the command at the first one.
    """

    cfg: PipelineConfig
    runs_dir: Path
    force: bool = False
    wait: bool = False
    progress: bool = True
    log: Callable[[str], None] = field(default=click.echo)
    skip_bad: bool = False
    _datasets: dict[str, VOCDataset] = field(default_factory=dict, init=False, repr=False)

    @property
    def root(self) -> Path:
        return self.runs_dir / self.cfg.name

    def unit_dir(self, stage: str, split: str) -> Path:
        return self.root / stage / split

    @cached_property
    def data_root(self) -> Path:
        """The dataset folder (synthetic data lives under the runs folder)."""
        if self.cfg.data.root is not None:
            return Path(self.cfg.data.root)
        synth = self.cfg.data.synthetic
        if synth is None:
            raise UserError(f"pipeline '{self.cfg.name}': set data.root or data.synthetic")
        return self.runs_dir / "_data" / f"synth-n{synth.images}-s{synth.seed}-px{synth.size}"

    def weights(self) -> tuple[str, dict[str, str]]:
        """``model.weights`` as :func:`rcnn.modeling.models.initialise` takes it, and the input digest it adds."""
        w = self.cfg.model.weights
        if w in ("imagenet", "scratch"):
            return w, {}
        if w.startswith("pipeline:"):
            other = w.split(":", 1)[1]
            unit = self.runs_dir / other / "finetune" / self.cfg.data.trainval
            manifest = store.read_manifest(unit)
            if manifest is None:
                raise UserError(
                    f"model.weights is {w}, but pipeline '{other}' has no fine-tuned model yet; run `rcnn finetune {other}` first"
                )
            verify = store.Verifier(unit, manifest)
            for name in manifest["outputs"]:  # the weights and their description, read by the model loader
                verify(unit / name)
            return str(unit / "model.pt"), {"weights": store.outputs_digest(manifest)}
        if not Path(w).is_file():
            raise UserError(f"model.weights: file '{w}' does not exist")
        return w, {"weights": store.file_digest(Path(w))}

    def dataset(self, split: str) -> VOCDataset:
        """The split's images; with ``skip_bad``, only the usable ones (the same in every stage)."""
        if split not in self._datasets:
            dataset = VOCDataset(self.data_root, split)
            self._datasets[split] = self._without_bad_images(dataset) if self.skip_bad else dataset
        return self._datasets[split]

    def _without_bad_images(self, dataset: VOCDataset) -> VOCDataset:
        data = self.cfg.data
        # Unconfigured classes are those of the kept trainval images, so only other splits can hold unknown ones.
        classes = data.classes if data.classes is not None or dataset.split == data.trainval else self.classes
        known_good = _read_checked_images(self.runs_dir)
        before = len(known_good)
        bad = find_bad_images(dataset, classes, known_good)
        if len(known_good) > before:
            _write_checked_images(self.runs_dir, known_good)
        for image_id, reason in bad.items():
            self.log(f"data/{dataset.split}: skipping image {image_id} (--skip-bad): {reason}")
        if bad and len(bad) == len(dataset):
            first = next(iter(bad.values()))
            raise UserError(f"every image of split '{dataset.split}' in {dataset.root} is bad; the first: {first}")
        return VOCDataset(dataset.root, dataset.split, skip=bad) if bad else dataset

    def skipped_images(self) -> dict[str, dict[str, str]]:
        """Per split read so far, the ids left out by ``skip_bad`` and why."""
        return {split: ds.skipped for split, ds in self._datasets.items() if ds.skipped}

    @cached_property
    def splits(self) -> tuple[str, str]:
        return (self.cfg.data.trainval, self.cfg.data.test)

    @cached_property
    def classes(self) -> tuple[str, ...]:
        """The configured class list, or the classes found in the trainval split."""
        if self.cfg.data.classes is not None:
            return self.cfg.data.classes
        classes = self.dataset(self.cfg.data.trainval).classes()
        if not classes:
            raise UserError(f"no objects found in split '{self.cfg.data.trainval}' of {self.data_root}")
        return classes


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


def cached_mb(manifest: dict) -> float:
    """Size of a unit's outputs in MiB."""
    return sum(o["bytes"] for o in manifest["outputs"].values()) / 2**20


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


def upstream_digest(ctx: Context, stage: str, split: str) -> str:
    """The outputs digest of a completed upstream unit, or an error saying what to run.

    An upstream unit built from other data or another class list than this
    configuration's is refused (:class:`UpstreamMismatch`), never used.
    """
    manifest = _completed(ctx, stage, split)
    check_same_origin(ctx, stage, split, manifest)
    return store.outputs_digest(manifest)


def upstream_check(ctx: Context, stage: str, split: str) -> store.Verifier:
    """What a reader of an upstream unit's files calls on each before using it (see :class:`rcnn.store.artifacts.Verifier`)."""
    return store.Verifier(ctx.unit_dir(stage, split), _completed(ctx, stage, split))


def _completed(ctx: Context, stage: str, split: str) -> dict:
    manifest = store.read_manifest(ctx.unit_dir(stage, split))
    if manifest is None:
        raise UserError(
            f"stage '{stage}' ({split}) of pipeline '{ctx.cfg.name}' has not run yet; run `rcnn {stage} {ctx.cfg.name}` first"
        )
    return manifest


def check_same_origin(ctx: Context, stage: str, split: str, manifest: dict) -> None:
    """Refuse an upstream unit whose recorded class list or data fingerprints differ from the configuration's."""
    what = f"{stage}/{split} of pipeline '{ctx.cfg.name}'"
    fix = f"rerun `rcnn {stage} {ctx.cfg.name}` (or `rcnn run {ctx.cfg.name}`) with this configuration to rebuild it"
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
    return store.unit_status(unit, expected, verify)


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
    with store.unit_lock(unit, wait=ctx.wait, what=f"{label} of pipeline '{ctx.cfg.name}'"):
        status = store.unit_status(unit, expected)
        if status.state == "done" and not ctx.force:
            ctx.log(f"{label}: up to date, skipped")
            return status.manifest
        if status.state in ("stale", "damaged") and not ctx.force:
            ctx.log(f"{label}: {status.state} ({'; '.join(status.reasons)}), recomputing")
        if not ctx.force:
            twin = store.find_equivalent(ctx.runs_dir, stage.NAME, split, expected, exclude=unit)
            if twin is not None:
                return _reuse(ctx, unit, twin, label)
        started = time.time()
        work = store.work_dir(unit, expected)
        outputs, metrics = stage.compute(ctx, split, work)
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
            "timings": {"started": started, "wall_s": time.time() - started},
            "metrics": metrics,
        }
        manifest = store.commit(unit, outputs, manifest)
        ctx.log(f"{label}: done in {manifest['timings']['wall_s']:.1f} s")
        return manifest


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


def data_record(ctx: Context, split: str) -> dict:
    """The manifest's account of the data: where it was and which images --skip-bad left out, and why.

    Not part of the fingerprint (moving a dataset keeps its results); the skipped
    images change the data fingerprint itself.
    """
    dataset = ctx.dataset(split)
    return {
        "root": str(ctx.data_root.resolve()),
        "split": split,
        "classes": list(ctx.classes),
        "skip_bad": ctx.skip_bad,
        "images_skipped": len(dataset.skipped),
        "skipped": [{"id": image_id, "reason": reason} for image_id, reason in dataset.skipped.items()],
    }


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


def skip_summary(ctx: Context) -> list[str]:
    """Lines naming every image --skip-bad left out so far, for the end of a run or a status."""
    skipped = [(split, image_id, reason) for split, bad in ctx.skipped_images().items() for image_id, reason in bad.items()]
    if not skipped:
        return []
    lines = [f"{len(skipped)} bad image(s) skipped (--skip-bad; each stage's manifest lists them):"]
    return lines + [f"  {split}/{image_id}: {reason}" for split, image_id, reason in skipped]


def _checked_images_key() -> dict:
    import cv2

    # A change to the checks or the decoder invalidates what was remembered.
    return {"code": code_identity.combined_digest(code_identity.module_digests("rcnn.data.datasets")), "opencv": cv2.__version__}


def _read_checked_images(runs_dir: Path) -> set[str]:
    try:
        saved = json.loads((runs_dir / CHECKED_IMAGES).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(saved, dict) or saved.get("key") != _checked_images_key():
        return set()
    return set(saved.get("digests", []))


def _write_checked_images(runs_dir: Path, digests: set[str]) -> None:
    # Only a cache: merged with what another process wrote meanwhile, and skipped if it cannot be written.
    try:
        path = runs_dir / CHECKED_IMAGES
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = digests | _read_checked_images(runs_dir)
        store.write_json_atomic(path, {"key": _checked_images_key(), "digests": sorted(merged)})
    except OSError:
        pass
