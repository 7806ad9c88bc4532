"""Evaluate's detection pass keeps each image's detections as records: a run that dies midway resumes at the
first image without one, and ends with the bytes of an unbroken run."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli, write_pipelines

from rcnn.data.synth import generate_dataset
from rcnn.stages import evaluate


def _outputs(runs, split="test") -> dict:
    manifest = json.loads((runs / "tiny" / "evaluate" / split / "manifest.json").read_text())
    return {k: v["digest"] for k, v in manifest["outputs"].items() if k != evaluate.RESULTS}


def test_a_broken_evaluate_resumes_from_the_images_done(tmp_path, monkeypatch, capsys):
    generate_dataset(tmp_path / "voc", n_images=16, seed=2, size=96, test_fraction=0.5, progress=False)
    pipelines_file = write_pipelines(tmp_path / "p.yaml", tmp_path / "voc")
    runs = tmp_path / "runs"
    argv = ["--runs-dir", str(runs), "--pipelines-file", str(pipelines_file), "--quiet"]
    code, _, err = run_cli(["run", "tiny", *argv], capsys)
    assert code == 0, err
    reference = _outputs(runs)
    mAPs = json.loads((runs / "tiny" / "evaluate" / "test" / "manifest.json").read_text())["metrics"]
    shutil.rmtree(runs / "tiny" / "evaluate")

    # Parts of two images; the pass dies after its fourth image, two parts written.
    monkeypatch.setattr(evaluate, "PART_SIZE", 2)
    real = evaluate.image_records
    asked: list[list[str]] = []

    def dies_after_four(ctx, split, ids):
        asked.append(list(ids))
        for k, record in enumerate(real(ctx, split, ids)):
            if k == 4:
                raise RuntimeError("the machine went away")
            yield record

    monkeypatch.setattr(evaluate, "image_records", dies_after_four)
    with pytest.raises(RuntimeError, match="went away"):
        run_cli(["evaluate", "tiny", *argv], capsys)
    parts = runs / "tiny" / "evaluate" / "test" / ".work" / "parts"
    assert len(list(parts.glob("part-*.h5"))) == 2

    monkeypatch.setattr(evaluate, "image_records", lambda ctx, split, ids: (asked.append(list(ids)), real(ctx, split, ids))[1])
    code, out, err = run_cli(["evaluate", "tiny", *argv], capsys)
    assert code == 0, err
    every = asked[0]
    assert asked[1] == every[4:]  # only the images without a record were detected again
    assert f"resuming, 4 of {len(every)} images already done" in out
    assert _outputs(runs) == reference  # devkit files and curves: the unbroken run's bytes
    resumed = json.loads((runs / "tiny" / "evaluate" / "test" / "manifest.json").read_text())["metrics"]
    assert (resumed["mAP"], resumed["mAP_bbox"]) == (mAPs["mAP"], mAPs["mAP_bbox"])
