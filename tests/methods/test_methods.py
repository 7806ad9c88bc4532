"""The detection method is one object chosen from the configuration; nothing else tests the method's name."""

from __future__ import annotations

import re
from pathlib import Path

from rcnn.stages import pipeline_stages
from rcnn.stages.methods import RCNN, FastRCNN, SPPNet, method_named

REPO = Path(__file__).resolve().parents[2]


def test_each_method_owns_its_stages_and_cached_layers():
    assert isinstance(method_named("rcnn"), RCNN) and isinstance(method_named("spp"), SPPNet)
    assert "convmaps" not in pipeline_stages("rcnn") and "convmaps" in pipeline_stages("spp")
    assert list(pipeline_stages("spp")).index("convmaps") < list(pipeline_stages("spp")).index("finetune")
    # SPP-net pools pool5 again from the conv maps when box regression needs it, so it never caches it.
    assert method_named("rcnn").cached_layers(("pool5", "fc7")) == ("pool5", "fc7")
    assert method_named("spp").cached_layers(("pool5", "fc7")) == ("fc7",)
    # Fast R-CNN's network scores and moves the boxes itself: no SVMs, no ridge regressors, its outputs cached.
    assert isinstance(method_named("fast"), FastRCNN)
    assert list(pipeline_stages("fast")) == ["proposals", "finetune", "features", "evaluate"]
    assert method_named("fast").cached_layers(("pool5", "fc7")) == ("cls_logprob", "bbox_deltas")


def test_only_the_method_builder_tests_the_methods_name():
    # "fast" is also selective search's mode (proposals.mode), compared where it is read.
    pattern = re.compile(
        r"""\bmethod\s*[!=]=|[!=]=\s*["'](spp|rcnn)["']|(?<!mode )[!=]=\s*["']fast["']|["'](spp|rcnn|fast)["']\s*[!=]="""
    )
    hits = []
    for folder in ("rcnn", "stages", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "methods.py" or path.is_symlink():
                continue
            hits += [
                f"{path.relative_to(REPO)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)
            ]
    hits += [f"cli.py:{i}" for i, line in enumerate((REPO / "cli.py").read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_regression_layer_is_box_regressions_own_layer_under_bbox_rows_regression():
    from dataclasses import replace

    from rcnn.config import BBoxConfig, FeaturesConfig, PipelineConfig

    cfg = PipelineConfig(name="x", features=FeaturesConfig(bbox_rows="regression"))
    assert method_named("rcnn").regression_layer(cfg) == "pool5"
    assert method_named("spp").regression_layer(cfg) is None  # never caches pool5 at all
    assert method_named("rcnn").regression_layer(replace(cfg, features=FeaturesConfig())) is None  # all: R-CNN's cache
    # The SVMs read every row of their layer: shared with box regression, it keeps every row.
    assert method_named("rcnn").regression_layer(replace(cfg, bbox=BBoxConfig(layer="fc7"))) is None
    assert method_named("rcnn").regression_layer(replace(cfg, bbox=BBoxConfig(layer="fc6"))) is None  # not cached
