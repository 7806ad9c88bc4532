"""When `rcnn compare` may subtract two runs' numbers: mAPs over the same classes of the same test data, and
speed ratios taken under a similar load on the machine. Runs are written as manifests by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rcnn.report import seeds as report_seeds
from rcnn.report.runs import load_run, others_load
from rcnn.report.speed import ratio
from rcnn.report.study import write_report
from rcnn.store.artifacts import file_digest, write_json_atomic

CELLS = {"Platelets": 0.30, "RBC": 0.70, "WBC": 0.90}


def _manifest(unit: Path, data_digest: str | None, classes, metrics: dict, timings: dict, outputs=(), cores: int = 2) -> None:
    unit.mkdir(parents=True, exist_ok=True)
    stage, split = unit.parent.name, unit.name
    write_json_atomic(
        unit / "manifest.json",
        {
            "manifest_schema": 1,
            "stage": stage,
            "split": split,
            "pipeline": unit.parent.parent.name,
            "fingerprint": "f",
            "data": {"root": str(unit.parents[3] / "data"), "split": split, "classes": list(classes)},
            "params": {},
            "inputs": {f"data/{split}": data_digest} if data_digest else {},
            "machine": {"cpu": "Xeon", "cores": cores, "gpu": None},
            "timings": {"started": 1.0, "wall_s": 60.0, **timings},
            "metrics": metrics,
            "outputs": {name: {"digest": file_digest(unit / name), "bytes": (unit / name).stat().st_size} for name in outputs},
        },
    )


def make_run(runs: Path, name: str, aps: dict[str, float], *, data: str = "D", proposals_data: str | None = None,
             load: float | None = None, features_s: float = 0.5, cache: int = 1000, split_ids: int = 4) -> Path:  # fmt: skip
    """A run with test proposals, features and evaluation: ``aps`` the AP of each class it scored, ``data`` the
    data fingerprint its units recorded (``proposals_data`` its proposals', if another), ``load`` the load average
    each test unit recorded (None: a manifest from before it was recorded)."""
    split_file = runs.parent / "data" / "ImageSets" / "Main" / "test.txt"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text("".join(f"{k:06d}\n" for k in range(split_ids)))
    timings = {} if load is None else {"cpu_s": 24.0, "children_cpu_s": 1.0, "load_1m_start": load, "load_1m_end": load}
    run = runs / name
    props = {"images": 9, "seconds_per_image_worker": 0.1}
    _manifest(run / "proposals" / "test", proposals_data or data, aps, props, timings)
    (run / "features" / "test").mkdir(parents=True, exist_ok=True)
    (run / "features" / "test" / "index.json").write_bytes(bytes(cache))
    feats = {"seconds_per_image": features_s, "compute_seconds_per_image": features_s}
    _manifest(run / "features" / "test", data, aps, feats, timings, outputs=["index.json"])
    results = {
        "metric": "voc07",
        "mAP": sum(aps.values()) / len(aps),
        "mAP_bbox": sum(aps.values()) / len(aps) + 0.01,
        "per_class": aps,
        "per_class_bbox": {c: ap + 0.01 for c, ap in aps.items()},
        "seconds_per_image_classify": 0.01,
    }
    evaluate = run / "evaluate" / "test"
    evaluate.mkdir(parents=True, exist_ok=True)
    (evaluate / "results.json").write_text(json.dumps(results))
    _manifest(evaluate, data, aps, results, timings, outputs=["results.json"])
    return run


def _report(tmp_path: Path, *runs: Path, seeds: list[list[Path]] | None = None) -> str:
    summaries = [load_run(r) for r in runs]
    groups = [[load_run(r) for r in group] for group in seeds] if seeds else None
    return write_report(summaries, tmp_path / "out", grid_images=0, seed_runs=groups)["markdown"].read_text()


def _row(markdown: str, first_cell: str, after: str = "") -> list[str]:
    lines = markdown.split(after, 1)[1].splitlines() if after else markdown.splitlines()
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r}")


def test_maps_over_different_classes_get_no_difference_only_per_class_ones_on_the_shared_classes(tmp_path):
    # `cells` scored three classes, `sub` two of them (data.other_classes: ignore): the report printed
    # "Δ vs cells +0.1328", the difference of two means over different classes, as an improvement.
    runs = tmp_path / "runs"
    cells = make_run(runs, "cells", CELLS)
    sub = make_run(runs, "sub", {"RBC": 0.75, "WBC": 0.90})
    md = _report(tmp_path, cells, sub)
    assert _row(md, "sub", "## Mean average precision")[3] == "n/a" and _row(md, "sub", "## Mean average precision")[5] == "n/a"
    assert (
        "**The mAPs average different classes, cells's over 3, sub's over 2 (without Platelets): they are not like for "
        "like, so no difference is given; the per-class differences below cover the classes both scored.**"
    ) in md
    per_class = md.split("## Average precision per class", 1)[1]
    assert _row(per_class, "Platelets")[3:] == ["-", "-"]  # sub did not score it
    deltas = per_class.split("on the classes both runs scored", 1)[1]
    assert _row(deltas, "RBC")[1:] == ["+0.0500", "+0.0500"] and _row(deltas, "WBC")[1:] == ["+0.0000", "+0.0000"]
    assert _row(deltas, "**mean over the classes both scored**")[1:] == ["**+0.0250**", "**+0.0250**"]
    with pytest.raises(AssertionError):
        _row(deltas, "Platelets")
    # The same classes, listed in another order, average the same APs: the difference is given.
    same = make_run(runs, "same", dict(reversed(list({**CELLS, "RBC": 0.75}.items()))))
    md = _report(tmp_path, cells, same)
    assert _row(md, "same", "## Mean average precision")[3] == f"{0.05 / 3:+.4f}" and "different classes" not in md


def test_seed_runs_over_other_classes_are_not_pooled_nor_differenced(tmp_path):
    runs = tmp_path / "runs"
    cells = [make_run(runs, f"cells@seed{k}", CELLS) for k in (0, 1)]
    subs = [make_run(runs, "sub@seed0", {"RBC": 0.75, "WBC": 0.90}), make_run(runs, "sub@seed1", CELLS)]
    md = _report(tmp_path, cells[0], subs[0], seeds=[cells, subs])
    assert "**Left out of the means, as not like for like with their group: `sub@seed1` (its mAP averages other " in md
    assert "classes than `sub@seed0`'s (with Platelets))." in md
    row = _row(md, "sub@seed0", "## Mean average precision over seeds")
    assert row[1:3] == ["seed 0", "1"] and row[5] == "n/a" and row[8] == "n/a"
    assert "**The mAPs average different classes, cells@seed0's over 3, sub@seed0's over 2 (without Platelets): " in md
    group = [load_run(r) for r in subs]
    left_out: list[str] = []
    assert report_seeds.poolable(group, left_out) == group[:1] and len(left_out) == 1


def test_the_data_a_run_was_tested_on_is_what_its_evaluation_read(tmp_path):
    # `rcnn proposals sub --set data.root=OTHER` rebuilt only sub's proposals from another folder; its evaluation
    # read the same data as cells', yet the report said "tested on different data" and gave no difference.
    runs = tmp_path / "runs"
    cells = make_run(runs, "cells", CELLS)
    sub = make_run(runs, "sub", {**CELLS, "RBC": 0.75}, proposals_data="OTHER")
    summary = load_run(sub)
    assert summary.test_data == "D" == load_run(cells).test_data
    assert summary.test_images == 4  # the split file's, not the count of the proposals made from the other folder
    md = _report(tmp_path, cells, sub)
    assert "tested on different data" not in md and _row(md, "sub", "## Mean average precision")[3] == f"{0.05 / 3:+.4f}"
    # An evaluation whose manifest lacks the data input: the proposals' record stands for it, as before.
    other = make_run(runs, "older", CELLS, data="", proposals_data="OTHER")
    assert load_run(other).test_data == "OTHER"
    assert "**The runs were tested on different data or splits" in _report(tmp_path, cells, other)


def test_speed_ratios_within_five_percent_are_about_the_same():
    assert ratio(1.0, 1.0 / 0.978, "smaller", "larger") == "about the same"  # was "1.0x smaller"
    assert ratio(1.0, 0.95) == ratio(1.0, 1.05) == "about the same"
    assert ratio(1.0, 0.94) == "1.1x faster" and ratio(1.0, 1.06) == "1.1x slower" and ratio(0.9, 9.8) == "10.9x slower"
    assert ratio(None, 1.0) is None and ratio(1.0, 0.0) is None


def test_ratios_taken_under_different_loads_are_warned_about(tmp_path):
    # A rerun of identical settings took 9.8 s, not 0.9 s, as another user loaded the machine; the report said
    # "features 10.9x slower". Each manifest now records the load average and the processor time.
    runs = tmp_path / "runs"
    quiet = make_run(runs, "quiet", CELLS, load=0.4, features_s=0.9, cache=1000)
    busy = make_run(runs, "busy", CELLS, load=9.8, features_s=9.8, cache=978)
    md = _report(tmp_path, quiet, busy)
    assert (
        "What else kept the machine busy while the test split was timed, in cores (the stages table's load), the "
        "highest over the test-split stages after the proposals: quiet: 0.00 (in features/test, on 2 cores); busy: "
        "9.40 (in features/test, on 2 cores)."
    ) in md  # each stage kept 0.4 cores busy itself (24 s of processor time in 60 s)
    assert (
        "**The speed ratios measure the machine's load too: other work kept about 9.4 cores of the machine's 2 busy "
        "while busy's test split was timed; what else ran differs between the runs (0.0 against 9.4 cores). Time the "
        "runs on an idle machine.**"
    ) in md
    assert "- busy's feature cache is about the same size as quiet's (within ±5%)." in md
    stage = _row(md, "busy", "## Stages: wall time and throughput")
    assert stage[1:6] == ["proposals", "test", "60.0", "24.0", "9.40"]  # wall, CPU (its own process), others' load
    # Others' load under half the cores: no warning; features within 5%: about as fast.
    again = make_run(runs, "again", CELLS, load=0.9, features_s=0.92)
    md = _report(tmp_path, quiet, again)
    assert "**The speed ratios measure" not in md and "- again features about as fast as quiet (within ±5%)." in md


def test_stages_too_short_for_the_load_average_warn_of_nothing(tmp_path):
    # The demo's test split: features 10 s and evaluation 1.9 s, just after stages that kept both cores busy. The
    # load average at their end still held those stages: 1.08 cores of "others" and a bold warning, on a quiet
    # machine.
    runs = tmp_path / "runs"
    run = make_run(runs, "demo", CELLS, load=2.09, features_s=0.1)
    for unit in (run / "features" / "test", run / "evaluate" / "test"):
        manifest = json.loads((unit / "manifest.json").read_text())
        manifest["timings"].update(wall_s=1.9, cpu_s=1.9)
        write_json_atomic(unit / "manifest.json", manifest)
    other = make_run(runs, "quiet", CELLS, load=0.4, features_s=0.1)
    md = _report(tmp_path, run, other)
    assert "demo: not known (every such stage took under 30 s); quiet: 0.00 (in features/test, on 2 cores)." in md
    assert "**The speed ratios measure" not in md
    assert _row(md, "demo", "## Stages: wall time and throughput")[1:6] == ["proposals", "test", "60.0", "24.0", "1.69"]
    stages = md.split("## Stages: wall time and throughput", 1)[1]
    features = next(line for line in stages.splitlines() if line.startswith("| demo | features | test |"))
    assert [c.strip() for c in features.split("|")[4:7]] == ["1.9", "1.9", ""]  # wall, CPU, no load to tell


def test_manifests_without_the_load_still_report_without_a_warning(tmp_path):
    runs = tmp_path / "runs"
    old, new = make_run(runs, "old", CELLS, features_s=0.9), make_run(runs, "new", CELLS, load=9.8, features_s=9.8)
    md = _report(tmp_path, old, new)
    assert "old: not recorded; new: 9.40 (in features/test, on 2 cores)." in md
    assert "differs between the runs" not in md  # one known load is nothing to compare; a high one is still said
    assert "other work kept about 9.4 cores of the machine's 2 busy while new's test split was timed" in md
    assert "- new features 10.9x slower than old." in md
    assert _row(md, "old", "## Stages: wall time and throughput")[4:6] == ["", ""]
    md = _report(tmp_path, old, make_run(runs, "old2", CELLS, features_s=0.9))
    assert "load average" not in md.split("## Test time per image", 1)[1]


def test_others_load_is_the_run_queue_over_the_unit_less_its_own_cores():
    assert others_load(60.0, 60.0, 3.0, 3.0) == pytest.approx(2.0)  # steady: 3 processes, one of them its own
    # An idle machine after a busy minute: a one-core stage of 60 s, the average falling from 2 towards 1. Its
    # end value alone less its own core read as 0.37 cores of others.
    kept = math.exp(-1.0)
    assert others_load(60.0, 60.0, 2.0, 2.0 * kept + 1.0 * (1 - kept)) == pytest.approx(0.0, abs=1e-9)
    # Another user's two cores over a 90 s stage of one core, on a machine that was idle before.
    kept = math.exp(-1.5)
    assert others_load(90.0, 90.0, 0.0, 3.0 * (1 - kept)) == pytest.approx(2.0)
    # The demo's evaluation: 1.9 s of one core just after its features kept both cores busy (load 2.09 at both
    # ends) read as 1.08 cores of others, and the report warned of a loaded machine. Too short to tell.
    assert others_load(1.9, 1.9, 2.09, 2.09) is None
    assert others_load(None, 60.0, 1.0, 1.0) is None and others_load(60.0, 60.0, None, 1.0) is None
