"""Several seeds as one command: PIPELINE@seed<k> runs, `rcnn run --seeds`, and mean ± spread in the report.

The demo over three seeds is `rcnn run demo --seeds 0,1,2` then `rcnn compare demo --seeds 0,1,2 --out
report/`; the tests run the tiny pipeline of conftest.py over two seeds instead, to stay fast.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics

import pytest
from conftest import run_cli

from rcnn.config import PipelineFile
from rcnn.config.seeds import parse_seeds, seeded_name, split_seeded_name
from rcnn.errors import ConfigError
from rcnn.report.seeds import Spread, ap_spreads, seeds_table, spread


def test_spread_is_mean_and_sample_standard_deviation():
    values = [0.5, 0.7, 0.6]
    s = spread(values)
    assert s.n == 3 and s.mean == pytest.approx(0.6) and (s.low, s.high) == (0.5, 0.7)
    assert s.std == pytest.approx(0.1)  # by hand: sqrt((0.01 + 0.01 + 0) / (3 - 1))
    assert s.std == pytest.approx(statistics.stdev(values))
    assert s.text() == "0.6000 ± 0.1000" and s.range_text() == "0.5000–0.7000"
    one = spread([0.25])
    assert one.std is None and one.text() == "0.2500 (n = 1)"  # no spread from one seed, and it says so
    assert spread([0.5, None]) is None and spread([]) is None and spread([float("nan")]) is None
    assert Spread((1.0, 1.0)).std == 0.0


def test_ap_spreads_and_the_run_table():
    results = [
        {"mAP": 0.4, "mAP_bbox": 0.5, "per_class": {"a": 0.3, "b": 0.5, "c": None}, "per_class_bbox": {"a": 0.4, "b": 0.6}},
        {"mAP": 0.6, "mAP_bbox": 0.7, "per_class": {"a": 0.5, "b": 0.7, "c": None}, "per_class_bbox": {"a": 0.6, "b": 0.8}},
    ]
    sp = ap_spreads(results, ["a", "b", "c"])
    assert sp["plain"]["a"].mean == pytest.approx(0.4) and sp["bbox"]["b"].mean == pytest.approx(0.7)
    assert sp["plain"]["mAP"].std == pytest.approx(0.2 / 2**0.5)  # two values: |x1 - x2| / sqrt(2)
    assert sp["plain"]["c"] is None and sp["bbox"]["c"] is None  # scored n/a: no number made up
    text = seeds_table(["a", "b", "c"], [3, 7], results)
    assert "over 2 seeds (3, 7)" in text and "sample standard deviation" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[1:]}
    assert rows["3"] == ["0.4000", "0.5000"] and rows["7"] == ["0.6000", "0.7000"]
    assert rows["mAP"] == ["0.5000", "±", "0.1414", "0.6000", "±", "0.1414"] and rows["c"] == ["n/a", "n/a"]


def test_bad_seeds_are_one_line_before_any_work(pipelines_file, tmp_path, capsys):
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs")]
    for argv, needle in (
        (["run", "tiny", "--seeds", "0,0"], "--seeds 0,0: seed 0 is given twice"),
        (["run", "tiny", "--seeds", "one"], "'one' is not a seed"),
        (["run", "tiny@seed0", "--seeds", "1"], "'tiny@seed0' already names one seed; give the pipeline, tiny"),
        (["run", "tiny@seed1", "--set", "model.seed=2"], "pipeline 'tiny@seed1' has seed 1 by its name"),
        (["status", "--seeds", "1"], "--seeds: give the PIPELINE"),
    ):
        code, out, err = run_cli([*argv, *common], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "runs").exists()


def test_seeded_pipeline_names(pipelines_file, tmp_path):
    pf = PipelineFile(pipelines_file)
    base, seeded = pf.load("tiny"), pf.load("tiny@seed3")
    assert seeded.name == "tiny@seed3" and (seeded.finetune.seed, seeded.model.seed) == (3, 3)
    assert seeded.proposals == base.proposals and seeded.data == base.data and seeded.spp == base.spp
    assert pf.load("tiny@seed3", ["finetune.lr=0.01"]).finetune.lr == 0.01
    assert pf.origins("tiny@seed3")["finetune.seed"] == "name @seed3"
    assert seeded_name("voc07", 12) == "voc07@seed12" and split_seeded_name("voc07@seed12") == ("voc07", 12)
    assert split_seeded_name("a@b") == ("a@b", None) and split_seeded_name("x@seed01") == ("x@seed01", None)
    with pytest.raises(ConfigError, match="has seed 3 by its name"):
        pf.load("tiny@seed3", ["finetune.seed=4"])
    with pytest.raises(ConfigError, match="unknown pipeline 'nope'"):
        pf.load("nope@seed1")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipelines:\n  x@seed1: {}\n")
    with pytest.raises(ConfigError, match="NAME@seed<k> means pipeline NAME with seed k"):
        PipelineFile(bad)
    assert parse_seeds("0, 1,2") == (0, 1, 2)
    for text, needle in (
        ("0,0", "given twice"),
        ("1,a", "'a' is not a seed"),
        ("²", "not a seed"),
        ("01", "'01' is not"),
        ("-1", "'-1' is not a seed"),
        ("", "'' is not"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_seeds(text)


def _digest(path) -> str:
    return json.loads((path / "manifest.json").read_text())["outputs"]["model.pt"]["digest"]


def test_run_seeds_then_status_and_compare(pipelines_file, tmp_path, capsys):
    runs = tmp_path / "runs"
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(runs)]
    code, out, err = run_cli(["run", "tiny", "--seeds", "0,1", *common, "--quiet"], capsys)
    assert code == 0, err
    # One folder per seed; what no seed touches computed once and shared, the rest per seed.
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith("_")) == ["tiny@seed0", "tiny@seed1"]
    assert out.count("identical inputs and parameters to") == 2  # seed 1's proposals (trainval, test)
    seed0, seed1 = (runs / f"tiny@seed{k}" / "finetune" / "trainval" for k in (0, 1))
    params = [json.loads((u / "manifest.json").read_text())["params"] for u in (seed0, seed1)]
    assert [(p["finetune"]["seed"], p["model"]["seed"]) for p in params] == [(0, 0), (1, 1)]
    assert _digest(seed0) != _digest(seed1)  # the seeds trained different networks
    maps = [json.loads((runs / f"tiny@seed{k}" / "evaluate" / "test" / "results.json").read_text())["mAP"] for k in (0, 1)]
    printed = re.search(r"^  mAP +(\S+) ± (\S+)", out, re.M)
    assert printed, out
    assert float(printed.group(1)) == pytest.approx(statistics.mean(maps), abs=5e-5)
    assert float(printed.group(2)) == pytest.approx(statistics.stdev(maps), abs=5e-5)

    code, out, _ = run_cli(["run", "tiny", "--seeds", "0,1", *common, "--quiet"], capsys)
    assert code == 0 and out.count("up to date, skipped") == 16
    code, out, _ = run_cli(["status", *common], capsys)
    assert code == 0 and "tiny@seed0  (" in out and "tiny@seed1  (" in out and "stale" not in out
    code, out, _ = run_cli(["status", "tiny", "--seeds", "1", *common], capsys)
    assert code == 0 and "tiny@seed1  (" in out and "tiny@seed0" not in out and out.count(" done ") == 8

    # A twin pipeline over the same seeds reuses each seed's own units, never another seed's.
    code, out, err = run_cli(["run", "tiny-twin", "--seeds", "0,1", *common, "--quiet"], capsys)
    assert code == 0, err
    for k in (0, 1):
        twin = json.loads((runs / f"tiny-twin@seed{k}" / "finetune" / "trainval" / "manifest.json").read_text())
        assert twin["reused_from"].endswith(f"tiny@seed{k}/finetune/trainval")

    report = tmp_path / "report"
    code, out, err = run_cli(
        ["compare", "tiny", "tiny-twin", "--seeds", "0,1", "--out", str(report), "--runs-dir", str(runs)], capsys
    )
    assert code == 0, err
    md = (report / "report.md").read_text()
    s = spread(maps)
    row = next(line for line in md.splitlines() if line.startswith("| tiny | seed 0, seed 1 | 2 |"))
    assert f"| {s.text()} | {s.range_text()} | baseline |" in row
    twin_row = next(line for line in md.splitlines() if line.startswith("| tiny-twin | seed 0, seed 1 | 2 |"))
    assert f"| {s.text()} | {s.range_text()} | +0.0000 |" in twin_row
    assert f"| tiny | seed 1 | `{runs / 'tiny@seed1'}` | {maps[1]:.4f} |" in md
    assert f"| **mAP** | **{s.text()}** |" in md and (report / "figures" / "ap_per_class.png").stat().st_size > 1000
    # COCO's AP over the seeds: the mean ± spread of each seed run's own, as `rcnn evaluate --metric coco` scores it.
    coco = []
    for k in (0, 1):
        argv = ["evaluate", f"tiny@seed{k}", "--metric", "coco", "--json", str(tmp_path / f"coco{k}.json"), *common]
        code, _, err = run_cli([*argv, "--quiet"], capsys)
        assert code == 0, err
        coco.append(json.loads((tmp_path / f"coco{k}.json").read_text())["mAP_bbox"])
    localisation = md.split("## Localisation: COCO AP")[1].split("\n## ")[0]
    assert f"| tiny | {spread(coco).text()} | baseline |" in localisation and "| tiny-twin | " in localisation

    # A seed run scored with another metric is left out of the mean, and the report says so (it was pooled).
    code, _, err = run_cli(["evaluate", "tiny@seed1", "--set", "evaluate.metric=voc10", *common, "--quiet"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["compare", "tiny", "--seeds", "0,1", "--out", str(report), "--runs-dir", str(runs)], capsys)
    md = (report / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| tiny | seed 0 | 1 |"))
    assert f"| {maps[0]:.4f} (n = 1) |" in row
    assert "**Left out of the means, as not like for like with their group: `tiny@seed1` (scored with voc10, `tiny@seed0` " in md
    # Groups scored with different metrics get no difference, as single runs do.
    argv = ["compare", "tiny-twin", "tiny", "--seeds", "1", "--out", str(report), "--runs-dir", str(runs)]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    row = next(line for line in (report / "report.md").read_text().splitlines() if line.startswith("| tiny | seed 1 | 1 |"))
    assert row.count("| n/a |") == 2, row
    code, _, err = run_cli(["evaluate", "tiny@seed1", *common, "--quiet"], capsys)
    assert code == 0, err

    code, _, err = run_cli(["compare", "tiny", "--seeds", "0,2", "--out", str(report), "--runs-dir", str(runs)], capsys)
    assert code == 1 and "tiny@seed2' does not exist; `rcnn run tiny --seeds 0,2` makes it" in err

    # A later seed without results is said in the report too, not only on stderr (its table row reads n/a).
    shutil.rmtree(runs / "tiny@seed1" / "evaluate")
    code, _, err = run_cli(["compare", "tiny", "--seeds", "0,1", "--out", str(report), "--runs-dir", str(runs)], capsys)
    assert code == 0 and "tiny@seed1: evaluate/test has not run" in err, err
    missing = (report / "report.md").read_text().split("## What is missing")[-1]
    assert f"- tiny@seed1: evaluate/test has not run: run `rcnn evaluate tiny@seed1 --runs-dir {runs}`" in missing
