"""A Fast R-CNN pipeline end to end: its stages (no SVMs, no ridge regressors), its cache, a resumed fine-tuning,
evaluation from the network's outputs and `rcnn detect` giving the same detections."""

from __future__ import annotations

import json

import numpy as np
from conftest import interrupted_at_checkpoint, one_error_line, run_cli, write_pipelines

from rcnn.data.datasets import VOCDataset
from rcnn.store import records

FAST = """\
  tiny-fast:
    extends: tiny
    description: Fast R-CNN on the tiny data, network from tiny
    method: fast
    model:
      weights: pipeline:tiny
    fast:
      scales: [96]
      max_side: null
    finetune:
      bg_low: 0.1
      max_iter: 12
      eval_every: 4
"""


def test_fast_rcnn_runs_without_svms_and_detect_gives_evaluates_detections(tiny_voc, tmp_path, capsys):
    pipelines = write_pipelines(tmp_path / "pipelines.yaml", tiny_voc, FAST)
    common = ["--pipelines-file", str(pipelines), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    assert run_cli(["run", "tiny", *common], capsys)[0] == 0
    code, out, err = run_cli(["run", "tiny-fast", *common], capsys)
    assert code == 0, err
    assert "train-svm/" not in out and "train-bbox/" not in out and "evaluate/test: mAP" in out
    unit = tmp_path / "runs" / "tiny-fast"
    assert not (unit / "train-svm").exists() and not (unit / "train-bbox").exists()
    assert not (unit / "features" / "trainval").exists()  # nothing trains on features: the test split's alone
    manifest = json.loads((unit / "features" / "test" / "manifest.json").read_text())
    assert manifest["params"]["method"] == "fast" and manifest["params"]["layers"] == ["cls_logprob", "bbox_deltas"]
    results = json.loads((unit / "evaluate" / "test" / "results.json").read_text())
    assert 0.0 <= results["mAP"] <= 1.0 and 0.0 <= results["mAP_bbox"] <= 1.0

    # Each cached row: log-probabilities of the C + 1 classes, and 4 (C + 1) deltas.
    test_ids = VOCDataset(tiny_voc, "test").ids
    with records.RecordSet(unit / "features" / "test" / "index.json", "features") as rs:
        logprob = rs.array(test_ids[0], "cls_logprob", np.float16, 2).astype(np.float32)
        deltas = rs.array(test_ids[0], "bbox_deltas", np.float16, 2)
        classes = rs.array(test_ids[0], "overlaps", np.float32, 2).shape[1]
    assert logprob.shape[1] == classes + 1 and deltas.shape[1] == 4 * (classes + 1)
    assert np.allclose(np.exp(logprob).sum(1), 1, atol=5e-3)

    code, _, err = run_cli(["train-svm", "tiny-fast", *common], capsys)
    assert code == 2
    assert "stage 'train-svm' belongs to R-CNN and SPP-net pipelines; 'tiny-fast' is a Fast R-CNN pipeline" in one_error_line(err)

    # rcnn detect: the network's own scores and boxes, as evaluate computed them from the cache.
    image = tiny_voc / "JPEGImages" / f"{test_ids[0]}.jpg"
    code, _, err = run_cli(["detect", "tiny-fast", str(image), "--out", str(tmp_path / "det0"), *common[:-1]], capsys)
    assert code == 0, err
    # By default Fast R-CNN's boxes are drawn from a softmax probability of 0.8 (its demo.py), not the SVMs' 0.
    assert json.loads((tmp_path / "det0" / f"{image.stem}.json").read_text())["threshold"] == 0.8
    argv = ["detect", "tiny-fast", str(image), "--out", str(tmp_path / "det"), "--threshold", "0", *common[:-1]]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert_detect_found_the_best_devkit_detection(tmp_path / "det" / f"{image.stem}.json", unit, test_ids[0])


def assert_detect_found_the_best_devkit_detection(found_json, unit, image_id: str) -> None:
    """`rcnn detect`'s best detection of ``image_id`` is evaluate's best one in the devkit files of ``unit``."""
    found = json.loads(found_json.read_text())["detections"]
    lines = [
        line.split()
        for path in sorted((unit / "evaluate" / "test" / "detections-bbox").glob("*.txt"))
        for line in path.read_text().splitlines()
    ]
    mine = [(float(x[1]), [float(v) for v in x[2:]]) for x in lines if x[0] == image_id]
    assert found, "no detection above the default threshold"
    score, (xmin, ymin, xmax, ymax) = max(mine)
    assert abs(found[0]["score"] - score) <= 5e-7
    assert np.allclose(found[0]["box"], [xmin - 1, ymin - 1, xmax, ymax], atol=0.06)  # devkit files: 1-based pixels


def test_truncated_svd_recomputes_the_features_and_not_the_fine_tuning(tiny_voc, tmp_path, capsys):
    pipelines = write_pipelines(tmp_path / "pipelines.yaml", tiny_voc, FAST)
    common = ["--pipelines-file", str(pipelines), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    assert run_cli(["run", "tiny", *common, "--until", "finetune"], capsys)[0] == 0
    assert run_cli(["run", "tiny-fast", *common], capsys)[0] == 0
    unit = tmp_path / "runs" / "tiny-fast"
    model = (unit / "finetune" / "trainval" / "model.pt").read_bytes()
    plain = json.loads((unit / "evaluate" / "test" / "results.json").read_text())
    svd = ["--set", "fast.svd_fc6=4", "--set", "fast.svd_fc7=4"]
    code, out, err = run_cli(["run", "tiny-fast", *common, *svd], capsys)
    assert code == 0, err
    assert "finetune/trainval: up to date, skipped" in out and "features/test: up to date" not in out
    assert (unit / "finetune" / "trainval" / "model.pt").read_bytes() == model
    params = json.loads((unit / "features" / "test" / "manifest.json").read_text())["params"]
    assert params["svd_fc6"] == 4 and params["svd_fc7"] == 4
    compressed = json.loads((unit / "evaluate" / "test" / "results.json").read_text())
    # fc6 and fc7 at rank 4 of 32: other scores, so another AP, computed from the compressed network's outputs
    assert compressed["mAP"] != plain["mAP"]
    # rcnn detect compresses the network as stage features did
    image_id = VOCDataset(tiny_voc, "test").ids[0]
    image = tiny_voc / "JPEGImages" / f"{image_id}.jpg"
    argv = ["detect", "tiny-fast", str(image), "--out", str(tmp_path / "det"), "--threshold", "0", *svd, *common[:-1]]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert_detect_found_the_best_devkit_detection(tmp_path / "det" / f"{image_id}.json", unit, image_id)
    # configured without the SVD, the features are another configuration's
    code, out, _ = run_cli(["status", "tiny-fast", *common[:-1]], capsys)
    assert code == 0 and "parameter svd_fc6: 4 -> '<unset>'" in out


def test_an_interrupted_fast_rcnn_fine_tuning_resumes_to_the_same_network(tiny_voc, tmp_path, monkeypatch, capsys):
    from rcnn.stages import finetune

    pipelines = write_pipelines(tmp_path / "pipelines.yaml", tiny_voc, FAST)

    def argv(command: str, runs: str) -> list[str]:
        # two scales: each image's scale is drawn per step, and the resumed run must draw the same ones
        options = ["--pipelines-file", str(pipelines), "--runs-dir", str(tmp_path / runs), "--quiet"]
        return [command, "tiny-fast", *options, "--set", "fast.scales=[64,96]"]

    for runs in ("a", "b"):
        assert run_cli(["run", "tiny", *argv("run", runs)[2:-2], "--until", "finetune"], capsys)[0] == 0
        assert run_cli([*argv("run", runs), "--until", "proposals"], capsys)[0] == 0
    assert run_cli(argv("finetune", "a"), capsys)[0] == 0
    real = finetune.fine_tune
    monkeypatch.setattr(finetune, "fine_tune", interrupted_at_checkpoint(real, 8))
    assert run_cli(argv("finetune", "b"), capsys)[0] == 130
    monkeypatch.setattr(finetune, "fine_tune", real)
    code, out, err = run_cli(argv("finetune", "b"), capsys)
    assert code == 0 and "resuming from iteration 8" in out, err
    model = "tiny-fast/finetune/trainval/model.pt"
    assert (tmp_path / "a" / model).read_bytes() == (tmp_path / "b" / model).read_bytes()
