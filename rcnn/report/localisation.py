"""The report's COCO AP section: how tightly each run's box-regressed detections fit, at IoU 0.50 to 0.95 (the VOC
mAP counts any box of IoU 0.5 as a hit, so two methods can tie there and differ in how well they localise)."""

from __future__ import annotations

from rcnn.errors import UserError
from rcnn.report.figures import TestData
from rcnn.report.render import Table
from rcnn.report.runs import RunSummary, fmt
from rcnn.report.seeds import spread

HEADING = "Localisation: COCO AP"


def _scored(label: str, data: TestData, k: int, run: RunSummary) -> dict | None:
    """COCOeval's figures of run ``k`` of ``data``, or None where it has no detections or test data to score."""
    from rcnn.evaluation.coco_metric import coco_evaluate

    dets, anns = data.detections(k), data.annotations(k)
    if dets is None or anns is None:
        return None
    try:
        return coco_evaluate(dets, anns, run.classes).stats
    except UserError as err:
        data.notes.append(f"{label}: cannot score its detections with COCO's AP ({err})")
        return None


def section_coco(
    labels: list[str], runs: list[RunSummary], data: TestData, seed_runs: list[list[RunSummary]] | None = None
) -> list:
    """The table of COCO's AP, AP50, AP75 and AP by box area of each run's box-regressed devkit files, computed by
    pycocotools against the run's test data (with ``seed_runs``, the mean ± sample standard deviation over each run's
    seed runs); a sentence instead where pycocotools is not installed."""
    from rcnn.evaluation.coco_metric import coco_api

    blocks: list = [("h2", HEADING)]
    try:
        coco_api()
    except UserError as err:
        return blocks + [("p", f"Not computed: {err}.")]
    groups: list[list[dict | None]] = []
    for r, (label, run) in enumerate(zip(labels, runs)):
        if seed_runs:
            group = TestData(seed_runs[r], [label] * len(seed_runs[r]))
            groups.append([_scored(label, group, k, member) for k, member in enumerate(seed_runs[r])])
            data.notes += group.notes
        else:
            groups.append([_scored(label, data, r, run)])
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    # COCO gives -1 where it has nothing to score (no objects of a size): no spread, n/a
    spreads = [{key: spread([s[key] if s and s[key] >= 0 else None for s in group]) for key in keys} for group in groups]
    base = runs[0]
    rows = []
    for label, run, sp in zip(labels, runs, spreads):
        alike = run.test_data == base.test_data and run.scored_classes == base.scored_classes
        diff = {}
        for key in ("AP", "AP75"):
            a, b = sp[key], spreads[0][key]
            diff[key] = "baseline" if run is base else f"{a.mean - b.mean:+.4f}" if a and b and alike else "n/a"
        cells = [
            "n/a" if sp[key] is None else sp[key].text() if seed_runs and key in keys[:3] else fmt(sp[key].mean) for key in keys
        ]
        rows.append([label, cells[0], diff["AP"], cells[1], cells[2], diff["AP75"], *cells[3:]])
    headers = ["run", "AP", f"Δ vs {labels[0]}", "AP50", "AP75", f"Δ vs {labels[0]}", "AP small", "AP medium", "AP large"]
    text = (
        "COCO's AP of each run's box-regressed detections, computed by pycocotools' COCOeval from the devkit files and "
        "the test data: AP averaged over IoU 0.50:0.05:0.95, AP50 and AP75 at one threshold each, and AP by box area "
        "(small up to 32², large from 96² pixels; n/a: no objects of that size), at most 100 detections per image and "
        "class. Objects "
        "marked difficult count neither way. An AP75 close to AP50 means boxes that fit tightly."
    )
    if seed_runs:
        text += " Over each run's seed runs: AP, AP50 and AP75 as mean ± sample standard deviation, the rest as means."
    blocks += [("p", text), ("table", Table(headers, rows))]
    absent = [label for label, group in zip(labels, groups) if any(s is None for s in group)]
    if absent:
        blocks.append(("p", f"No COCO AP for {', '.join(absent)} (see *What is missing*)."))
    return blocks
