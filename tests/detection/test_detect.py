"""`rcnn detect` on a batch of files: outputs never collide, a bad image costs only itself."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli

from rcnn.detection.detector import ClassDetections, detect_files, output_names

REPO = Path(__file__).resolve().parents[2]


class WholeImageDetector:
    """Stands in for a trained pipeline: one box over the whole image, scored by its mean brightness."""

    classes = ("bright",)

    def __call__(self, image_bgr: np.ndarray, seed: int = 0) -> ClassDetections:
        h, w = image_bgr.shape[:2]
        return ClassDetections([np.array([[0, 0, w, h]], np.float32)], [np.array([image_bgr.mean() / 255], np.float32)])


def _image(path: Path, width: int, height: int, level: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), level, np.uint8))
    return path


@pytest.fixture
def batch(tmp_path) -> list[Path]:
    """Three images named x in different folders (one as X.png), an undecodable one, and one after it."""
    bad = tmp_path / "in" / "bad" / "y.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image at all" * 8)
    return [
        _image(tmp_path / "in" / "a" / "x.jpg", 30, 20, 40),
        _image(tmp_path / "in" / "b" / "x.jpg", 10, 40, 200),
        _image(tmp_path / "in" / "c" / "X.png", 16, 16, 120),
        bad,
        _image(tmp_path / "in" / "d" / "z.jpg", 12, 14, 90),
    ]


def test_output_names_are_distinct_even_case_blind():
    assert output_names(["a/x.jpg", "b/x.jpg", "c/X.png", "x-2.jpg", "d/z.jpg"]) == ["x", "x-2", "X-3", "x-2-2", "z"]
    assert output_names(["a/x.jpg", "b/y.jpg"]) == ["x", "y"]  # nothing renamed without a collision


def test_same_names_never_overwrite_and_a_bad_image_costs_only_itself(batch, tmp_path):
    out = tmp_path / "out"
    results = list(detect_files(WholeImageDetector(), batch, out, threshold=0.0))
    assert [r.path for r in results] == batch
    assert [r.output for r in results] == ["x", "x-2", "X-3", None, "z"]
    bad = results[3]
    assert bad.error is not None and str(batch[3]) in bad.error and "cannot be decoded" in bad.error
    # Each JSON is its own image's: the size written and the brightness it was scored by.
    for r, (w, h, level) in zip([*results[:3], results[4]], [(30, 20, 40), (10, 40, 200), (16, 16, 120), (12, 14, 90)]):
        saved = json.loads((out / f"{r.output}.json").read_text())
        assert saved["image"] == str(r.path) and (saved["width"], saved["height"]) == (w, h)
        assert saved["detections"][0]["score"] == pytest.approx(level / 255, abs=1e-3)
        assert cv2.imread(str(out / f"{r.output}.det.jpg")).shape[:2] == (h, w)
    expected = [f"{n}{ext}" for n in ("x", "x-2", "X-3", "z") for ext in (".json", ".det.jpg")]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)


def test_detect_command_reports_each_bad_image_and_fails_at_the_end(batch, tmp_path, capsys, monkeypatch, pipelines_file):
    _fake_pipeline(monkeypatch)
    out = tmp_path / "out"
    argv = ["detect", "tiny", *map(str, batch), "--out", str(out), "--pipelines-file", str(pipelines_file)]
    code, stdout, stderr = run_cli([*argv, "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 1 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 2, stderr
    assert lines[0].startswith("skipped: ") and str(batch[3]) in lines[0] and "cannot be decoded" in lines[0]
    assert lines[1] == (
        "rcnn: error: 1 of 5 image(s) could not be read (each named above); "
        f"wrote the other 4 image(s) with their detections drawn and 4 JSON file(s) to {out}"
    )
    assert f"{batch[1]}: 1 detection (bright 0.78) -> x-2.json" in stdout
    assert f"{batch[0]}: 1 detection (bright 0.16)\n" in stdout  # its own name: nothing to say
    assert json.loads((out / "z.json").read_text())["image"] == str(batch[4])  # processed after the bad one


def _fake_pipeline(monkeypatch):
    from rcnn.stages import evaluate, finetune

    """``rcnn detect`` on a stand-in trained pipeline: current, and a detector scoring whole images."""
    from rcnn.commands import detect

    monkeypatch.setattr(detect, "untrained", lambda ctx, last: None)
    monkeypatch.setattr(evaluate, "check_trained", lambda ctx, bbox=True: None)
    monkeypatch.setattr(finetune, "load", lambda ctx: (None, {"classes": list(WholeImageDetector.classes)}))
    monkeypatch.setattr(detect, "build_detector", lambda ctx, cfg, model, classes, bbox=True: WholeImageDetector())


def test_an_empty_file_is_skipped_like_any_undecodable_image(tmp_path, capsys, monkeypatch, pipelines_file):
    # A zero-byte file made OpenCV raise cv2.error: a traceback, and the whole batch lost.
    _fake_pipeline(monkeypatch)
    empty = tmp_path / "in" / "empty.jpg"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    good = _image(tmp_path / "in" / "good.jpg", 12, 14, 90)
    out = tmp_path / "out"
    argv = ["detect", "tiny", str(empty), str(good), "--out", str(out), "--pipelines-file", str(pipelines_file)]
    code, stdout, stderr = run_cli([*argv, "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 1 and "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines[0] == f"skipped: image '{empty}' cannot be decoded (an empty file); replace the file"
    assert lines[1].endswith(f"wrote the other 1 image(s) with their detections drawn and 1 JSON file(s) to {out}")
    assert sorted(p.name for p in out.iterdir()) == ["good.det.jpg", "good.json"]


def test_detect_says_what_it_wrote_or_that_nothing_was(batch, tmp_path, capsys, monkeypatch, pipelines_file):
    _fake_pipeline(monkeypatch)
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs")]
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["detect", "tiny", str(batch[0]), str(batch[4]), "--out", str(out), *common], capsys)
    assert code == 0 and stderr == ""
    assert stdout.splitlines()[-1] == f"wrote 2 image(s) with their detections drawn and 2 JSON file(s) to {out}"

    code, _, stderr = run_cli(["detect", "tiny", str(batch[3]), "--out", str(tmp_path / "none"), *common], capsys)
    assert code == 1 and "the others" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"rcnn: error: no image could be read (1 named above); nothing was written to {tmp_path / 'none'}"
    )


def test_the_help_example_is_an_image_the_demo_generates(capsys):
    from rcnn.config import PipelineFile, default_pipelines_file
    from rcnn.stages.context import Context

    demo = Context(cfg=PipelineFile(default_pipelines_file()).load("demo"), runs_dir=Path("runs"))
    code, out, _ = run_cli(["detect", "--help"], capsys)
    assert code == 0 and f"rcnn detect demo {demo.data_root}/JPEGImages/000003.jpg --out det/" in out
    assert (REPO / "docs" / "store.md").read_text().count(f"_data/{demo.data_root.name}/") == 1


def test_a_folder_stands_for_the_images_in_it(tmp_path, capsys, monkeypatch, pipelines_file):
    # A folder was refused ("is a directory"), and one among the arguments stopped the whole batch.
    _fake_pipeline(monkeypatch)
    folder = tmp_path / "photos"
    _image(folder / "b.png", 12, 14, 90)
    _image(folder / "a.JPG", 10, 10, 40)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    single = _image(tmp_path / "c.jpg", 8, 8, 200)
    (tmp_path / "empty").mkdir()
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs")]
    out = tmp_path / "out"
    # The same file twice (here inside the folder and by name) is detected once; the sub-folder is not searched.
    again = str(tmp_path / "photos" / ".." / "photos" / "b.png")
    argv = ["detect", "tiny", str(folder), str(single), again, "--out", str(out), *common]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    assert stderr.splitlines() == [
        f"note: folder '{folder}': its 1 sub-folder(s) (sub) are not searched; name them too to detect their images",
        f"note: '{again}' is '{folder / 'b.png'}' again; it is detected once",
    ]
    assert [line.split(":")[0] for line in stdout.splitlines()[:3]] == [str(folder / "a.JPG"), str(folder / "b.png"), str(single)]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}{e}" for n in "abc" for e in (".json", ".det.jpg"))
    assert stdout.splitlines()[-1].startswith("wrote 3 image(s)")
    # Detecting a folder into itself, twice: the second run does not detect its own drawings.
    argv = ["detect", "tiny", str(folder), "--out", str(folder), *common]
    assert run_cli(argv, capsys)[0] == 0
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0 and f"note: folder '{folder}': 2 drawn detection file(s) (*.det.jpg) passed over" in stderr
    assert [line.split(":")[0] for line in stdout.splitlines()[:2]] == [str(folder / "a.JPG"), str(folder / "b.png")]
    assert not list(folder.glob("*.det.det.jpg"))
    _image(tmp_path / "nested" / "inner" / "d.jpg", 8, 8, 100)
    code, _, stderr = run_cli(["detect", "tiny", str(tmp_path / "nested"), "--out", str(tmp_path / "o3"), *common], capsys)
    assert code == 1 and stderr.strip().endswith("(inner) are not searched; name them too to detect their images")
    code, _, stderr = run_cli(["detect", "tiny", str(tmp_path / "empty"), "--out", str(tmp_path / "o2"), *common], capsys)
    assert code == 1 and stderr.strip().splitlines()[-1].startswith(f"rcnn: error: folder '{tmp_path / 'empty'}' has no image")


def test_selective_search_is_seeded_per_image_as_the_proposals_stage_seeds_it(batch, tmp_path):
    # detect passed the bare proposals.seed: where max_proposals keeps a random share of the boxes, a dataset image
    # got other proposals (26 of 60 in common on a BCCD image) than the ones its evaluation scored.
    from rcnn.proposals.selective_search import image_seed

    seen = []

    class Spy(WholeImageDetector):
        def __call__(self, image_bgr, seed=0):
            seen.append(seed)
            return super().__call__(image_bgr, seed)

    good = [p for p in batch if p.name != "y.jpg"]
    list(detect_files(Spy(), good, tmp_path / "out", threshold=0.0, seed=7))
    assert seen == [image_seed(7, p.stem) for p in good] and len(set(seen)) == 3  # x, X and z


def test_an_untrained_pipeline_names_its_first_stage_not_run(tmp_path, capsys, pipelines_file):
    # After a fine-tuning that never finished it said "stage 'train-svm' (trainval) ... has not run yet; run
    # `rcnn train-svm ...` first", which would fail in turn for want of the features.
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs")]
    assert run_cli(["proposals", "tiny", *common, "--quiet"], capsys)[0] == 0
    image = _image(tmp_path / "a.jpg", 20, 20, 90)
    for extra, last in (([], "train-bbox"), (["--no-bbox-reg"], "train-svm")):
        code, _, err = run_cli(["detect", "tiny", str(image), "--out", str(tmp_path / "o"), *extra, *common], capsys)
        assert code == 1 and err.strip() == (
            "rcnn: error: pipeline 'tiny' is not trained yet: finetune/trainval has not run; "
            f"`rcnn run tiny --runs-dir {tmp_path / 'runs'} --until {last}` trains it"
        )


def test_a_trained_runs_folder_detects_without_its_training_data(voc_copy, tmp_path, capsys):
    # rcnn detect refused ("dataset root ... does not exist") unless every training and test image was there:
    # a runs folder trained on one machine could not detect on another.
    import shutil

    from conftest import write_pipelines

    pf = write_pipelines(tmp_path / "p.yaml", voc_copy)
    common = ["--pipelines-file", str(pf), "--runs-dir", str(tmp_path / "runs")]
    assert run_cli(["run", "tiny", "--until", "train-bbox", *common, "--quiet"], capsys)[0] == 0
    image = next((voc_copy / "JPEGImages").iterdir())
    photo = shutil.copy(image, tmp_path / "photo.jpg")
    argv = ["detect", "tiny", str(photo), *common]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "with")], capsys)
    assert code == 0 and err == "", err
    shutil.move(voc_copy, tmp_path / "elsewhere")
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "without")], capsys)
    assert code == 0 and err.startswith(f"note: the training data ({voc_copy}) is not here, so the trained stages"), err
    assert (tmp_path / "with" / "photo.json").read_text() == (tmp_path / "without" / "photo.json").read_text()
    # What can still be told without the data is refused as before: other settings, or units that do not chain.
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "o"), "--set", "svm.C=0.5"], capsys)
    assert code == 1 and "rcnn: error: train-svm/trainval of pipeline 'tiny' was made with other settings; rerun" in err
    # Features computed by another network than the one fine-tuning holds now (a fine-tuning rerun alone).
    features = tmp_path / "runs" / "tiny" / "features" / "trainval" / "manifest.json"
    saved = features.read_text()
    record = json.loads(saved)
    record["inputs"]["finetune"] = "0" * 32
    features.write_text(json.dumps(record))
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "features/trainval of pipeline 'tiny' was made from another finetune than the one here" in err, err
    features.write_text(saved)
    manifest = tmp_path / "runs" / "tiny" / "train-svm" / "trainval" / "manifest.json"
    record = json.loads(manifest.read_text())
    record["inputs"]["features/trainval"] = "0" * 32
    manifest.write_text(json.dumps(record))
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "was made from another features/trainval than the one here" in err, err
    record["code"]["digest"] = "0" * 32
    manifest.write_text(json.dumps(record))
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "train-svm/trainval of pipeline 'tiny' was made by other code; rerun" in err, err
