"""Property-based tests: box arithmetic, the VOC reader on generated XML, and the config loader."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rcnn.config import PipelineFile
from rcnn.data.datasets import parse_voc_xml
from rcnn.errors import ConfigError
from rcnn.structures.boxes import box_area, box_iou, clip_boxes, from_voc_pixels, mirror_boxes, to_voc_pixels

coord = st.floats(min_value=-50, max_value=500, allow_nan=False, width=32)


@st.composite
def boxes(draw):
    k = draw(st.integers(1, 6))
    out = []
    for _ in range(k):
        x1, y1 = draw(coord), draw(coord)
        w = draw(st.floats(min_value=0.5, max_value=300, width=32))
        h = draw(st.floats(min_value=0.5, max_value=300, width=32))
        out.append([x1, y1, x1 + w, y1 + h])
    return np.array(out, np.float64)


@settings(deadline=None)
@given(boxes(), boxes())
def test_iou_symmetric_and_bounded(a, b):
    ab, ba = box_iou(a, b), box_iou(b, a)
    np.testing.assert_allclose(ab, ba.T, atol=1e-12)
    assert ((ab >= 0) & (ab <= 1 + 1e-12)).all()
    np.testing.assert_allclose(np.diag(box_iou(a, a)), 1.0, atol=1e-9)


@settings(deadline=None)
@given(boxes(), st.floats(1, 400), st.floats(1, 400))
def test_clipping_stays_inside_and_never_grows(b, width, height):
    c = clip_boxes(b, width, height)
    assert (c[:, 0::2] >= 0).all() and (c[:, 0::2] <= np.float32(width)).all()
    assert (c[:, 1::2] >= 0).all() and (c[:, 1::2] <= np.float32(height)).all()
    assert (box_area(c) <= box_area(b.astype(np.float32)) + 1e-3).all()


def test_mirror_boxes_hand_case_and_round_trip():
    b = np.array([[0, 5, 10, 20], [90, 0, 100, 7]], np.float32)
    assert np.array_equal(mirror_boxes(b, 100), [[90, 5, 100, 20], [0, 0, 10, 7]])
    assert np.array_equal(mirror_boxes(mirror_boxes(b, 100), 100), b)


@given(
    st.lists(
        st.tuples(st.integers(1, 400), st.integers(1, 400), st.integers(0, 300), st.integers(0, 300)), min_size=1, max_size=5
    )
)
def test_voc_pixel_round_trip(rows):
    voc = np.array([[x, y, x + w, y + h] for x, y, w, h in rows], np.float64)
    np.testing.assert_array_equal(to_voc_pixels(from_voc_pixels(voc)), voc)
    # A 1-pixel VOC box (xmin == xmax) is 1 pixel wide in continuous coordinates.
    assert (from_voc_pixels(voc)[:, 2] - from_voc_pixels(voc)[:, 0] == voc[:, 2] - voc[:, 0] + 1).all()


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(10, 800),
    st.integers(10, 800),
    st.lists(st.tuples(names, st.booleans(), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)), max_size=6),
)
def test_voc_reader_on_generated_xml(width, height, objects):
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    expected = []
    for name, diff, a, b, c, d in objects:
        x1, x2 = sorted((1 + int(a * (width - 1)), 1 + int(c * (width - 1))))
        y1, y2 = sorted((1 + int(b * (height - 1)), 1 + int(d * (height - 1))))
        parts.append(
            f"<object><name>{name}</name><difficult>{int(diff)}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
        expected.append((name, diff, [x1 - 1, y1 - 1, x2, y2]))
    parts.append("</annotation>")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "a.xml"
        path.write_text("".join(parts))
        ann = parse_voc_xml(path, Path(d) / "a.jpg", "a")
    assert ann.labels == tuple(e[0] for e in expected)
    assert ann.difficult.tolist() == [e[1] for e in expected]
    np.testing.assert_array_equal(ann.boxes, np.array([e[2] for e in expected], np.float32).reshape(-1, 4))
    assert (ann.boxes[:, 2] <= width).all() and (ann.boxes[:, 3] <= height).all()


scalars = st.one_of(st.integers(-5, 5000), st.floats(-1, 1, allow_nan=False), st.text(max_size=5), st.booleans(), st.none())


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["mode", "min_size", "max_proposals", "seed", "n_jobs", "resize_width", "nonsense"]), scalars)
def test_config_loader_accepts_only_well_typed_values(key, value):
    import yaml

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.yaml"
        path.write_text(yaml.safe_dump({"pipelines": {"p": {"data": {"root": "voc"}, "proposals": {key: value}}}}))
        try:
            cfg = PipelineFile(path).load("p")
        except ConfigError as e:
            assert f"proposals.{key}" in str(e)
            return
    got = getattr(cfg.proposals, key)
    assert key != "nonsense"
    if key == "mode":
        assert got in ("fast", "opencv-fast", "opencv-quality", "single")
    elif key == "min_size":
        assert isinstance(got, float) and not isinstance(value, bool)
    else:
        assert (got is None and value is None) or (isinstance(got, int) and not isinstance(got, bool))
