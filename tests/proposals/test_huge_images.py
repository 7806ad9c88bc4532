"""Images over `proposals.max_pixels` are searched scaled down, in the proposals stage and in `rcnn detect`."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from conftest import run_cli

import rcnn.proposals.selective_search
from rcnn.config import PipelineFile, ProposalsConfig
from rcnn.data.datasets import VOCDataset, load_image
from rcnn.proposals.selective_search import image_seed, selective_search
from rcnn.store import records


class SearchStarted(Exception):
    pass


@pytest.fixture
def search_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The (height, width) each selective search is set up at; the search itself is not run."""
    seen = []

    def configure(ss, image, mode):
        seen.append(image.shape[:2])
        raise SearchStarted

    monkeypatch.setattr(rcnn.proposals.selective_search, "configure", configure)
    return seen


def test_stage_searches_an_image_just_over_the_limit_shrunk_and_says_so(pipelines_file, tiny_voc, tmp_path, capsys):
    # The tiny images are 96 x 96 = 9216 px; 9000 puts them just over: floor(96 sqrt(9000 / 9216)) = 94.
    runs = tmp_path / "runs"
    argv = ["proposals", "tiny", "--pipelines-file", str(pipelines_file), "--runs-dir", str(runs), "--quiet"]
    code, out, err = run_cli([*argv, "--set", "proposals.max_pixels=9000"], capsys)
    assert code == 0, err
    ds = VOCDataset(tiny_voc, "trainval")
    first = ds.ids[0]
    assert f"proposals/trainval: image {first} (96 x 96) is over proposals.max_pixels = 9000: searched at 94 x 94" in out
    assert out.count("is over proposals.max_pixels") == 6  # every image of both splits, one line each

    p = PipelineFile(pipelines_file).load("tiny").proposals
    with records.RecordFile(runs / "tiny" / "proposals" / "trainval" / "proposals.h5", "proposals") as f:
        stored = f.array(first, "boxes", np.float32, 2)
    # Oracle: the search on a 94 x 94 copy, its boxes scaled back by 96 / 94 by hand.
    small = cv2.resize(load_image(ds.annotation(first)), (94, 94), interpolation=cv2.INTER_LINEAR)
    boxes = selective_search(small, p.mode, None, 0.0, None, image_seed(p.seed, first)) * np.float32(96 / 94)
    expected = rcnn.proposals.selective_search.rank_filter(np.clip(boxes, 0, 96), p.min_size, p.max_proposals)
    np.testing.assert_array_equal(stored, expected)

    # Under the limit (the default): no line.
    code, out, err = run_cli([*argv, "--runs-dir", str(tmp_path / "full")], capsys)
    assert code == 0, err
    assert "max_pixels" not in out


def test_default_limit_applies_to_a_6000_px_image(tiny_voc, monkeypatch, search_sizes):
    from rcnn.stages import proposals

    ann = VOCDataset(tiny_voc, "trainval").annotation(VOCDataset(tiny_voc, "trainval").ids[0])
    monkeypatch.setattr(proposals, "load_image", lambda ann: np.zeros((6000, 6000, 3), np.uint8))
    threads = cv2.getNumThreads()
    try:
        with pytest.raises(SearchStarted):
            proposals._propose(ann, ProposalsConfig())
    finally:
        cv2.setNumThreads(threads)
    assert ProposalsConfig().max_pixels == 1_000_000
    assert search_sizes == [(1000, 1000)]


def test_detect_searches_under_the_pipelines_limit(pipelines_file, tmp_path, monkeypatch, search_sizes):
    from rcnn.commands.detect import build_detector
    from rcnn.modeling.models import build_model
    from rcnn.stages import train_svm
    from rcnn.stages.context import Context

    cfg = PipelineFile(pipelines_file).load("tiny", ["proposals.max_pixels=2304"])
    monkeypatch.setattr(train_svm, "load", lambda ctx: None)
    detector = build_detector(Context(cfg=cfg, runs_dir=tmp_path), cfg, build_model("tiny", 2, 32), ("a",), bbox=False)
    with pytest.raises(SearchStarted):
        detector(np.zeros((96, 96, 3), np.uint8))
    assert search_sizes == [(48, 48)]

    # A Detector built without a pipeline has the pipelines' default limit.
    defaults = {f.name: f.default for f in dataclasses.fields(type(detector))}
    assert defaults["max_pixels"] == ProposalsConfig().max_pixels
