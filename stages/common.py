"""What every stage shares: the run context and the skip / reuse / compute / commit cycle.

A stage module declares ``NAME``, ``SCHEMA_VERSION``, ``CODE`` (the modules whose
source defines its output), ``splits(ctx)``, ``params(ctx)``, ``inputs(ctx, split)``
and ``compute(ctx, split, work) -> (outputs, metrics)``; :func:`run_stage` does the rest.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType

import click

from rcnn import __version__, store
from rcnn.config import PipelineConfig
from rcnn.datasets import VOCDataset
from rcnn.errors import UserError


@dataclass
class Context:
    """One pipeline's configuration, its folder in the runs directory and run options."""

    cfg: PipelineConfig
    runs_dir: Path
    force: bool = False
    wait: bool = False
    progress: bool = True
    log: Callable[[str], None] = field(default=click.echo)

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

    def ensure_data(self) -> None:
        """Generate the pipeline's synthetic data if it is synthetic and not there yet."""
        synth = self.cfg.data.synthetic
        if self.cfg.data.root is None and synth is not None and not (self.data_root / "ImageSets").is_dir():
            from rcnn.synth import generate_dataset

            self.log(f"generating {synth.images} synthetic images in {self.data_root}")
            generate_dataset(self.data_root, n_images=synth.images, seed=synth.seed, size=synth.size, progress=self.progress)

    def weights(self) -> tuple[str, dict[str, str]]:
        """``model.weights`` as :func:`rcnn.models.initialise` takes it, and the input digest it adds."""
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
            return str(unit / "model.pt"), {"weights": store.outputs_digest(manifest)}
        if not Path(w).is_file():
            raise UserError(f"model.weights: file '{w}' does not exist")
        return w, {"weights": store.file_digest(Path(w))}

    def dataset(self, split: str) -> VOCDataset:
        cache = self.__dict__.setdefault("_datasets", {})
        if split not in cache:
            cache[split] = VOCDataset(self.data_root, split)
        return cache[split]

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
    from rcnn import records

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


def code_digest(modules: tuple[str, ...]) -> str:
    """Hash of the source files of ``modules``: a change to them makes the stage stale."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(modules):
        module: ModuleType = importlib.import_module(name)
        h.update(name.encode())
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def fingerprint(ctx: Context, stage: ModuleType, split: str) -> store.Fingerprint:
    return store.Fingerprint(
        stage=stage.NAME,
        schema_version=stage.SCHEMA_VERSION,
        params=stage.params(ctx),
        inputs=stage.inputs(ctx, split),
        code=code_digest(stage.CODE),
    )


def upstream_digest(ctx: Context, stage: str, split: str) -> str:
    """The outputs digest of a completed upstream unit, or an error saying what to run."""
    manifest = store.read_manifest(ctx.unit_dir(stage, split))
    if manifest is None:
        raise UserError(
            f"stage '{stage}' ({split}) of pipeline '{ctx.cfg.name}' has not run yet; run `rcnn {stage} {ctx.cfg.name}` first"
        )
    return store.outputs_digest(manifest)


def unit_status(ctx: Context, stage: ModuleType, split: str) -> store.UnitStatus:
    try:
        expected = fingerprint(ctx, stage, split)
    except UserError as e:
        return store.UnitStatus("missing", [str(e)])
    return store.unit_status(ctx.unit_dir(stage.NAME, split), expected)


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
        if status.state == "stale" and not ctx.force:
            ctx.log(f"{label}: stale ({'; '.join(status.reasons)}), recomputing")
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
            # Where the data was (not part of the fingerprint: moving a dataset keeps its results).
            "data": {"root": str(ctx.data_root.resolve()), "split": split, "classes": list(ctx.classes)},
            "schema_version": stage.SCHEMA_VERSION,
            "fingerprint": expected.digest,
            "params": expected.params,
            "inputs": expected.inputs,
            "code": {"version": __version__, "digest": expected.code, "modules": sorted(stage.CODE)},
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
    reused = {**manifest, "pipeline": ctx.cfg.name, "reused_from": str(twin)}
    reused.pop("outputs")
    out = store.commit(unit, staged, reused)
    ctx.log(f"{label}: identical inputs and parameters to {twin}, reused its outputs")
    return out
