"""`rcnn data subset`: a random sample of a VOC dataset's splits, copied to a new folder that is a dataset of its own."""

from __future__ import annotations

import numpy as np
from conftest import one_error_line, run_cli

from rcnn.data.datasets import VOCDataset
from rcnn.data.subset import sample_ids


def test_sample_ids_draws_without_replacement_in_split_order():
    ids = [f"{i:04d}" for i in range(100)]
    a = sample_ids(ids, 10, np.random.default_rng(0))
    assert len(set(a)) == 10 and set(a) <= set(ids) and a == sorted(a)
    assert sample_ids(ids, 10, np.random.default_rng(0)) == a  # the same seed, the same images
    assert sample_ids(ids, 10, np.random.default_rng(1)) != a
    assert sample_ids(ids, 100, np.random.default_rng(0)) == ids and sample_ids(ids, 500, np.random.default_rng(0)) == ids


def test_subset_copies_the_sampled_images_annotations_and_split_files(tiny_voc, tmp_path, capsys):
    trainval, test = VOCDataset(tiny_voc, "trainval").ids, VOCDataset(tiny_voc, "test").ids
    dst = tmp_path / "small"
    code, out, err = run_cli(["data", "subset", str(tiny_voc), str(dst), "--split", "trainval=2", "--split", "test=99"], capsys)
    assert code == 0 and err == ""
    assert f"wrote {dst}: trainval 2 of {len(trainval)} images, test {len(test)} of {len(test)} images (seed 0)" in out
    small = {split: VOCDataset(dst, split) for split in ("trainval", "test")}
    assert len(small["trainval"]) == 2 and set(small["trainval"].ids) <= set(trainval)
    assert small["test"].ids == test  # more asked for than there are: all of them
    for split, dataset in small.items():
        dataset.check()  # every annotation parses and every image is there
        for image_id in dataset.ids:
            for sub, suffix in (("Annotations", ".xml"), ("JPEGImages", ".jpg")):
                copied = (dst / sub / f"{image_id}{suffix}").read_bytes()
                assert copied == (tiny_voc / sub / f"{image_id}{suffix}").read_bytes(), (split, image_id)
    chosen = {p.stem for p in (dst / "JPEGImages").iterdir()}
    assert chosen == set(small["trainval"].ids) | set(test)  # nothing else copied
    # The same seed draws the same images; the source is untouched.
    again = tmp_path / "again"
    run_cli(["data", "subset", str(tiny_voc), str(again), "--split", "trainval=2"], capsys)
    assert VOCDataset(again, "trainval").ids == small["trainval"].ids and not (again / "ImageSets/Main/test.txt").exists()
    assert VOCDataset(tiny_voc, "trainval").ids == trainval


def test_subset_refuses_in_one_line_and_writes_nothing(voc_copy, tmp_path, capsys):
    # An existing folder that holds anything is not overwritten.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, _, err = run_cli(["data", "subset", str(voc_copy), str(taken)], capsys)
    assert code == 1
    assert one_error_line(err) == f"rcnn: error: '{taken}' already exists and is not an empty folder; name a new one"
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    # An image the split lists but that is missing: named, and neither the folder nor its temporary copy is left behind.
    trainval = VOCDataset(voc_copy, "trainval").ids
    for image_id in trainval[1:]:
        (voc_copy / "JPEGImages" / f"{image_id}.jpg").unlink()
    dst = tmp_path / "out"
    code, _, err = run_cli(["data", "subset", str(voc_copy), str(dst), "--split", f"trainval={len(trainval)}"], capsys)
    line = one_error_line(err)
    assert code == 1 and "is listed in" in line and line.endswith("but missing; nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "voc"]
    # Arguments: NAME=N, each split once, at least one image; a source that is not there.
    for argv, needle, status in (
        (["--split", "trainval"], "'trainval' is not NAME=N, e.g. trainval=100", 2),
        (["--split", "test=1", "--split", "test=2"], "split 'test' is given twice", 2),
        (["--split", "test=0"], "split 'test': the number of images must be at least 1, got 0", 1),
        (["--split", "val=3"], "split file", 1),
    ):
        code, _, err = run_cli(["data", "subset", str(voc_copy), str(dst), *argv], capsys)
        assert code == status and needle in one_error_line(err), argv
    code, _, err = run_cli(["data", "subset", str(tmp_path / "nowhere"), str(dst)], capsys)
    assert code == 1 and "does not exist; give `rcnn data subset` the folder holding JPEGImages/" in one_error_line(err)
    assert not dst.exists()
