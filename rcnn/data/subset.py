"""A smaller copy of a VOC-layout dataset: a random sample of some splits' images, with their annotations and split
files, to try a pipeline on before the whole dataset, or to take the data of a run to another machine."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rcnn.data.datasets import VOCDataset
from rcnn.data.folders import new_folder, refuse_used
from rcnn.errors import UserError


@dataclass(frozen=True)
class SplitSample:
    split: str
    ids: list[str]  # in the split file's order
    of: int  # images in the source split


def sample_ids(ids: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` of ``ids`` drawn without replacement (all of them when ``n >= len(ids)``), in their own order."""
    if n >= len(ids):
        return list(ids)
    keep = np.sort(rng.choice(len(ids), size=n, replace=False))
    return [ids[i] for i in keep]


def write_subset(source: str | Path, destination: str | Path, counts: dict[str, int], seed: int = 0) -> list[SplitSample]:
    """Copy a random ``counts[split]`` images of each split of ``source`` (a VOC-layout folder) into the new folder
    ``destination``: their ``JPEGImages/`` files, ``Annotations/*.xml`` and ``ImageSets/Main/<split>.txt``.

    The same ``seed`` draws the same images. Every file is checked to exist before anything is written, and the
    folder is written under a temporary name and renamed when complete, so a failure leaves no half-made dataset.
    """
    source, destination = Path(source), Path(destination)
    refuse_used(destination)
    rng = np.random.default_rng(seed)
    samples, files = [], {}
    for split, n in counts.items():
        if n < 1:
            raise UserError(f"split '{split}': the number of images must be at least 1, got {n}")
        dataset = VOCDataset(source, split)
        dataset.require_images()
        sample = SplitSample(split, sample_ids(dataset.ids, n, rng), len(dataset))
        for image_id in sample.ids:
            for path in (source / "Annotations" / f"{image_id}.xml", dataset.image_path(image_id)):
                if not path.is_file():
                    raise UserError(f"'{path}' is listed in {dataset.split_file} but missing; nothing was written")
                files[path.relative_to(source)] = path
        samples.append(sample)
    with new_folder(destination) as work:
        for relative, path in files.items():
            (work / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, work / relative)
        (work / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        for sample in samples:
            (work / "ImageSets" / "Main" / f"{sample.split}.txt").write_text("".join(f"{i}\n" for i in sample.ids))
    return samples
