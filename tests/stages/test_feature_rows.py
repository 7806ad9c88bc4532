"""`features.bbox_rows: regression`: R-CNN caches pool5 only for the rows box regression trains on and computes the
rest again when read; against a run of the same tiny pipeline that caches every row (`all`, R-CNN's cache)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli, write_pipelines

from rcnn.errors import UserError

ROWS = """\
  tiny-rows:
    extends: tiny
    description: tiny caching pool5 for box regression's rows only
    features:
      bbox_rows: regression
"""


@pytest.fixture(scope="module")
def runs(tiny_voc, tmp_path_factory):
    """Both pipelines run through every stage once: ``(pipelines file, runs folder)``."""
    from rcnn.cli import main

    folder = tmp_path_factory.mktemp("rows")
    pipelines = write_pipelines(folder / "pipelines.yaml", tiny_voc, ROWS)
    for name in ("tiny", "tiny-rows"):
        with pytest.raises(SystemExit) as e:
            main(["run", name, "--pipelines-file", str(pipelines), "--runs-dir", str(folder / "runs"), "--quiet"])
            raise SystemExit(0)
        assert not e.value.code
    return pipelines, folder / "runs"


def context(runs, name: str, *overrides: str):
    from rcnn.commands.shared import make_context

    return make_context(name, runs[1], overrides, str(runs[0]), quiet=True)


def oracle_rows(ann, best_gt, overlaps, classes, min_overlap) -> list[int]:
    """R-CNN appendix C's rows, one at a time: the best object is clean and overlapped by min_overlap in its class."""
    rows = []
    for r, g in enumerate(best_gt):
        if g >= 0 and not ann.difficult[g] and overlaps[r, classes.index(ann.labels[g])] >= min_overlap:
            rows.append(r)
    return rows


def test_regression_rows_cache_is_smaller_and_trains_and_detects_the_same(runs):
    from rcnn.stages import features

    every, rows = context(runs, "tiny"), context(runs, "tiny-rows")
    with features.load(every, "test") as full, features.load(rows, "test") as rs:
        for image_id in rs.ids:
            for name in ("pool5", "pool5_rows"):
                with pytest.raises(UserError, match=f"no '{name}'"):
                    rs.array(image_id, name)
            assert np.array_equal(rs.array(image_id, "fc7"), full.array(image_id, "fc7"))
    dataset = rows.dataset("trainval")
    kept = 0
    with features.load(every, "trainval") as full, features.load(rows, "trainval") as rs:
        for image_id in rs.ids:
            ann = dataset.annotation(image_id)
            best_gt, overlaps = rs.array(image_id, "best_gt"), rs.array(image_id, "overlaps")
            expected = oracle_rows(ann, best_gt, overlaps, rows.classes, rows.cfg.bbox.min_overlap)
            cached = rs.array(image_id, "pool5_rows", np.int32, 1)
            assert cached.tolist() == expected
            assert np.array_equal(rs.array(image_id, "pool5"), full.array(image_id, "pool5")[cached])
            assert np.array_equal(rs.array(image_id, "fc7"), full.array(image_id, "fc7"))
            kept += len(cached)
    assert kept > 0

    unit = lambda ctx, stage, split: ctx.unit_dir(stage, split) / "manifest.json"  # noqa: E731
    for split in ("trainval", "test"):
        m_all = json.loads(unit(every, "features", split).read_text())
        m_rows = json.loads(unit(rows, "features", split).read_text())
        size = lambda m: sum(o["bytes"] for o in m["outputs"].values())  # noqa: E731
        assert size(m_rows) < size(m_all)
        assert m_rows["metrics"]["mb_per_image"] == pytest.approx(size(m_rows) / m_rows["metrics"]["images"] / 2**20)
        assert m_rows["metrics"]["mb_per_image"] < m_all["metrics"]["mb_per_image"]
        assert m_rows["metrics"]["regression_rows"] == (kept if split == "trainval" else 0)
        assert m_all["metrics"]["regression_layer"] is None
        described = "pool5 of the" if split == "trainval" else "pool5 not cached"
        assert described in features.describe(m_rows) and "MiB/image" in features.describe(m_all)

    # Box regression reads only cached rows: the same examples, the same model, to the bit.
    model_all = np.load(every.unit_dir("train-bbox", "trainval") / "bbox.npz")
    model_rows = np.load(rows.unit_dir("train-bbox", "trainval") / "bbox.npz")
    assert sorted(model_all.files) == sorted(model_rows.files)
    for key in model_all.files:
        assert np.array_equal(model_all[key], model_rows[key]), key

    # Evaluation computes the test split's pool5 again: the SVM scores (fc7, cached alike) and the plain
    # detections are identical; refined boxes come from pool5 rows computed again, which here are the
    # cached float16 numbers exactly (same model, same crops on this CPU), so the APs agree to rounding.
    res_all = json.loads((every.unit_dir("evaluate", "test") / "results.json").read_text())
    res_rows = json.loads((rows.unit_dir("evaluate", "test") / "results.json").read_text())
    assert res_rows["mAP"] == res_all["mAP"]
    assert res_rows["mAP_bbox"] == pytest.approx(res_all["mAP_bbox"], abs=1e-6)
    assert res_rows["seconds_per_image_features"] > 0 and res_all["seconds_per_image_features"] == 0
    for name in rows.classes:
        for folder in ("detections", "detections-bbox"):
            a = (every.unit_dir("evaluate", "test") / folder).glob(f"*{name}*")
            b = (rows.unit_dir("evaluate", "test") / folder).glob(f"*{name}*")
            assert [p.read_text() for p in sorted(a)] == [p.read_text() for p in sorted(b)]


def test_setting_and_threshold_are_in_the_features_fingerprint(runs, capsys):
    common = ["--pipelines-file", str(runs[0]), "--runs-dir", str(runs[1])]
    code, out, _ = run_cli(["status", "tiny-rows", *common], capsys)
    assert code == 0 and "stale" not in out
    for change in ("bbox.min_overlap=0.5", "features.bbox_rows=all"):
        code, out, _ = run_cli(["status", "tiny-rows", "--set", change, *common], capsys)
        lines = [line for line in out.splitlines() if line.strip().startswith("features/")]
        assert len(lines) == 2 and all(" stale " in line for line in lines), (change, out)
    # An `all` cache holds every row whatever the threshold: only box regression's own stages go stale.
    code, out, _ = run_cli(["status", "tiny", "--set", "bbox.min_overlap=0.5", *common], capsys)
    assert all(" done " in line for line in out.splitlines() if line.strip().startswith("features/"))
    assert any(" stale " in line for line in out.splitlines() if line.strip().startswith("train-bbox/"))


def test_threshold_is_a_features_parameter_only_where_it_decides_the_cache(runs):
    from rcnn.stages import features

    params = features.params(context(runs, "tiny-rows"))
    assert (params["bbox_rows"], params["regression_layer"], params["bbox_min_overlap"]) == ("regression", "pool5", 0.6)
    # SPP-net never caches pool5, and a layer the SVMs read keeps every row: the threshold changes nothing there.
    for name, change in (("tiny-spp", "features.bbox_rows=regression"), ("tiny-rows", "bbox.layer=fc7")):
        params = features.params(context(runs, name, change))
        assert params["bbox_rows"] == "regression" and "bbox_min_overlap" not in params


def test_reader_reads_cached_rows_and_computes_the_rest(runs):
    from rcnn.stages import features

    every, rows = context(runs, "tiny"), context(runs, "tiny-rows")
    with (
        features.load(every, "trainval") as full,
        features.load(rows, "trainval") as rs,
        features.layer_reader(rows, "trainval", "pool5") as reader,
    ):
        image_id = next(i for i in rs.ids if 0 < len(rs.array(i, "pool5_rows")) < len(rs.array(i, "boxes")))
        boxes = rs.array(image_id, "boxes", np.float32, 2)
        cached = rs.array(image_id, "pool5_rows", np.int32, 1)
        reference = full.array(image_id, "pool5", np.float16, 2).astype(np.float32)

        got = reader.rows(rs, image_id, cached[::-1], boxes[cached[::-1]])  # any order
        assert np.array_equal(got, reference[cached[::-1]])
        assert reader.compute_seconds == 0.0 and reader.recomputed == 0 and reader.model is None  # never loaded

        every_row = np.arange(len(boxes))
        got = reader.rows(rs, image_id, every_row, boxes)
        assert reader.recomputed == len(boxes) - len(cached) and reader.compute_seconds > 0
        assert np.array_equal(got[cached], reference[cached])
        assert_matches_cache(got, reference)

    with (
        features.load(every, "test") as full,
        features.load(rows, "test") as rs,
        features.layer_reader(rows, "test", "pool5") as reader,
    ):
        image_id = rs.ids[0]
        proposal = rs.array(image_id, "gt_classes", np.int64, 1) < 0  # as evaluate asks: a mask
        boxes = rs.array(image_id, "boxes", np.float32, 2)[proposal]
        got = reader.rows(rs, image_id, proposal, boxes)
        assert reader.recomputed == int(proposal.sum())
        assert_matches_cache(got, full.array(image_id, "pool5", np.float16, 2)[proposal].astype(np.float32))


def assert_matches_cache(got: np.ndarray, cached: np.ndarray) -> None:
    """Rows computed again against the cached float16 rows of the same model and boxes: a batch of other
    crops may round a few values to the neighbouring float16 (a relative step of 2^-10 ~ 1e-3), no more."""
    assert got.shape == cached.shape
    np.testing.assert_allclose(got, cached, rtol=2e-3, atol=1e-3)


def test_a_stale_cache_is_not_mixed_with_rows_of_other_settings(runs):
    from rcnn.stages import features

    # context_pad changes the crops rows would be computed with; the cache was made with another one.
    ctx = context(runs, "tiny-rows", "finetune.context_pad=2")
    with pytest.raises(UserError, match=r"finetune/trainval .* is stale \(parameter finetune.context_pad: 3 -> 2\)"):
        features.layer_reader(ctx, "test", "pool5")


def test_thinning_computed_once_reads_the_rows_each_pass_used_to_thin(runs):
    """SPP-net's thinning of negatives, computed once before training (stages/train_svm.thinned_rows), gives
    every pass the rows that thinning each pass again gave."""
    from rcnn.learners.svm import ImageFeatures, thin_negatives
    from rcnn.stages import features, train_svm

    ctx = context(runs, "tiny")
    index = ctx.unit_dir(features.NAME, "trainval") / features.INDEX
    everything = list(train_svm.read_images(index, "fc7"))
    with features.load(ctx, "trainval") as rs:  # thinning each image as it is read: the oracle
        boxes = [rs.array(i, "boxes", np.float32, 2) for i in rs.ids]
    per_pass = []
    for image, b in zip(everything, boxes):
        rows = thin_negatives(b, image.gt_classes, 0.5)
        per_pass.append(ImageFeatures(image.features[rows], image.gt_classes[rows], image.overlaps[rows]))
    kept = train_svm.thinned_rows(ctx, index, 0.5, None)
    once = list(train_svm.read_images(index, "fc7", None, kept))
    assert len(per_pass) == len(once) == len(everything) > 0
    for a, b in zip(per_pass, once):
        assert np.array_equal(a.features, b.features) and np.array_equal(a.gt_classes, b.gt_classes)
        assert np.array_equal(a.overlaps, b.overlaps)
    assert sum(len(i.features) for i in once) < sum(len(i.features) for i in everything)  # thinning dropped rows


def test_rows_computed_again_are_made_as_the_features_stage_made_them(runs, tmp_path, monkeypatch):
    # model.precision and model.warp `auto` resolve per device: float32 and OpenCV crops on a CPU, bfloat16 and
    # the torch warp on a GPU. A unit made on a GPU and read here has its missing rows computed as the GPU made
    # its cached ones, not in this machine's way beside them.
    import shutil

    import torch

    from rcnn.stages import features, region_features

    shutil.copytree(runs[1], tmp_path / "runs")
    ctx = context((runs[0], tmp_path / "runs"), "tiny-rows")
    path = ctx.unit_dir("features", "test") / "manifest.json"
    manifest = json.loads(path.read_text())
    assert (manifest["metrics"]["precision"], manifest["metrics"]["warp"]) == ("float32", "opencv")
    made, real = [], region_features.region_features_later

    def spy(model, image, boxes, layers, pad, batch, warp, rows):
        made.append((next(model.parameters()).dtype, warp))
        return real(model, image, boxes, layers, pad, batch, warp, rows)

    monkeypatch.setattr(region_features, "region_features_later", spy)

    def pool5_again() -> np.ndarray:
        with features.load(ctx, "test") as rs, features.layer_reader(ctx, "test", "pool5") as reader:
            image_id = rs.ids[0]
            boxes = rs.array(image_id, "boxes", np.float32, 2)
            return reader.rows(rs, image_id, np.arange(len(boxes)), boxes)

    here = pool5_again()
    assert made == [(torch.float32, "opencv")]
    manifest["metrics"].update(precision="bfloat16", warp="torch")  # as a GPU records them
    path.write_text(json.dumps(manifest))
    as_gpu = pool5_again()
    assert made[-1] == (torch.bfloat16, "torch")
    # The same boxes through the same model: close, not equal (bfloat16 keeps 8 bits of mantissa).
    assert here.shape == as_gpu.shape and not np.array_equal(here, as_gpu)
    assert np.abs(here - as_gpu).max() <= 0.1 * np.abs(here).max()


def test_detect_computes_features_as_the_svms_were_trained_on(runs, tiny_voc, tmp_path, monkeypatch, capsys):
    # `rcnn detect` on another kind of machine than the one that trained the pipeline: model.precision and
    # model.warp `auto` resolve per device, and the SVMs were trained on features made the recorded way.
    import shutil

    import torch

    from rcnn.commands.detect import as_trained
    from rcnn.methods import rcnn_regions

    shutil.copytree(runs[1], tmp_path / "runs")
    ctx = context((runs[0], tmp_path / "runs"), "tiny")
    assert (ctx.cfg.model.precision, ctx.cfg.model.warp) == ("auto", "auto")
    assert (as_trained(ctx).model.precision, as_trained(ctx).model.warp) == ("float32", "opencv")  # as this CPU made them
    made, real = [], rcnn_regions.region_features

    def spy(model, image, boxes, layers, pad, batch, warp):
        made.append((next(model.parameters()).dtype, warp))
        return real(model, image, boxes, layers, pad, batch, warp)

    monkeypatch.setattr(rcnn_regions, "region_features", spy)
    image = sorted((tiny_voc / "JPEGImages").glob("*.jpg"))[0]
    argv = ["detect", "tiny", str(image), "--out", str(tmp_path / "det"), "--runs-dir", str(tmp_path / "runs")]

    def detect() -> dict:
        code, _, err = run_cli([*argv, "--threshold", "-9", "--pipelines-file", str(runs[0])], capsys)
        assert code == 0, err
        return json.loads((tmp_path / "det" / f"{image.stem}.json").read_text())

    here = detect()
    assert made == [(torch.float32, "opencv")]
    path = ctx.unit_dir("features", "trainval") / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["metrics"].update(precision="bfloat16", warp="torch")  # as a GPU records them
    path.write_text(json.dumps(manifest))
    as_gpu = detect()
    assert made[-1] == (torch.bfloat16, "torch")  # it was float32 and OpenCV: this machine's `auto`
    # The same proposals scored from features of the two precisions: close, not equal.
    top = [max(d["score"] for d in r["detections"]) for r in (here, as_gpu)]
    assert top[0] != top[1] and abs(top[0] - top[1]) < 0.1 * max(1.0, abs(top[0]))
