"""Every bad input of the README's table: what the user sees, through the real command line."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import numpy as np
import pytest
from conftest import run_cli, write_pipelines
from PIL import Image

from rcnn.cli import main
from rcnn.config import PipelineFile
from rcnn.data.datasets import VOCDataset, decode_image
from rcnn.errors import UserError
from rcnn.stages.context import Context
from rcnn.store import records

CLASSES = "[circle, square, triangle, star, cross]"


def run_proposals(voc, tmp_path, capsys, *flags: str) -> tuple[int, str, str]:
    pf = write_pipelines(tmp_path / "p.yaml", voc)
    with pytest.raises(SystemExit) as e:
        main(["proposals", "tiny", "--pipelines-file", str(pf), "--runs-dir", str(tmp_path / "runs"), "--quiet", *flags])
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def manifest(tmp_path, stage: str, split: str) -> dict:
    return json.loads((tmp_path / "runs" / "tiny" / stage / split / "manifest.json").read_text())


def assert_one_line(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def first(voc, split="trainval") -> str:
    return VOCDataset(voc, split).ids[0]


def damage_truncated_jpeg(voc):
    path = voc / "JPEGImages" / f"{first(voc)}.jpg"
    path.write_bytes(path.read_bytes()[:-200])
    return "truncated JPEG"


def damage_corrupt_jpeg(voc):
    (voc / "JPEGImages" / f"{first(voc)}.jpg").write_bytes(b"this is not an image at all" * 10)
    return "cannot be decoded"


def damage_empty_image(voc):
    # OpenCV raised cv2.error (a traceback from the workers, even with --skip-bad) on a zero-byte file.
    (voc / "JPEGImages" / f"{first(voc)}.jpg").write_bytes(b"")
    return "cannot be decoded (an empty file)"


def damage_size(voc):
    xml = voc / "Annotations" / f"{first(voc)}.xml"
    xml.write_text(xml.read_text().replace("<height>96</height>", "<height>90</height>"))
    return "is 96x96 but its annotation says 96x90"


def _set_first_xmax(voc, value: str) -> None:
    xml = voc / "Annotations" / f"{first(voc)}.xml"
    text = xml.read_text()
    start, end = text.index("<xmax>") + len("<xmax>"), text.index("</xmax>")
    xml.write_text(text[:start] + value + text[end:])


def damage_outside(voc):
    _set_first_xmax(voc, "140")
    return "lies outside the 96x96 image"


def damage_inverted(voc):
    _set_first_xmax(voc, "0")
    return "inverted box"


def damage_unknown_class(voc):
    xml = voc / "Annotations" / f"{first(voc)}.xml"
    text = xml.read_text()
    start = text.index("<name>") + len("<name>")
    xml.write_text(text[:start] + "unicorn" + text[text.index("</name>") :])
    return None  # classes come from the data here; a fixed class list is tested below


def damage_duplicate_id(voc):
    split = voc / "ImageSets" / "Main" / "trainval.txt"
    split.write_text(split.read_text() + first(voc) + "\n")
    return "is listed twice"


def damage_escaping_id(voc):
    split = voc / "ImageSets" / "Main" / "trainval.txt"
    split.write_text("../../outside\n" + split.read_text())
    return "not a plain file name"


def damage_spaced_id(voc):
    split = voc / "ImageSets" / "Main" / "trainval.txt"
    split.write_text(split.read_text() + "my holiday photo\n")
    return "'my holiday photo' is not one image id; ids cannot contain whitespace"


def damage_malformed_xml(voc):
    (voc / "Annotations" / f"{first(voc)}.xml").write_text("<annotation><size><width>96")
    return "malformed XML"


def damage_missing_image(voc):
    (voc / "JPEGImages" / f"{first(voc)}.jpg").unlink()
    return "is listed in"


# Damage to one image's files (what --skip-bad can leave out), as opposed to the split file's.
IMAGE_DAMAGES = [
    damage_truncated_jpeg,
    damage_corrupt_jpeg,
    damage_empty_image,
    damage_size,
    damage_outside,
    damage_inverted,
    damage_malformed_xml,
    damage_missing_image,
]


@pytest.mark.parametrize("damage", [*IMAGE_DAMAGES, damage_duplicate_id, damage_escaping_id, damage_spaced_id])
def test_refused_with_one_line_naming_the_file(damage, voc_copy, tmp_path, capsys):
    needle = damage(voc_copy)
    code, _, err = run_proposals(voc_copy, tmp_path, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0]
    assert str(voc_copy) in lines[0] or "trainval.txt" in lines[0]
    assert not (tmp_path / "runs" / "tiny" / "proposals" / "trainval" / "manifest.json").exists()


def test_unknown_class_with_a_fixed_class_list(voc_copy, tmp_path, capsys):
    damage_unknown_class(voc_copy)
    pf = write_pipelines(tmp_path / "p.yaml", voc_copy)
    pf.write_text(pf.read_text().replace("root: ", "classes: [circle, square, triangle, star, cross]\n      root: ", 1))
    with pytest.raises(SystemExit) as e:
        main(["proposals", "tiny", "--pipelines-file", str(pf), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "'unicorn' is not in the pipeline's class list" in err


def test_a_subset_of_the_classes_is_trained_with_other_classes_ignored(voc_copy, tmp_path, capsys):
    # There was no way to detect a subset of a dataset's classes: any other class stopped the run.
    import json

    pf = write_pipelines(tmp_path / "p.yaml", voc_copy)
    common = [
        "--pipelines-file",
        str(pf),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--quiet",
        "--set",
        "data.classes=[circle,square]",
    ]
    code, _, err = run_cli(["run", "tiny", *common], capsys)
    assert code == 1 and "is not in the pipeline's class list (circle, square)" in err and "data.other_classes: ignore" in err
    code, out, err = run_cli(["run", "tiny", *common, "--set", "data.other_classes=ignore"], capsys)
    assert code == 0, err
    # What was left out is counted per split and class, so a misspelt class is not dropped unseen.
    for split in ("trainval", "test"):
        others = Counter(n for a in VOCDataset(voc_copy, split).annotations() for n in a.labels if n not in ("circle", "square"))
        counts = ", ".join(f"{name} {n}" for name, n in others.most_common())
        line = f"data/{split}: {others.total()} object(s) of classes outside data.classes left out (data.other_classes: ignore): "
        assert line + counts + "\n" in out
    # status says what the next run would do: it notes the same under ignore, and under error (every stage
    # done, as other_classes changes no result) that the run stops before its first stage.
    status = ["status", "tiny", *[a for a in common if a != "--quiet"]]
    code, out, _ = run_cli([*status, "--set", "data.other_classes=ignore"], capsys)
    assert code == 0 and line + counts + "\n" in out and "data: the next run" not in out
    code, out, _ = run_cli(status, capsys)
    assert code == 0 and " missing" not in out and " stale" not in out
    assert "  data: the next run stops before its first stage: " in out and "data.other_classes: ignore" in out
    results = json.loads((tmp_path / "runs" / "tiny" / "evaluate" / "test" / "results.json").read_text())
    assert sorted(results["per_class"]) == ["circle", "square"]
    names = sorted(f.name for f in (tmp_path / "runs" / "tiny" / "evaluate" / "test" / "detections").iterdir())
    assert names == ["comp4_det_test_circle.txt", "comp4_det_test_square.txt"]


def test_objects_left_out_under_ignore_name_a_likely_misspelling(voc_copy):
    from rcnn.stages.prepare import left_out_note

    classes = ("circles", "square")
    ds = VOCDataset(voc_copy, "trainval", only=classes)
    assert left_out_note(ds, classes) is None  # nothing parsed yet, nothing left out
    ds.annotations()
    note = left_out_note(ds, classes)
    assert "circle " in note and note.endswith("; misspelt? 'circle' (did you mean 'circles'?)")
    assert "triangle" in note and "'triangle' (did you mean" not in note


def run_pipeline(voc, tmp_path, capsys, *flags: str) -> tuple[int, str, str]:
    pf = write_pipelines(tmp_path / "p.yaml", voc)
    return run_cli(["run", "tiny", "--pipelines-file", str(pf), "--runs-dir", str(tmp_path / "runs"), "--quiet", *flags], capsys)


def test_a_class_name_that_would_leave_its_folder_is_refused_before_any_stage(voc_copy, tmp_path, capsys):
    # Written as a devkit file name, this class would have put comp4_det_test_x/../../../../tmp/ESCAPED.txt anywhere.
    xml = voc_copy / "Annotations" / f"{first(voc_copy)}.xml"
    text = xml.read_text()
    start = text.index("<name>") + len("<name>")
    xml.write_text(text[:start] + "x/../../../../tmp/ESCAPED" + text[text.index("</name>") :])
    code, _, err = run_pipeline(voc_copy, tmp_path, capsys)
    assert_one_line(code, err, str(xml), "class name 'x/../../../../tmp/ESCAPED', which cannot be a file name (it contains '/')")
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_class_without_training_objects_is_refused_before_proposals(voc_copy, tmp_path, capsys):
    # Without the check, proposals, fine-tuning and features ran before the SVMs found the class empty.
    classes = "[circle, square, triangle, star, cross, unicorn]"
    code, _, err = run_pipeline(voc_copy, tmp_path, capsys, "--set", f"data.classes={classes}")
    assert_one_line(code, err, "class unicorn has no object to train on in split 'trainval'", str(voc_copy))
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_class_whose_only_training_object_is_in_a_skipped_image_is_refused(voc_copy, tmp_path, capsys):
    ids = VOCDataset(voc_copy, "trainval").ids
    only = [i for i in ids if "<name>star</name>" in (voc_copy / "Annotations" / f"{i}.xml").read_text()]
    assert len(only) == 1  # the tiny data's one star of trainval
    image = voc_copy / "JPEGImages" / f"{only[0]}.jpg"
    image.write_bytes(image.read_bytes()[:-200])
    code, _, err = run_pipeline(voc_copy, tmp_path, capsys, "--skip-bad", "--set", f"data.classes={CLASSES}")
    assert_one_line(code, err, "class star has no object to train on")
    assert not (tmp_path / "runs" / "tiny" / "proposals").exists()


@pytest.mark.parametrize("flags", [(), ("--skip-bad",)])
@pytest.mark.parametrize("split", ["trainval", "test"])
def test_an_empty_split_is_refused_before_any_stage(split, flags, voc_copy, tmp_path, capsys):
    # An empty test split ran every stage through to `evaluate/test: mAP nan` and exit status 0.
    split_file = voc_copy / "ImageSets" / "Main" / f"{split}.txt"
    split_file.write_text("")
    code, out, err = run_pipeline(voc_copy, tmp_path, capsys, *flags)
    assert_one_line(code, err, f"split '{split}' is empty: '{split_file}' lists no image ids")
    assert "proposals" not in out and not (tmp_path / "runs" / "tiny").exists()


def test_a_bad_test_annotation_is_refused_before_the_trainval_proposals(voc_copy, tmp_path, capsys):
    xml = voc_copy / "Annotations" / f"{first(voc_copy, 'test')}.xml"
    xml.write_text("<annotation><size>")
    code, _, err = run_proposals(voc_copy, tmp_path, capsys)
    assert_one_line(code, err, str(xml), "malformed XML")
    assert not (tmp_path / "runs" / "tiny" / "proposals" / "trainval" / "manifest.json").exists()


def test_image_without_objects_is_fine(voc_copy, tmp_path, capsys):
    image_id = first(voc_copy)
    xml = voc_copy / "Annotations" / f"{image_id}.xml"
    text = xml.read_text()
    xml.write_text(text[: text.index("<object>")] + "</annotation>\n")
    code, out, err = run_proposals(voc_copy, tmp_path, capsys)
    assert code == 0, err
    assert "recall" in out


def test_unusual_but_valid_images_decode_as_stored_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.jpg")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.dstack([rgb, np.full((40, 60), 100, np.uint8)])).save(tmp_path / "alpha.png")
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees": VOC boxes refer to the stored pixels, so it is ignored
    rotated.save(tmp_path / "exif.jpg", exif=exif)
    for name in ("gray.jpg", "cmyk.jpg", "alpha.png", "exif.jpg"):
        image = decode_image(tmp_path / name)
        assert image.shape == (40, 60, 3) and image.dtype == np.uint8, name
    # The PNG's colours survive, alpha dropped (BGR order inside the project).
    np.testing.assert_array_equal(decode_image(tmp_path / "alpha.png")[..., ::-1], rgb)


# ----------------------------------------------------------------------------- --skip-bad


@pytest.mark.parametrize("damage", [*IMAGE_DAMAGES, damage_unknown_class])
def test_skip_bad_leaves_the_image_out_logs_and_records_it(damage, voc_copy, tmp_path, capsys):
    bad = first(voc_copy)
    kept = [i for i in VOCDataset(voc_copy, "trainval").ids if i != bad]
    needle = damage(voc_copy) or "'unicorn' is not in the pipeline's class list"
    # A fixed class list, so that the unknown class is an error rather than a new class.
    code, out, err = run_proposals(voc_copy, tmp_path, capsys, "--skip-bad", "--set", f"data.classes={CLASSES}")
    assert code == 0 and "Traceback" not in err, err
    logged = [line for line in out.splitlines() if "skipping image" in line]
    assert len(logged) == 1 and bad in logged[0] and needle in logged[0]
    assert "proposals/trainval: " in out and "1 bad image(s) skipped" in out
    data = manifest(tmp_path, "proposals", "trainval")["data"]
    assert data["skip_bad"] and data["images_skipped"] == 1
    assert [s["id"] for s in data["skipped"]] == [bad] and needle in data["skipped"][0]["reason"]
    assert manifest(tmp_path, "proposals", "trainval")["metrics"]["images"] == len(kept)
    assert manifest(tmp_path, "proposals", "test")["data"]["images_skipped"] == 0
    with records.RecordFile(tmp_path / "runs" / "tiny" / "proposals" / "trainval" / "proposals.h5", "proposals") as f:
        assert f.ids == kept and all(len(f.array(i, "boxes")) > 0 for i in kept)


@pytest.mark.parametrize("damage", [damage_duplicate_id, damage_escaping_id, damage_spaced_id])
def test_skip_bad_does_not_skip_a_broken_split_file(damage, voc_copy, tmp_path, capsys):
    needle = damage(voc_copy)
    code, _, err = run_proposals(voc_copy, tmp_path, capsys, "--skip-bad")
    assert_one_line(code, err, needle)


def test_skip_bad_refuses_a_split_with_nothing_left(voc_copy, tmp_path, capsys):
    for image_id in VOCDataset(voc_copy, "test").ids:
        (voc_copy / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"not an image")
    code, _, err = run_proposals(voc_copy, tmp_path, capsys, "--skip-bad")
    assert_one_line(code, err, "every image of split 'test'", "cannot be decoded")


def test_skip_bad_keeps_clean_data_fingerprints_and_a_repair_makes_stale(voc_copy, tmp_path, capsys):
    code, _, err = run_proposals(voc_copy, tmp_path, capsys)
    assert code == 0, err
    # Nothing to skip: the same fingerprints, so nothing is recomputed.
    code, out, _ = run_proposals(voc_copy, tmp_path, capsys, "--skip-bad")
    assert code == 0 and out.count("up to date, skipped") == 2

    image = voc_copy / "JPEGImages" / f"{first(voc_copy)}.jpg"
    saved = image.read_bytes()
    damage_truncated_jpeg(voc_copy)
    code, out, _ = run_proposals(voc_copy, tmp_path, capsys, "--skip-bad")
    assert code == 0 and "proposals/trainval: stale" in out and "proposals/test: up to date" in out
    status = ["status", "tiny", "--pipelines-file", str(tmp_path / "p.yaml"), "--runs-dir", str(tmp_path / "runs")]
    # Status judges a pipeline built with --skip-bad as such, and names the skipped image.
    code, out, _ = run_cli(status, capsys)
    assert code == 0 and out.count(" done ") == 2 and "1 bad image(s) skipped" in out
    assert f"trainval/{first(voc_copy)}: image" in out and "truncated JPEG" in out

    image.write_bytes(saved)
    code, out, _ = run_cli(status, capsys)
    assert "proposals/trainval       stale" in out and "input data/trainval changed" in out
    code, out, _ = run_proposals(voc_copy, tmp_path, capsys, "--skip-bad")
    assert code == 0 and "skipping image" not in out
    m = manifest(tmp_path, "proposals", "trainval")
    assert m["data"]["images_skipped"] == 0 and m["metrics"]["images"] == len(VOCDataset(voc_copy, "trainval"))


def test_a_stage_without_skip_bad_refuses_upstream_built_with_it(voc_copy, tmp_path, capsys):
    damage_corrupt_jpeg(voc_copy)
    assert run_proposals(voc_copy, tmp_path, capsys, "--skip-bad")[0] == 0
    common = ["tiny", "--pipelines-file", str(tmp_path / "p.yaml"), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    code, _, err = run_cli(["finetune", *common], capsys)
    assert_one_line(
        code,
        err,
        "proposals/trainval of pipeline 'tiny' was built with --skip-bad, leaving out 1 image(s) of trainval "
        f"({first(voc_copy)}), but this run reads every image; pass --skip-bad",
    )


def test_skip_list_is_the_same_in_every_process_and_decoding_is_remembered(voc_copy, tmp_path, monkeypatch):
    damage_size(voc_copy)
    cfg = PipelineFile(write_pipelines(tmp_path / "p.yaml", voc_copy)).load("tiny")

    def dataset():
        logs: list[str] = []
        ctx = Context(cfg=cfg, runs_dir=tmp_path / "runs", progress=False, log=logs.append, skip_bad=True)
        return ctx.dataset("trainval"), logs

    a, logs = dataset()
    assert list(a.skipped) == [first(voc_copy)] and len(logs) == 1
    decoded = []
    real = VOCDataset.decode_problem
    monkeypatch.setattr(VOCDataset, "decode_problem", lambda self, i: decoded.append(i) or real(self, i))
    b, _ = dataset()
    assert (b.ids, b.skipped, b.fingerprint) == (a.ids, a.skipped, a.fingerprint)
    assert decoded == [first(voc_copy)]  # only the bad image is decoded again


def test_skip_bad_run_lines_up_every_stage(voc_copy, tmp_path, capsys):
    bad_trainval = first(voc_copy)
    damage_truncated_jpeg(voc_copy)
    bad_test = first(voc_copy, "test")
    (voc_copy / "Annotations" / f"{bad_test}.xml").write_text("<annotation><size>")
    pf = write_pipelines(tmp_path / "p.yaml", voc_copy)
    common = ["--pipelines-file", str(pf), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    code, out, err = run_cli(["run", "tiny", "--until", "features", "--skip-bad", *common], capsys)
    assert code == 0, err
    # Logged once per run, listed again at its end.
    assert out.count(f"skipping image {bad_trainval}") == 1 and out.count(f"skipping image {bad_test}") == 1
    assert "2 bad image(s) skipped" in out and f"trainval/{bad_trainval}:" in out and f"test/{bad_test}:" in out
    for split, bad in (("trainval", bad_trainval), ("test", bad_test)):
        kept = [i for i in VOCDataset(voc_copy, split).ids if i != bad]
        stages = ("proposals", "finetune", "features") if split == "trainval" else ("proposals", "features")
        for stage in stages:
            assert [s["id"] for s in manifest(tmp_path, stage, split)["data"]["skipped"]] == [bad], stage
        with records.RecordSet(tmp_path / "runs" / "tiny" / "features" / split / "index.json", "features") as rs:
            assert rs.ids == kept
    code, out, _ = run_cli(["status", "tiny", *common[:-1]], capsys)
    assert out.count(" done ") == 5


def test_compare_judges_a_skip_bad_run_as_status_does(voc_copy, tmp_path, capsys, monkeypatch):
    # It called every unit of such a run stale ("input data/trainval changed") while `rcnn status` said done.
    damage_truncated_jpeg(voc_copy)
    (voc_copy / "Annotations" / f"{first(voc_copy, 'test')}.xml").write_text("<annotation><size>")
    pf = write_pipelines(tmp_path / "p.yaml", voc_copy)
    monkeypatch.setenv("RCNN_PIPELINES", str(pf))
    runs = ["--runs-dir", str(tmp_path / "runs")]
    assert run_cli(["run", "tiny", "--skip-bad", "--quiet", *runs], capsys)[0] == 0
    code, out, _ = run_cli(["status", "tiny", *runs], capsys)
    assert code == 0 and out.count(" done ") == 8 and "stale" not in out, out
    code, _, err = run_cli(["compare", "tiny", "tiny", *runs, "--out", str(tmp_path / "report")], capsys)
    assert code == 0 and "stale" not in err, err
    # The test images it counts are those kept, and it says so (the table said "1" of 2 without a word).
    kept = len(VOCDataset(voc_copy, "test").ids) - 1
    assert f"| test | {kept} (1 left out by --skip-bad) |" in (tmp_path / "report" / "report.md").read_text()


# ----------------------------------------------------------------------------- upstream from other data or classes


def test_upstream_built_from_other_data_is_refused_naming_both(voc_copy, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(voc_copy, other)
    xml = other / "Annotations" / f"{first(other)}.xml"
    xml.write_text(xml.read_text() + "\n")
    pf = write_pipelines(tmp_path / "p.yaml", voc_copy)
    common = ["tiny", "--pipelines-file", str(pf), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    assert run_cli(["proposals", *common], capsys)[0] == 0

    code, _, err = run_cli(["finetune", *common, "--set", f"data.root={other}"], capsys)
    assert_one_line(
        code,
        err,
        f"proposals/trainval of pipeline 'tiny' was built from dataset {voc_copy} [trainval]",
        f"but this configuration reads {other} [trainval]",
        f"rerun `rcnn proposals tiny --runs-dir {tmp_path / 'runs'}` (or `rcnn run tiny --runs-dir {tmp_path / 'runs'}`)",
    )
    # The same data moved elsewhere is not "other data".
    moved = tmp_path / "moved"
    shutil.copytree(voc_copy, moved)
    code, out, _ = run_cli(["status", *common[:-1], "--set", f"data.root={moved}"], capsys)
    assert out.count(" done ") == 2 and "built from" not in out

    xml = voc_copy / "Annotations" / f"{first(voc_copy)}.xml"
    xml.write_text(xml.read_text() + "\n")
    code, _, err = run_cli(["finetune", *common], capsys)
    assert_one_line(code, err, f"proposals/trainval of pipeline 'tiny' was built from {voc_copy} [trainval] before its files")

    # `rcnn run` rebuilds the upstream first, so it goes through.
    code, out, err = run_cli(["run", *common, "--until", "finetune", "--set", f"data.root={other}"], capsys)
    assert code == 0, err
    assert "proposals/trainval: stale" in out and "finetune/trainval: done in" in out
    assert manifest(tmp_path, "finetune", "trainval")["data"]["root"] == str(other)


def test_upstream_built_from_other_classes_is_refused_naming_both(pipelines_file, tiny_voc, tmp_path, capsys):
    common = ["tiny", "--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    code, _, err = run_cli(["run", *common, "--until", "finetune"], capsys)
    assert code == 0, err
    built = manifest(tmp_path, "finetune", "trainval")["params"]["classes"]
    now = built[::-1]  # the same classes in another order: another label per class index
    override = ["--set", f"data.classes=[{', '.join(now)}]"]

    code, _, err = run_cli(["features", *common, *override], capsys)
    assert_one_line(
        code,
        err,
        f"finetune/trainval of pipeline 'tiny' was built from classes ({', '.join(built)}) "
        f"but this configuration has ({', '.join(now)})",
        f"rerun `rcnn finetune tiny --runs-dir {tmp_path / 'runs'}` (or `rcnn run tiny --runs-dir {tmp_path / 'runs'}`)",
    )
    assert not (tmp_path / "runs" / "tiny" / "features" / "trainval" / "manifest.json").exists()

    code, out, err = run_cli(["run", *common, "--until", "features", *override], capsys)
    assert code == 0, err
    assert "finetune/trainval: stale (parameter classes" in out
    assert manifest(tmp_path, "features", "test")["params"]["classes"] == now


def test_a_trunk_trained_by_other_code_is_noted_where_it_is_built_on(pipelines_file, tmp_path, capsys):
    # model.weights: pipeline:tiny used tiny's fine-tuned model without a word after rcnn changed under it.
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path)]
    assert run_cli(["finetune", "tiny", *common, "--quiet"], capsys)[0] == 1  # proposals first
    assert run_cli(["proposals", "tiny", *common, "--quiet"], capsys)[0] == 0
    assert run_cli(["finetune", "tiny", *common, "--quiet"], capsys)[0] == 0
    code, out, _ = run_cli(["status", "tiny-spp", *common], capsys)
    assert code == 0 and "model.weights" not in out  # trained by this code: nothing to say
    path = tmp_path / "tiny" / "finetune" / "trainval" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["code"]["modules"]["rcnn.training.finetune"] = "0" * 32  # as an older rcnn recorded it
    manifest["code"]["digest"] = "0" * 32
    path.write_text(json.dumps(manifest))
    said = (
        "model.weights: pipeline:tiny: that pipeline's fine-tuned model was trained by other code "
        "(rcnn.training.finetune changed); this pipeline builds on it as it is; `rcnn finetune tiny --runs-dir"
    )
    code, out, _ = run_cli(["status", "tiny-spp", *common], capsys)
    assert code == 0 and said in out
    code, out, err = run_cli(["proposals", "tiny-spp", *common, "--quiet"], capsys)
    assert code == 0 and said in out, err


def test_fine_tuning_that_diverges_stops_with_the_setting_to_lower(pipelines_file, tmp_path, capsys):
    # A loss gone nan was "done": its features were cached and train-svm failed far from the cause.
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path), "--quiet"]
    code, _, err = run_cli(["run", "tiny", *common, "--set", "finetune.lr=1e30"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    said = re.match(r"rcnn: error: fine-tuning diverged: the loss is (nan|inf) by iteration (\d+) of 24 \(learning rate 1e\+30",
                    err)  # fmt: skip
    # The running loss is read at the first checkpoint (iteration 8), or earlier where a second has passed (the
    # progress bar's reading, quiet or not): on a loaded machine that came at iteration 2.
    assert said and 1 <= int(said.group(2)) <= 8, err
    assert err.strip().endswith("lower finetune.lr (now 1e+30)")
    assert not (tmp_path / "tiny" / "finetune" / "trainval" / "manifest.json").exists()
    assert not (tmp_path / "tiny" / "features").exists()


def test_features_out_of_float16_range_stop_the_stage_naming_the_image(pipelines_file, tmp_path, capsys, monkeypatch):
    # A network whose loss stayed finite but whose activations overflow float16 cached inf/nan, and the SVMs
    # failed in scikit-learn ("Input X contains NaN").
    import torch

    from rcnn.stages import features
    from rcnn.stages.features import all_finite

    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path), "--quiet"]
    assert run_cli(["run", "tiny", "--until", "finetune", *common], capsys)[0] == 0
    loaded = features.inference_model

    def blown_up(ctx):  # as a fine-tuning with a far too high rate leaves it, its loss still finite
        model = loaded(ctx)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1e4)
        return model

    monkeypatch.setattr(features, "inference_model", blown_up)
    code, _, err = run_cli(["run", "tiny", *common], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert re.match(r"rcnn: error: features/trainval: the \w+ features of image \S+ hold inf or nan \(float16", err), err
    assert not (tmp_path / "tiny" / "features" / "trainval" / "manifest.json").exists()
    values = np.zeros((3, 4), np.float16)
    assert all_finite(values) and all_finite(values.astype(np.float32))
    for bad in (np.inf, -np.inf, np.nan):
        values[1, 2] = bad
        assert not all_finite(values) and not all_finite(values.astype(np.float32))
        values[1, 2] = 65504  # float16's largest
        assert all_finite(values)


def test_the_same_weights_file_at_another_path_keeps_the_fine_tuning(pipelines_file, tmp_path, capsys):
    # The path was a parameter besides the file's digest: a copy of the same bytes (a moved runs folder, another
    # $RCNN_SQUEEZENET_WEIGHTS) made fine-tuning and everything after it stale, and rcnn detect refused.
    import torch

    from rcnn.modeling.models import build_model

    first, copy, other = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "c.pth"
    torch.save(build_model("tiny", 6, 32, seed=0).state_dict(), first)
    shutil.copy(first, copy)
    torch.save(build_model("tiny", 6, 32, seed=1).state_dict(), other)
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs")]
    assert run_cli(["run", "tiny", "--until", "finetune", *common, "--quiet", "--set", f"model.weights={first}"], capsys)[0] == 0

    def finetune_state(weights):
        code, out, _ = run_cli(["status", "tiny", *common, "--set", f"model.weights={weights}"], capsys)
        assert code == 0
        return next(line for line in out.splitlines() if "finetune/trainval" in line).split()[1:]

    assert finetune_state(copy)[0] == "done"
    assert finetune_state(other)[0] == "stale" and "input weights changed" in " ".join(finetune_state(other))


def test_unfinished_work_of_another_configuration_is_kept_while_the_unit_is_done(voc_copy, tmp_path, capsys):
    # A --set variant stopped midway left its training state in .work; the next run of the plain configuration,
    # finding its unit done, deleted it without a word.
    pf = write_pipelines(tmp_path / "p.yaml", voc_copy)
    common = ["proposals", "tiny", "--pipelines-file", str(pf), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    assert run_cli(common, capsys)[0] == 0
    work = tmp_path / "runs" / "tiny" / "proposals" / "trainval" / ".work"
    work.mkdir()
    (work / "fingerprint").write_text("0" * 32 + "\n")  # another configuration's
    (work / "state").write_text("hours of work")
    code, out, _ = run_cli(common, capsys)
    assert code == 0 and "proposals/trainval: up to date, skipped (its .work folder keeps the unfinished work" in out
    assert (work / "state").is_file()
    # Recomputing the unit for a configuration of its own discards it, and says so; the reason is worded as
    # rcnn status words it (a run said "input data/trainval changed" for another folder).
    other = tmp_path / "other"
    shutil.copytree(voc_copy, other)
    with (other / "Annotations" / f"{first(other)}.xml").open("a") as xml:
        xml.write("<!-- edited -->\n")
    code, out, err = run_cli([*common, "--set", f"data.root={other}"], capsys)
    assert code == 0, err
    assert f"proposals/trainval: stale (input data/trainval is another folder: {other}, where the unit read {voc_copy})" in out
    assert "proposals/trainval: the unfinished work of another configuration in its .work folder is discarded" in out
    assert not (work / "state").exists()


def test_boxes_past_the_edge_are_clipped_with_clip_boxes(voc_copy, tmp_path, capsys):
    # An annotation tool's off-by-one (xmax = width + 1, or a 0-based xmin of 0) cost the whole image, with no way
    # to keep it short of editing every XML.
    _set_first_xmax(voc_copy, "97")  # the images are 96 px wide
    xml = voc_copy / "Annotations" / f"{first(voc_copy)}.xml"
    code, _, err = run_pipeline(voc_copy, tmp_path, capsys, "--until", "proposals")
    assert (
        code == 1
        and "lies outside the 96x96 image" in err
        and err.strip().endswith("or the <size>, or set data.clip_boxes: true in the pipeline to clip boxes to the image")
    )
    code, _, err = run_pipeline(voc_copy, tmp_path, capsys, "--until", "proposals", "--set", "data.clip_boxes=true")
    assert code == 0, err
    ann = VOCDataset(voc_copy, "trainval", clip=True).annotation(first(voc_copy))
    assert ann.boxes[0][2] == 96  # continuous, 0-based: the 1-based xmax 96 is the right edge
    # A box wholly outside is an error still: no clipping makes it an object of this image.
    text = xml.read_text()
    text = re.sub(r"<xmin>[^<]*</xmin>", "<xmin>120</xmin>", text, count=1)
    xml.write_text(re.sub(r"<xmax>[^<]*</xmax>", "<xmax>130</xmax>", text, count=1))
    with pytest.raises(UserError, match=r"lies wholly outside the 96x96 image .*fix the box or the <size>$"):
        VOCDataset(voc_copy, "trainval", clip=True).annotation(first(voc_copy))
