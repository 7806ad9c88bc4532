"""The comparison report: loading runs from manifests, the numbers in its tables, self-contained HTML."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from rcnn.data.datasets import VOCDataset
from rcnn.data.synth import SYNTH_CLASSES, generate_dataset
from rcnn.errors import UserError
from rcnn.evaluation.coco_metric import INSTALL, coco_evaluate
from rcnn.evaluation.detfiles import devkit_filename, read_devkit_file, write_devkit_file
from rcnn.evaluation.errors import false_positive_types, type_shares
from rcnn.report import figures
from rcnn.report.localisation import section_coco
from rcnn.report.runs import load_run
from rcnn.report.study import write_report
from rcnn.store.artifacts import file_digest, write_json_atomic

CLASSES = list(SYNTH_CLASSES)
RESULTS = {
    "rcnn": {"mAP": 0.61234, "mAP_bbox": 0.64567, "classify": 0.01, "features": 0.0},
    "spp": {"mAP": 0.58761, "mAP_bbox": 0.66012, "classify": 0.01, "features": 0.004},  # pyramid for box regression
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report-data") / "voc"
    generate_dataset(root, n_images=6, size=96, seed=1, progress=False)
    return root


def _unit(runs: Path, pipeline: str, stage: str, split: str, data_root: Path, *, wall_s: float, started: float,
          metrics: dict, outputs: dict[str, int | None] | None = None, reused_from: str | None = None,
          params: dict | None = None) -> Path:  # fmt: skip
    """A unit's manifest, and its outputs: ``size`` zero bytes each, or (None) the file already written there."""
    unit = runs / pipeline / stage / split
    unit.mkdir(parents=True, exist_ok=True)
    for name, size in (outputs or {}).items():
        if size is not None:
            (unit / name).write_bytes(bytes(size))
    manifest = {
        "manifest_schema": 1,
        "fingerprint": f"{pipeline}-{stage}-{split}",
        "stage": stage,
        "split": split,
        "pipeline": pipeline,
        "data": {"root": str(data_root), "split": split, "classes": CLASSES},
        "params": params or {},
        "inputs": {},
        "libraries": {"numpy": "2.0.0", "torch": "2.5.0"},
        "timings": {"started": started, "wall_s": wall_s},
        "metrics": metrics,
        "outputs": {name: {"digest": file_digest(unit / name), "bytes": (unit / name).stat().st_size} for name in outputs or {}},
    }
    if reused_from:
        manifest["reused_from"] = reused_from
    write_json_atomic(unit / "manifest.json", manifest)
    return unit


def _evaluate(runs: Path, pipeline: str, data_root: Path, seed: int) -> None:
    """An evaluate unit with hand-set results and devkit files holding jittered ground truth plus a false positive."""
    r = RESULTS[pipeline]
    results = {
        "metric": "voc07",
        "mAP": r["mAP"],
        "mAP_bbox": r["mAP_bbox"],
        "per_class": dict.fromkeys(CLASSES, r["mAP"]),
        "per_class_bbox": dict.fromkeys(CLASSES, r["mAP_bbox"]),
        "seconds_per_image_classify": r["classify"],
        "seconds_per_image_features": r["features"],
    }
    unit = runs / pipeline / "evaluate" / "test"
    unit.mkdir(parents=True, exist_ok=True)
    write_json_atomic(unit / "results.json", results)
    rng = np.random.default_rng(seed)
    anns = VOCDataset(data_root, "test").annotations()
    for folder in ("detections", "detections-bbox"):
        for name in CLASSES:
            ids, scores, boxes = [], [], []
            for ann in anns:
                for box, label in zip(ann.boxes, ann.labels):
                    if label == name:
                        ids.append(ann.image_id)
                        scores.append(rng.uniform(0.5, 1.0))
                        boxes.append(box + rng.normal(0, 1.5, 4))
                ids.append(ann.image_id)
                scores.append(rng.uniform(0.0, 0.7))
                boxes.append([5, 5, 30, 30])
            write_devkit_file(unit / folder / devkit_filename("test", name), ids, np.array(scores), np.array(boxes))
    _unit(runs, pipeline, "evaluate", "test", data_root, wall_s=2.0, started=50.0, metrics=results,
          outputs={"results.json": None})  # fmt: skip


def make_runs(runs: Path, data_root: Path) -> None:
    """Two runs: an R-CNN-like one and an SPP-like one (shared proposals, convmaps + features)."""
    for split, started in (("trainval", 0.0), ("test", 1.0)):
        metrics = {"images": 2, "images_per_s": 10.0, "seconds_per_image_worker": 0.1, "boxes_per_image": 100}
        _unit(
            runs,
            "rcnn",
            "proposals",
            split,
            data_root,
            wall_s=3.0,
            started=started,
            metrics=metrics,
            outputs={"proposals.h5": 100},
        )
        _unit(runs, "spp", "proposals", split, data_root, wall_s=3.0, started=started, metrics=metrics,
              outputs={"proposals.h5": 100}, reused_from=str(runs / "rcnn" / "proposals" / split))  # fmt: skip
    common = {"finetune": {"lr": 0.001, "mirror": True}, "classes": CLASSES}
    _unit(runs, "rcnn", "finetune", "trainval", data_root, wall_s=100.0, started=10.0, metrics={"device": "cpu", "val_acc": 0.9},
          params={"method": "rcnn", **common})  # fmt: skip
    _unit(runs, "spp", "finetune", "trainval", data_root, wall_s=80.0, started=10.0, metrics={"device": "cuda", "val_acc": 0.9},
          params={"method": "spp", **common, "spp": {"levels": [6, 3, 2, 1], "offset": "trunk", "max_side": None}})  # fmt: skip
    for split in ("trainval", "test"):
        feats = {"seconds_per_image": 0.5, "compute_seconds_per_image": 0.4, "boxes_per_s": 200.0, "device": "cpu"}
        _unit(runs, "rcnn", "features", split, data_root, wall_s=20.0, started=20.0, metrics=feats, outputs={"index.json": 4000})
        conv = {"seconds_per_image": 0.015, "compute_seconds_per_image": 0.012, "device": "cuda"}
        _unit(runs, "spp", "convmaps", split, data_root, wall_s=2.0, started=15.0, metrics=conv, outputs={"maps.h5": 300})
        pooled = {"seconds_per_image": 0.005, "compute_seconds_per_image": 0.004, "boxes_per_s": 20000.0, "device": "cuda"}
        _unit(runs, "spp", "features", split, data_root, wall_s=1.0, started=20.0, metrics=pooled, outputs={"index.json": 100})
    for pipeline in ("rcnn", "spp"):
        _unit(runs, pipeline, "train-svm", "trainval", data_root, wall_s=4.0, started=30.0, metrics={}, outputs={"svm.npz": 50})
        _unit(runs, pipeline, "train-bbox", "trainval", data_root, wall_s=1.0, started=40.0, metrics={}, outputs={"bbox.npz": 50})
    _evaluate(runs, "rcnn", data_root, seed=0)
    _evaluate(runs, "spp", data_root, seed=1)


@pytest.fixture(scope="module")
def report(tmp_path_factory, data_root):
    base = tmp_path_factory.mktemp("report")
    make_runs(base / "runs", data_root)
    runs = [load_run(base / "runs" / "rcnn"), load_run(base / "runs" / "spp")]
    paths = write_report(runs, base / "out", grid_images=2)
    return runs, paths


def _table_row(markdown: str, section: str, first_cell: str) -> list[str]:
    """The cells of the first table row starting with ``first_cell`` under the heading ``## section``."""
    after = markdown.split(f"\n## {section}\n", 1)[1]
    for line in after.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def test_load_run_reads_stages_in_pipeline_order(report):
    runs, _ = report
    rcnn, spp = runs
    assert [(u.stage, u.split) for u in spp.units][:2] == [("proposals", "trainval"), ("proposals", "test")]
    stages = list(dict.fromkeys(u.stage for u in spp.units))
    assert stages == ["proposals", "finetune", "convmaps", "features", "train-svm", "train-bbox", "evaluate"]
    assert spp.unit("proposals", "test").shared_with == "rcnn"
    assert rcnn.test_split == "test" and rcnn.missing == [] and spp.missing == []
    assert set(rcnn.detections_bbox) == set(CLASSES)
    assert spp.feature_cache()[0] == 2 * (300 + 100) and rcnn.feature_cache()[0] == 2 * 4000


def test_report_files_exist_and_html_is_self_contained(report):
    _, paths = report
    for key in ("markdown", "html", "ap_per_class", "pr_curves", "test_time", "detections", "false_positives"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    assert paths["pr_curves"].parent.name == "figures"
    page = paths["html"].read_text()
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) == 5 and all(s.startswith("data:image/png;base64,") for s in sources)


def test_map_table_holds_the_results(report):
    _, paths = report
    md = paths["markdown"].read_text()
    for pipeline, r in RESULTS.items():
        row = _table_row(md, "Mean average precision", pipeline)
        assert row[2] == f"{r['mAP']:.4f}" and row[4] == f"{r['mAP_bbox']:.4f}"
    spp = _table_row(md, "Mean average precision", "spp")
    assert spp[3] == f"{RESULTS['spp']['mAP'] - RESULTS['rcnn']['mAP']:+.4f}"
    assert spp[5] == f"{RESULTS['spp']['mAP_bbox'] - RESULTS['rcnn']['mAP_bbox']:+.4f}"


def test_speed_up_is_computed_from_the_timings(report):
    _, paths = report
    md = paths["markdown"].read_text()
    # features (computation only): R-CNN 0.4 s vs SPP 0.012 + 0.004 s in its stages; the 0.004 s the evaluation
    # spent pooling the pyramid for box regression again is shown apart, as a detector does not pay it.
    # Total: 0.1 + 0.4 + 0.01 vs 0.1 + 0.016 + 0.01.
    assert "spp features 25.0x faster than rcnn." in md
    assert f"spp in total {0.51 / 0.126:.1f}x faster than rcnn." in md
    row = _table_row(md, "Test time per image", "spp")
    assert row[2] == "0.0160 (convmaps + features)" and row[4] == "0.0040" and row[6] == "0.1260"
    assert _table_row(md, "Test time per image", "rcnn")[2] == "0.4000 (features)"
    assert _table_row(md, "Test time per image", "rcnn")[4] == "-"  # R-CNN reads box regression's pool5 from its cache
    # caching: what the stages spent beyond the computation, 0.1 s and 0.003 + 0.001 s
    assert _table_row(md, "Test time per image", "rcnn")[3] == "0.1000"
    assert _table_row(md, "Test time per image", "spp")[3] == "0.0040"
    assert "shared with rcnn" in md
    assert "spp's feature cache is 10.0x smaller than rcnn's." in md


def test_missing_evaluate_is_reported_and_the_report_still_written(tmp_path, data_root):
    make_runs(tmp_path / "runs", data_root)
    shutil.copytree(tmp_path / "runs" / "spp", tmp_path / "runs" / "demo-spp")
    shutil.rmtree(tmp_path / "runs" / "demo-spp" / "evaluate")
    run = load_run(tmp_path / "runs" / "demo-spp")
    sentence = "evaluate/test has not run: run `rcnn evaluate demo-spp`"
    assert run.missing == [sentence]
    assert run.results is None and run.detections_bbox == {}
    paths = write_report([load_run(tmp_path / "runs" / "rcnn"), run], tmp_path / "out", grid_images=1)
    md = paths["markdown"].read_text()
    assert "## What is missing" in md and f"demo-spp: {sentence}" in md
    assert _table_row(md, "Mean average precision", "demo-spp")[2] == "n/a"
    assert paths["html"].is_file()


def test_unfinished_feature_stage_leaves_no_feature_time(tmp_path, data_root):
    # convmaps alone would make SPP look faster than it is.
    make_runs(tmp_path / "runs", data_root)
    (tmp_path / "runs" / "spp" / "features" / "test" / "manifest.json").unlink()
    (tmp_path / "runs" / "spp" / "features" / "test" / ".work").mkdir()
    run = load_run(tmp_path / "runs" / "spp")
    assert run.missing == ["features/test has not finished (work in progress or interrupted): run `rcnn features spp`"]
    assert run.test_time().features is None and run.test_time().total is None
    size, _, missing = run.feature_cache()
    assert size == 300 + 300 + 100 and [(u.stage, u.split) for u in missing] == [("features", "test")]


def test_feature_stage_without_timing_leaves_no_feature_time(tmp_path, data_root):
    # Manifests without the computation / caching split count the stages' whole time as features.
    make_runs(tmp_path / "runs", data_root)
    _unit(tmp_path / "runs", "spp", "convmaps", "test", data_root, wall_s=0.1, started=15.0, metrics={"seconds_per_image": 0.02})
    _unit(tmp_path / "runs", "spp", "features", "test", data_root, wall_s=0.1, started=20.0, metrics={"seconds_per_image": 0.01})
    old = load_run(tmp_path / "runs" / "spp").test_time()
    assert old.features == pytest.approx(0.03) and old.caching is None
    assert old.pooled_again == pytest.approx(RESULTS["spp"]["features"])
    # A fully resumed stage records seconds_per_image None: unknown, not zero.
    make_runs(tmp_path / "runs", data_root)
    _unit(tmp_path / "runs", "spp", "convmaps", "test", data_root, wall_s=0.1, started=15.0, metrics={"seconds_per_image": None})
    assert load_run(tmp_path / "runs" / "spp").test_time().features is None


def test_load_run_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty" / "proposals").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no manifest"):
        load_run(tmp_path / "empty")


def test_weights_input_is_not_taken_for_a_missing_stage(tmp_path):
    from rcnn.report.runs import load_run

    unit = tmp_path / "runs" / "p" / "finetune" / "trainval"
    unit.mkdir(parents=True)
    write_json_atomic(
        unit / "manifest.json",
        {
            "manifest_schema": 1,
            "stage": "finetune",
            "split": "trainval",
            "pipeline": "p",
            "fingerprint": "x",
            "params": {},
            "inputs": {"weights": "abc", "data/trainval": "d"},
            "outputs": {},
            "timings": {"wall_s": 1.0},
            "metrics": {},
        },
    )
    run = load_run(tmp_path / "runs" / "p")
    assert not any("weights" in m for m in run.missing)


def test_settings_that_differ_are_listed_in_pipeline_order(report):
    _, paths = report
    md = paths["markdown"].read_text()
    assert _table_row(md, "What was compared", "`finetune: method`")[1:] == ["rcnn", "spp"]
    assert _table_row(md, "What was compared", "`finetune: spp.levels`")[1:] == ["-", "[6, 3, 2, 1]"]
    assert _table_row(md, "What was compared", "`finetune: spp.max_side`")[1:] == ["-", "null"]
    # the same in both runs: not listed
    assert "finetune.lr" not in md and "finetune.mirror" not in md and "`finetune: classes`" not in md


def test_runs_with_the_same_settings_say_so(tmp_path, data_root):
    from rcnn.report.study import _settings, _Study

    make_runs(tmp_path / "runs", data_root)
    run = load_run(tmp_path / "runs" / "rcnn")
    study = _Study([run, load_run(tmp_path / "runs" / "rcnn")], tmp_path / "out")
    assert _settings(study) == [("p", "Every setting the stages recorded is the same in all runs.")]


# ----------------------------------------------------------------------------- figures: names and warnings


def _eval_result(names: list[str]):
    """Two classes' results: the first with a curve, the others without objects (no curve, an empty legend)."""
    from rcnn.evaluation.voc import ClassGroundTruth, Detections, evaluate

    box = np.array([[0, 0, 10, 10]], np.float32)
    gt = {n: ClassGroundTruth({"a": box[: int(k == 0)]}, {"a": np.zeros(int(k == 0), bool)}) for k, n in enumerate(names)}
    dets = {names[0]: Detections(("a",), np.array([0.9]), box)}
    result = evaluate(dets, gt)
    return {"plain": result, "bbox": result}


def _warnings_of(draw) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draw()
    return [str(w.message) for w in caught]


def test_figures_keep_font_and_legend_warnings_off_stderr(tmp_path):
    from rcnn.report import figures as figs
    from rcnn.stages.evaluate import plot_pr_curves

    # A class name in a script the default font lacks, and a class without a curve.
    names = ["猫", "dog"]
    evals = _eval_result(names)
    assert _warnings_of(lambda: plot_pr_curves(evals, tmp_path / "pr")) == []
    assert (tmp_path / "pr" / "猫.png").is_file() and (tmp_path / "pr" / "dog.png").is_file()
    aps = [{"plain": {"猫": 0.5, "dog": None, "mAP": 0.5}, "bbox": {}}]
    assert _warnings_of(lambda: figs.ap_bars(tmp_path / "ap.png", ["run"], names, aps, "voc07")) == []
    curves = [evals["bbox"].per_class]
    assert _warnings_of(lambda: figs.pr_grid(tmp_path / "pr.png", ["run"], names, curves)) == []


def test_a_figure_title_wider_than_its_figure_is_wrapped_to_fit():
    from rcnn.report import figures as figs

    # One run's column of detections is 3.5 inches wide; its title on one line was cut at both ends.
    title = "Top detections with box regression (ground truth dotted white)"

    def extent(set_title) -> tuple[float, float, float]:
        fig = figs.new_figure(figs.CELL_INCHES + 0.3, 3.0)
        set_title(fig)
        fig.canvas.draw()
        box = fig._suptitle.get_window_extent()
        return box.x0, box.x1, fig.bbox.width

    x0, x1, width = extent(lambda fig: fig.suptitle(title, fontsize=11))
    assert x0 < 0 and x1 > width  # the plain title overflows
    x0, x1, width = extent(lambda fig: figs._suptitle(fig, title))
    assert x0 >= 0 and x1 <= width
    wide = figs.new_figure(8.0, 3.0)
    figs._suptitle(wide, title)
    assert wide.get_suptitle() == title  # one line where it fits


def test_pr_plots_refuse_a_class_name_that_leaves_their_folder(tmp_path):
    from rcnn.stages.evaluate import plot_pr_curves

    # The dataset reader refuses such names first; this is the last line of defence.
    folder = tmp_path / "deep" / "pr"
    with pytest.raises(ValueError, match="cannot be a file name"):
        plot_pr_curves(_eval_result(["../../ESCAPED"]), folder)
    assert not list(tmp_path.rglob("ESCAPED*"))


def test_a_resumed_units_time_is_said_to_cover_only_its_share(tmp_path, data_root):
    make_runs(tmp_path / "runs", data_root)
    metrics = {"images": 10, "images_computed": 4, "seconds_per_image": 0.5}
    _unit(tmp_path / "runs", "rcnn", "features", "test", data_root, wall_s=2.0, started=20.0, metrics=metrics,
          outputs={"index.json": 4000})  # fmt: skip
    runs = [load_run(tmp_path / "runs" / "rcnn"), load_run(tmp_path / "runs" / "spp")]
    markdown = (write_report(runs, tmp_path / "out", grid_images=0)["markdown"]).read_text()
    stages = markdown.split("\n## Stages: wall time and throughput\n", 1)[1].split("\n## ", 1)[0]
    (row,) = [line for line in stages.splitlines() if line.startswith("| rcnn | features | test |")]
    assert row.rstrip(" |").endswith("resumed: the time of 4 of 10 images"), row
    assert "resumed" not in stages.replace(row, "")


def test_provenance_names_code_time_and_machine_and_warns_when_machines_differ(tmp_path, data_root):
    # Reports printed speed ratios of runs timed hours apart on unknown machines, with no commit, date or machine.
    import json
    import time

    make_runs(tmp_path / "runs", data_root)
    for pipeline, gpu in (("rcnn", None), ("spp", "NVIDIA H100")):
        for manifest in (tmp_path / "runs" / pipeline).glob("*/test/manifest.json"):
            m = json.loads(manifest.read_text())
            on_device = m["stage"] in ("convmaps", "features")  # only stages that ran on a device name a card
            m["machine"] = {"cpu": "Intel Xeon", "cores": 16, "gpu": gpu if on_device else None}
            m["code"] = {"version": "0.3.0", "digest": "0123456789abcdef" if m["stage"] == "evaluate" else "other"}
            write_json_atomic(manifest, m)
    runs = [load_run(tmp_path / "runs" / "rcnn"), load_run(tmp_path / "runs" / "spp")]
    md = write_report(runs, tmp_path / "out", grid_images=1)["markdown"].read_text()
    first = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(1.0))  # rcnn's test proposals started at 1.0 s
    assert f"| rcnn | 0.3.0 0123456789ab | {first} | Intel Xeon, 16 cores |" in md
    # spp's test proposals are rcnn's (shared), so its own timings start with its conv maps, at 15 s
    spp_first = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(15.0))
    assert f"| spp | 0.3.0 0123456789ab | {spp_first} | NVIDIA H100 (Intel Xeon, 16 cores) |" in md
    assert "**The runs were timed on different machines: the speed ratios compare the machines too.**" in md
    # One run on one GPU machine, its stages naming the card or not, is one machine.
    spp = load_run(tmp_path / "runs" / "spp")
    same = write_report([spp, spp], tmp_path / "out2", grid_images=1)["markdown"].read_text()
    assert "timed on different machines" not in same


def test_a_difference_is_not_computed_between_runs_scored_differently(tmp_path, data_root):
    import json

    make_runs(tmp_path / "runs", data_root)
    results = tmp_path / "runs" / "spp" / "evaluate" / "test" / "results.json"
    r = json.loads(results.read_text())
    r["metric"] = "voc10"
    results.write_text(json.dumps(r))
    manifest = results.parent / "manifest.json"
    m = json.loads(manifest.read_text())
    m["outputs"]["results.json"] = {"digest": file_digest(results), "bytes": results.stat().st_size}
    write_json_atomic(manifest, m)
    runs = [load_run(tmp_path / "runs" / "rcnn"), load_run(tmp_path / "runs" / "spp")]
    md = write_report(runs, tmp_path / "out", grid_images=1)["markdown"].read_text()
    row = _table_row(md, "Mean average precision", "spp")
    assert row[1] == "voc10" and row[3] == "n/a" and row[5] == "n/a"
    assert "**The runs use different AP metrics (voc07 / voc10): their mAPs are not comparable.**" in md


def test_coco_table_holds_pycocotools_numbers_of_the_box_regressed_files(report, data_root, monkeypatch):
    runs, paths = report
    md = paths["markdown"].read_text()
    truth = VOCDataset(data_root, "test", clip=True).annotations()
    stats = {}
    for run in runs:
        dets = {name: read_devkit_file(path) for name, path in run.detections_bbox.items()}
        stats[run.name] = s = coco_evaluate(dets, truth, run.classes).stats
        row = _table_row(md, "Localisation: COCO AP", run.name)
        assert row[1] == f"{s['AP']:.4f}" and row[3] == f"{s['AP50']:.4f}" and row[4] == f"{s['AP75']:.4f}", row
        assert row[6:] == [f"{s[k]:.4f}" if s[k] >= 0 else "n/a" for k in ("APs", "APm", "APl")]
    assert 0 < stats["rcnn"]["AP"] < stats["rcnn"]["AP50"]  # boxes jittered by 1.5 px miss the strictest thresholds
    spp = _table_row(md, "Localisation: COCO AP", "spp")
    assert (
        spp[2] == f"{stats['spp']['AP'] - stats['rcnn']['AP']:+.4f}"
        and spp[5] == f"{stats['spp']['AP75'] - stats['rcnn']['AP75']:+.4f}"
    )
    # Without pycocotools the section says how to get it, and the rest of the report is written as before.
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    blocks = section_coco(["rcnn", "spp"], runs, figures.TestData(runs, ["rcnn", "spp"]))
    assert blocks[1] == ("p", f"Not computed: {INSTALL}.")


def test_false_positive_table_holds_the_shares_of_each_variant(report, data_root):
    runs, paths = report
    md = paths["markdown"].read_text()
    truth = VOCDataset(data_root, "test", clip=True).annotations()
    section = md.split("## False positives by type")[1].split("\n## ")[0]
    for run in runs:
        for variant, files in (("without box regression", run.detections), ("with box regression", run.detections_bbox)):
            dets = {name: read_devkit_file(path) for name, path in files.items()}
            shares = type_shares(false_positive_types(dets, truth, run.classes), 1)
            cells = " | ".join(f"{100 * v:.1f} %" for v in shares)
            assert f"| {run.name} | {variant} | {cells} |" in section, (run.name, variant)
    assert "![false_positives](figures/false_positives.png)" in section
