"""The run context: one pipeline's configuration, its folder in the runs directory, its datasets and run options.

With ``--skip-bad`` the context leaves unusable images out of every split, the same way in every stage, and
remembers which images it has already checked (``_data/checked-images.json`` in the runs folder).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import click

from rcnn.config import PipelineConfig
from rcnn.data.datasets import VOCDataset, find_bad_images
from rcnn.errors import UserError
from rcnn.store import artifacts as store
from rcnn.store import code_identity

# Content digests of images known to decode to their annotated size (see find_bad_images).
CHECKED_IMAGES = "_data/checked-images.json"


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
    # A connected rcnn.cluster.session.ClusterSession with --cluster: the per-image and per-class work runs there.
    cluster: object | None = None
    # The environment variables the pipelines file reads data.root from (e.g. RCNN_VOC2007), for the advice
    # when that folder is missing; empty when --set gave it.
    root_variables: tuple[str, ...] = ()
    # Likewise for model.weights (e.g. RCNN_SQUEEZENET_WEIGHTS).
    weights_variables: tuple[str, ...] = ()
    _datasets: dict[str, VOCDataset] = field(default_factory=dict, init=False, repr=False)

    def __getstate__(self) -> dict:
        # Sent to cluster workers: the client stays here, and the log is the worker's own (click.echo).
        return {**self.__dict__, "cluster": None, "log": click.echo}

    @property
    def root(self) -> Path:
        return self.runs_dir / self.cfg.name

    def unit_dir(self, stage: str, split: str) -> Path:
        return self.root / stage / split

    def command(self, stage: str, pipeline: str | None = None) -> str:
        """``rcnn STAGE PIPELINE`` (this pipeline by default) on this runs folder, as an error's hint gives it:
        with ``--runs-dir`` where it is not the default one, or following the hint would act on that one."""
        return f"rcnn {stage} {pipeline or self.cfg.name}{store.runs_dir_option(self.runs_dir)}"

    @cached_property
    def data_root(self) -> Path:
        """The dataset folder (synthetic data lives under the runs folder)."""
        if self.cfg.data.root is not None:
            return Path(self.cfg.data.root)
        synth = self.cfg.data.synthetic
        if synth is None:
            raise UserError(f"pipeline '{self.cfg.name}': set data.root or data.synthetic")
        return self.runs_dir / "_data" / f"synth-n{synth.images}-s{synth.seed}-px{synth.size}"

    def weights_param(self) -> str:
        """``model.weights`` as a stage's parameters record it: a file as ``file``, since its content digest is an
        input (:meth:`weights`) and the same bytes at another path are the same network."""
        w = self.cfg.model.weights
        return w if w in ("imagenet", "scratch") or w.startswith("pipeline:") else "file"

    def weights(self) -> tuple[str, dict[str, str]]:
        """``model.weights`` as :func:`rcnn.modeling.checkpoints.initialise` takes it, and the input digest it adds."""
        w = self.cfg.model.weights
        if w in ("imagenet", "scratch"):
            return w, {}
        if w.startswith("pipeline:"):
            other = w.split(":", 1)[1]
            unit = self.runs_dir / other / "finetune" / self.cfg.data.trainval
            manifest = store.read_manifest(unit)
            if manifest is None:
                need = self.command("finetune", other)
                raise UserError(f"model.weights is {w}, but pipeline '{other}' has no fine-tuned model yet; run `{need}` first")
            verify = store.Verifier(unit, manifest)
            for name in manifest["outputs"]:  # the weights and their description, read by the model loader
                verify(unit / name)
            return str(unit / "model.pt"), {"weights": store.outputs_digest(manifest)}
        if not Path(w).is_file():
            where = " or ".join(f"${v}" for v in self.weights_variables)
            advice = f"set {where} to the file" if where else "give the file's path"
            raise UserError(
                f"model.weights: file '{w}' does not exist ({advice}, or --set model.weights=PATH; imagenet for "
                "torchvision's ImageNet weights)"
            )
        return w, {"weights": store.file_digest(Path(w))}

    def dataset(self, split: str) -> VOCDataset:
        """The split's images; with ``skip_bad``, only the usable ones (the same in every stage)."""
        if split not in self._datasets:
            if not self.data_root.is_dir():
                where = " or ".join(f"${v}" for v in self.root_variables)
                advice = (
                    f"set {where} to the folder holding JPEGImages/, or --set data.root=PATH"
                    if where
                    else "set data.root, e.g. --set data.root=PATH"
                )
                raise UserError(f"dataset root '{self.data_root}' does not exist ({advice})")
            dataset = VOCDataset(self.data_root, split, only=self._only_classes(split), clip=self.cfg.data.clip_boxes)
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
        return VOCDataset(dataset.root, dataset.split, skip=bad, only=dataset.only, clip=dataset.clip) if bad else dataset

    def _only_classes(self, split: str) -> tuple[str, ...] | None:
        """The classes kept under ``data.other_classes: ignore`` (None: every object is kept); an unconfigured
        class list is the trainval split's, so there only other splits can hold other classes."""
        data = self.cfg.data
        if data.other_classes != "ignore" or (data.classes is None and split == data.trainval):
            return None
        return self.classes

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
