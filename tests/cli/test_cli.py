"""The command line: one clear line and the right exit status for user errors; working commands."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from rcnn.data.datasets import VOCDataset
from rcnn.structures.boxes import to_voc_pixels

run = run_cli


def assert_one_line_error(code, err, needle, expected_code):
    assert code == expected_code
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle in lines[0]


def test_help_everywhere(capsys):
    for argv in (
        ["--help"],
        ["proposals", "--help"],
        ["data", "synth", "--help"],
        ["evaluate", "--help"],
        ["status", "--help"],
        ["run", "--help"],
        ["data", "stats", "--help"],
        ["pipelines", "--help"],
    ):
        code, out, _ = run(argv, capsys)
        assert code == 0 and "Usage:" in out


def test_pipelines_lists_descriptions(capsys):
    code, out, _ = run(["pipelines"], capsys)
    assert code == 0 and "demo" in out and "voc07-mini" in out and "bccd" in out


@pytest.mark.parametrize(
    "argv, needle, status",
    [
        (["proposals", "nope"], "unknown pipeline 'nope'", 2),
        (["proposals", "demo", "--set", "proposals.bogus=1"], "unknown key 'bogus'", 2),
        (["proposals", "demo", "--set", "proposals.min_size=big"], "must be a number", 2),
        (["run", "demo", "--until", "nothing"], "unknown stage", 2),
        (["proposals"], "Missing argument 'PIPELINE'", 2),
        (["evaluate", "--metric", "voc12"], "'voc12' is not one of", 2),
        (["evaluate", "--data", "/nonexistent/voc", "--detections", "x"], "dataset root '/nonexistent/voc' does not exist", 1),
        (["evaluate", "--data", "d", "--detections", "x", "--force"], "--force apply to a pipeline's evaluation", 2),
        (["evaluate", "--data", "d", "--detections", "x", "--set", "evaluate.metric=voc10"], "--set apply to", 2),
        (["evaluate", "demo", "--data", "d"], "--data score devkit files without a pipeline", 2),
        (["evaluate"], "give a PIPELINE, or --data VOCDIR and --detections PATH", 2),
        (["compare", "demo", "--out", "report"], "rcnn compare: error: give two or more RUNS to compare", 2),
    ],
)
def test_user_errors_are_one_line(argv, needle, status, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RCNN_RUNS_DIR", str(tmp_path))
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, needle, status)


def test_until_a_stage_the_pipeline_lacks_is_refused_before_any_work(pipelines_file, tmp_path, capsys):
    # convmaps is SPP-net's: on an R-CNN pipeline the loop never met it and ran every stage through evaluate.
    argv = ["run", "tiny", "--until", "convmaps", "--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs")]
    code, out, err = run(argv, capsys)
    assert_one_line_error(
        code,
        err,
        "--until convmaps: stage 'convmaps' belongs to SPP-net pipelines; 'tiny' is an R-CNN pipeline "
        "(its stages: proposals, finetune, features, train-svm, train-bbox, evaluate)",
        2,
    )
    assert out == "" and not (tmp_path / "runs").exists()


def test_until_help_names_every_stage(capsys):
    from rcnn.stages import STAGES

    code, out, _ = run(["run", "--help"], capsys)
    start = out.index("--until STAGE")
    until = " ".join(out[start : out.index("--seeds", start)].split())
    assert code == 0 and all(name in until for name in STAGES), until


def test_missing_dataset_root_is_one_line(tmp_path, capsys):
    code, _, err = run(["proposals", "demo", "--runs-dir", str(tmp_path), "--set", f"data.root={tmp_path}/none"], capsys)
    assert_one_line_error(code, err, "does not exist", 1)


def test_missing_image_and_malformed_xml_are_one_line(voc_copy, tmp_path, capsys):
    from conftest import write_pipelines

    pf = write_pipelines(tmp_path / "p.yaml", voc_copy)
    ds = VOCDataset(voc_copy, "trainval")
    image = voc_copy / "JPEGImages" / f"{ds.ids[0]}.jpg"
    saved = image.read_bytes()
    image.unlink()
    base = ["proposals", "tiny", "--pipelines-file", str(pf), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    code, _, err = run(base, capsys)
    assert_one_line_error(code, err, f"{ds.ids[0]}.jpg' is listed in", 1)
    image.write_bytes(saved)
    (voc_copy / "Annotations" / f"{ds.ids[1]}.xml").write_text("<annotation><size>")
    code, _, err = run(base, capsys)
    assert_one_line_error(code, err, "malformed XML", 1)


def test_data_synth_stats_and_proposals_status(tmp_path, capsys):
    data = tmp_path / "synth"
    code, out, _ = run(["data", "synth", str(data), "--images", "5", "--size", "96", "--quiet"], capsys)
    assert code == 0 and (data / "ImageSets" / "Main" / "test.txt").is_file()
    code, out, _ = run(["data", "stats", str(data), "--split", "trainval"], capsys)
    assert code == 0 and "objects" in out and "median" in out
    code, _, err = run(["data", "synth", str(data)], capsys)
    assert_one_line_error(code, err, "already exists", 1)

    from conftest import write_pipelines

    pf = write_pipelines(tmp_path / "p.yaml", data)
    common = ["--pipelines-file", str(pf), "--runs-dir", str(tmp_path / "runs")]
    code, out, _ = run(["proposals", "tiny", "--quiet", *common], capsys)
    assert code == 0 and "recall" in out and "MABO" in out
    code, out, _ = run(["status", "tiny", *common], capsys)
    assert code == 0 and out.count(" done ") == 2
    code, out, _ = run(["status", "tiny", *common, "--set", "proposals.max_proposals=5"], capsys)
    assert out.count(" stale ") == 2 and "max_proposals: 50 -> 5" in out


def test_evaluate_devkit_files(tiny_voc, tmp_path, capsys):
    # Perfect detections of every object, written in devkit format, score AP 1 for both metrics.
    ds = VOCDataset(tiny_voc, "test")
    files: dict[str, list[str]] = {}
    for ann in ds.annotations():
        for label, box in zip(ann.labels, to_voc_pixels(ann.boxes)):
            files.setdefault(label, []).append(f"{ann.image_id} 0.9 " + " ".join(f"{v:.1f}" for v in box))
    det = tmp_path / "det"
    det.mkdir()
    for label, lines in files.items():
        (det / f"comp4_det_test_{label}.txt").write_text("\n".join(lines) + "\n")
    for metric in ("voc07", "voc10"):
        out_json = tmp_path / f"{metric}.json"
        code, out, _ = run(
            [
                "evaluate",
                "--data",
                str(tiny_voc),
                "--split",
                "test",
                "--detections",
                str(det),
                "--metric",
                metric,
                "--json",
                str(out_json),
            ],
            capsys,
        )
        assert code == 0 and "mAP" in out
        result = json.loads(out_json.read_text())
        assert result["metric"] == metric and result["mAP"] == pytest.approx(1.0)
        assert set(result["per_class"]) == set(ds.classes())
    # A class without test objects (here one that no image has) scores n/a, as the devkit does, and stays out
    # of the mean; --classes states the list, and a file outside it is refused.
    (det / "comp4_det_test_hexagon.txt").write_text("000001 0.5 1 2 30 40\n")
    code, out, err = run(["evaluate", "--data", str(tiny_voc), "--detections", str(det), "--json", str(out_json)], capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["per_class"]["hexagon"] is None and result["mAP"] == pytest.approx(1.0)
    hexagon = next(line for line in out.splitlines() if line.strip().startswith("hexagon"))
    assert hexagon.split() == ["hexagon", "n/a", "0", "1"]
    one = sorted(files)[0]
    code, out, err = run(
        [
            "evaluate",
            "--data",
            str(tiny_voc),
            "--detections",
            str(det / f"comp4_det_test_{one}.txt"),
            "--classes",
            one,
            "--json",
            str(out_json),
        ],
        capsys,
    )
    assert code == 0 and list(json.loads(out_json.read_text())["per_class"]) == [one]
    code, _, err = run(["evaluate", "--data", str(tiny_voc), "--detections", str(det), "--classes", one], capsys)
    assert_one_line_error(code, err, "is not one of the classes scored", 1)
    (det / "comp4_det_test_hexagon.txt").unlink()

    bad = det / f"comp4_det_test_{next(iter(files))}.txt"
    bad.write_text("000001 0.5 1 2 3\n")
    code, _, err = run(["evaluate", "--data", str(tiny_voc), "--detections", str(det)], capsys)
    assert_one_line_error(code, err, "line 1", 1)
