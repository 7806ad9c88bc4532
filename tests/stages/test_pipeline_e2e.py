"""An instant end-to-end R-CNN run on tiny synthetic data: every stage, skips, status, detect."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from rcnn.data.datasets import VOCDataset
from rcnn.evaluation.detfiles import read_detections
from rcnn.evaluation.errors import TYPES, false_positive_types, type_shares
from rcnn.evaluation.scoring import score_devkit_detections

run = run_cli


def test_run_every_stage_then_skip_then_detect(pipelines_file, tiny_voc, tmp_path, capsys):
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    code, out, err = run(["run", "tiny", *common], capsys)
    assert code == 0, err
    for stage in ("proposals", "finetune", "features", "train-svm", "train-bbox", "evaluate"):
        assert f"{stage}/" in out
    assert "mAP" in out

    unit = tmp_path / "runs" / "tiny" / "evaluate" / "test"
    results = json.loads((unit / "results.json").read_text())
    assert 0.0 <= results["mAP"] <= 1.0 and 0.0 <= results["mAP_bbox"] <= 1.0
    assert (unit / "pr" / "ap.png").stat().st_size > 1000
    # The written devkit files score the same as the stage reported: files and numbers agree.
    rescored = score_devkit_detections(tiny_voc, "test", unit / "detections", "voc07")
    assert rescored.mAP == pytest.approx(results["mAP"], abs=1e-6)

    code, out, _ = run(["run", "tiny", *common], capsys)
    assert code == 0 and out.count("up to date, skipped") == 8  # proposals 2, finetune 1, features 2, svm, bbox, evaluate
    code, out, _ = run(["status", "tiny", *common[:-1]], capsys)
    assert out.count(" done ") == 8 and "stale" not in out

    # `rcnn evaluate PIPELINE` is a stage command: a skip that prints the table, --force recomputes; --metric
    # scores the stage's devkit files again with another metric, leaving the stored evaluation; --json writes it.
    code, out, err = run(["evaluate", "tiny", *common], capsys)
    assert code == 0, err
    assert "evaluate/test: up to date, skipped" in out and f"{results['mAP']:>8.4f}" in out and "(voc07)" in out
    code, out, err = run(["evaluate", "tiny", "--force", *common], capsys)
    assert code == 0 and "evaluate/test: done in" in out and "up to date" not in out
    stored = (unit / "results.json").read_bytes()
    code, out, err = run(["evaluate", "tiny", "--metric", "voc10", "--json", str(tmp_path / "ap10.json"), *common], capsys)
    assert code == 0 and "evaluate/test: up to date, skipped" in out and "scored again" in out and "(voc10)" in out, err
    voc10 = json.loads((tmp_path / "ap10.json").read_text())
    assert voc10["metric"] == "voc10" and (unit / "results.json").read_bytes() == stored
    for key, folder in (("mAP", "detections"), ("mAP_bbox", "detections-bbox")):
        assert voc10[key] == pytest.approx(score_devkit_detections(tiny_voc, "test", unit / folder, "voc10").mAP)
    # COCO's AP of both variants from the same files, as `rcnn evaluate --data ... --metric coco` scores them.
    code, out, err = run(["evaluate", "tiny", "--metric", "coco", "--json", str(tmp_path / "coco.json"), *common], capsys)
    assert code == 0 and "scored again" in out and "(coco)" in out and "COCO with box regression: AP50 " in out, err
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert coco["metric"] == "coco" and (unit / "results.json").read_bytes() == stored
    for key, folder in (("mAP", "detections"), ("mAP_bbox", "detections-bbox")):
        code, _, err = run(["evaluate", "--data", str(tiny_voc), "--detections", str(unit / folder), "--metric", "coco",
                            "--json", str(tmp_path / f"{folder}.json")], capsys)  # fmt: skip
        assert code == 0 and coco[key] == json.loads((tmp_path / f"{folder}.json").read_text())["mAP"], err
    assert coco["stats"]["AP50"] >= coco["mAP"] > 0  # the stricter IoU thresholds only lower the mean
    # --errors: the false positives of both variants by type, as rcnn.evaluation.errors sorts the stage's files.
    code, out, err = run(["evaluate", "tiny", "--errors", "--json", str(tmp_path / "errors.json"), *common], capsys)
    assert code == 0 and "false positives with box regression by type (top-ranked" in out, err
    errors = json.loads((tmp_path / "errors.json").read_text())
    truth = VOCDataset(tiny_voc, "test").annotations()
    classes = tuple(sorted({name for split in ("trainval", "test") for name in VOCDataset(tiny_voc, split).classes()}))
    for key, folder in (("false_positives", "detections"), ("false_positives_bbox", "detections-bbox")):
        shares = type_shares(false_positive_types(read_detections(unit / folder, "test", classes), truth, classes), 1)
        assert [errors[key][name] for name in TYPES] == pytest.approx(shares.tolist()) and sum(shares) == pytest.approx(1)
    code, out, err = run(["evaluate", "--data", str(tiny_voc), "--detections", str(unit / "detections"), "--errors"], capsys)
    assert code == 0 and "  false positives by type (top-ranked, as many per class as it has objects): localisation " in out
    code, out, _ = run(["status", "tiny", *common[:-1]], capsys)
    assert out.count(" done ") == 8 and "stale" not in out
    # The pipeline's own metric is the stored table; voc07 files rescored give the same numbers.
    code, out, _ = run(["evaluate", "tiny", "--metric", "voc07", *common], capsys)
    assert code == 0 and "scored again" not in out and f"{results['mAP']:>8.4f}" in out
    code, _, err = run(["evaluate", "tiny", "--detections", str(unit / "detections"), *common], capsys)
    assert code == 2 and "--detections" in err and len(err.strip().splitlines()) == 1

    image = tiny_voc / "JPEGImages" / f"{VOCDataset(tiny_voc, 'test').ids[0]}.jpg"
    det = tmp_path / "det"
    code, out, err = run(["detect", "tiny", str(image), "--out", str(det), "--threshold", "-10", *common[:-1]], capsys)
    assert code == 0, err
    payload = json.loads((det / f"{image.stem}.json").read_text())
    assert payload["width"] == 96 and all(
        d["class"] in {"circle", "square", "triangle", "star", "cross"} for d in payload["detections"]
    )
    assert (det / f"{image.stem}.det.jpg").stat().st_size > 0

    # R-CNN's test-time caps: the best evaluate.top_per_set per test image on average, per class over the split,
    # in both variants' devkit files (here the default of 40 leaves every detection NMS kept: 26 per class).
    def lines(folder: str) -> dict[str, int]:
        return {f.name: len(f.read_text().splitlines()) for f in sorted((unit / folder).glob("*.txt"))}

    images = len(VOCDataset(tiny_voc, "test").ids)
    capped = {folder: lines(folder) for folder in ("detections", "detections-bbox")}
    for top_per_set, most in (("1", images), ("null", None)):
        code, _, err = run(["evaluate", "tiny", "--set", f"evaluate.top_per_set={top_per_set}", *common], capsys)
        assert code == 0, err
        for folder in ("detections", "detections-bbox"):
            counts = lines(folder)
            if most is not None:
                assert max(counts.values()) == most, counts  # every class has more candidates than that
            else:
                assert all(counts[c] >= capped[folder][c] for c in counts), (counts, capped)  # nothing left out


def assert_pooled_on_demand_matches_detector(pipelines_file, runs_dir):
    """SPP's pool5 read back for box regression equals what the test-time detector pools for the same boxes."""
    from rcnn.commands.shared import make_context
    from rcnn.methods.spp_regions import spp_region_features
    from rcnn.stages import convmaps, features, finetune

    ctx = make_context("tiny-spp", runs_dir, (), str(pipelines_file), quiet=True)
    model, _ = finetune.load(ctx)
    model.eval()
    with (
        features.load(ctx, "test") as rs,
        convmaps.load(ctx, "test") as maps,
        features.layer_reader(ctx, "test", "pool5") as layer,
    ):
        image_id = rs.ids[0]
        boxes = rs.array(image_id, "boxes", np.float32, 2)
        rows = np.arange(0, len(boxes), 2)
        conv, factors = convmaps.image_record(maps, image_id)
        expected = spp_region_features(model, conv, factors, boxes[rows], ("pool5", "fc7"), ctx.cfg.spp.target_size)
        got = layer.rows(rs, image_id, rows, boxes[rows])
        assert got.shape == expected["pool5"].shape and got.shape[1] > 0
        assert np.array_equal(got.astype(np.float16), expected["pool5"])
        # fc7 in the records came from the same pooled vectors
        np.testing.assert_allclose(rs.array(image_id, "fc7", np.float16, 2)[rows], expected["fc7"], rtol=1e-2, atol=1e-2)


def assert_mirror_maps_cached_for_fine_tuning_only(pipelines_file, runs_dir):
    """With finetune.mirror the trainval records also hold the flipped images' maps; the test records do not."""
    from rcnn.commands.shared import make_context
    from rcnn.data.datasets import load_image
    from rcnn.errors import UserError
    from rcnn.methods.spp_regions import image_maps
    from rcnn.stages import convmaps

    ctx = make_context("tiny-spp", runs_dir, (), str(pipelines_file), quiet=True)
    assert ctx.cfg.finetune.mirror
    model = convmaps.trunk_model(ctx)
    dataset = ctx.dataset("trainval")
    with convmaps.load(ctx, "trainval") as maps:
        image_id = dataset.ids[1]
        mirrored, factors = convmaps.image_record(maps, image_id, mirror=True)
        plain, _ = convmaps.image_record(maps, image_id)
        flipped = np.ascontiguousarray(load_image(dataset.annotation(image_id))[:, ::-1])
        expected = image_maps(model, flipped, factors)
        assert len(mirrored) == len(expected) == 1
        assert np.array_equal(mirrored[0], expected[0]) and not np.array_equal(mirrored[0], plain[0])
    with convmaps.load(ctx, "test") as maps, pytest.raises(UserError, match="no 'mirror0'"):
        convmaps.image_record(maps, ctx.dataset("test").ids[0], mirror=True)


def test_stage_before_its_input_is_one_line(pipelines_file, tmp_path, capsys):
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    code, _, err = run(["features", "tiny", *common], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    # The command it gives reaches this runs folder: a bare `rcnn proposals tiny` would compute in ./runs.
    assert f"has not run yet; run `rcnn proposals tiny --runs-dir {tmp_path / 'runs'}` first" in err


def test_spp_pipeline_shares_proposals_and_compares(pipelines_file, tiny_voc, tmp_path, capsys):
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    code, _, err = run(["run", "tiny", *common], capsys)
    assert code == 0, err
    code, out, err = run(["run", "tiny-spp", *common], capsys)
    assert code == 0, err
    assert out.count("reused its outputs") == 2  # both proposal splits come from `tiny`
    assert "convmaps/" in out and "mAP" in out
    spp_unit = tmp_path / "runs" / "tiny-spp"
    manifest = json.loads((spp_unit / "features" / "test" / "manifest.json").read_text())
    assert manifest["params"]["method"] == "spp"
    assert manifest["params"]["layers"] == ["fc7"]  # the pyramid is pooled again from the conv maps, not cached
    ft = json.loads((spp_unit / "finetune" / "trainval" / "manifest.json").read_text())["metrics"]
    assert 0 < ft["fc6_input_scale"] != 1.0  # fc6's input brought to unit RMS (spp.fc6_input_rms)
    model = json.loads((spp_unit / "finetune" / "trainval" / "model.pt.json").read_text())
    assert model["spec"]["offset"] == 3.0  # spp.offset: trunk, the tiny trunk's; every stage must map windows with it
    assert_pooled_on_demand_matches_detector(pipelines_file, tmp_path / "runs")
    assert_mirror_maps_cached_for_fine_tuning_only(pipelines_file, tmp_path / "runs")
    results = json.loads((spp_unit / "evaluate" / "test" / "results.json").read_text())
    assert 0.0 <= results["mAP_bbox"] <= 1.0

    image = tiny_voc / "JPEGImages" / f"{VOCDataset(tiny_voc, 'test').ids[0]}.jpg"
    code, _, err = run(["detect", "tiny-spp", str(image), "--out", str(tmp_path / "det"), *common[:-1]], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "det" / f"{image.stem}.json").read_text())["width"] == 96

    code, _, err = run(["convmaps", "tiny", *common], capsys)
    assert code == 2 and "belongs to SPP-net pipelines" in err

    report = tmp_path / "report"
    code, out, err = run(
        [
            "compare",
            "tiny",
            "tiny-spp",
            "--label",
            "R-CNN",
            "--label",
            "SPP-net",
            "--out",
            str(report),
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        capsys,
    )
    assert code == 0, err
    text = (report / "report.md").read_text()
    assert "R-CNN" in text and "SPP-net" in text and (report / "report.html").stat().st_size > 1000
    assert "| `finetune: method` | rcnn | spp |" in text and "| `finetune: finetune.bg_low` | 0.0 | 0.1 |" in text
