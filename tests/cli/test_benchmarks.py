"""benchmarks/run_all.py: one run measures every figure with its stock baseline and writes them as JSON;
the stock baselines' own geometry agrees with the library's. No timing is judged here."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rcnn.modeling.spp_geometry import image_scales, select_scale
from rcnn.modeling.warp import warp_geometry

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
MEASUREMENTS = {
    "rcnn_alexnet": "ms/image",
    "rcnn_squeezenet": "ms/image",
    "rcnn_alexnet_fc7": "ms/image",
    "spp_1_scale": "ms/image",
    "spp_5_scales": "ms/image",
    "spp_1_scale_fc7": "ms/image",
    "rcnn_alexnet_stream": "ms/image",
    "spp_1_scale_stream": "ms/image",
    "cache_rcnn": "MB/image",
    "cache_rcnn_regression": "MB/image",
    "cache_spp": "MB/image",
    "finetune_rcnn": "regions/s",
    "finetune_spp": "regions/s",
    "svm": "s",
}


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common
    import stock

    return common, stock


def run_all(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), *args], capture_output=True, text=True, timeout=600)


def test_run_all_measures_everything_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    done = run_all("--tiny", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    figures = report["measurements"]
    assert set(figures) == set(MEASUREMENTS)
    for name, fig in figures.items():
        assert fig["unit"] == MEASUREMENTS[name], name
        for key in ("ours", "stock", "ratio"):
            assert math.isfinite(fig[key]) and fig[key] > 0, (name, key, fig[key])
        # Above 1 means the library is better: stock / ours for costs, ours / stock for rates.
        expected = fig["stock"] / fig["ours"] if fig["lower"] else fig["ours"] / fig["stock"]
        assert fig["ratio"] == pytest.approx(expected), name
        assert fig["lower"] == (not name.startswith("finetune")), name
    # An uncompressed float32 cache of pool5 (9216) and fc7 (4096) holds at least 4 bytes per value per box.
    stock_mb = figures["cache_rcnn"]["stock"]
    assert stock_mb >= report["sizes"]["boxes"] * (9216 + 4096) * 4 / 2**20
    # fc7 of every box, float16, is in both R-CNN caches; pool5 only of the regression rows in the second one.
    rows = figures["cache_rcnn_regression"]["details"]["regression_rows"]
    boxes = report["sizes"]["boxes"]
    assert figures["cache_rcnn_regression"]["ours"] >= boxes * 4096 * 2 / 2**20
    assert figures["cache_rcnn_regression"]["ours"] < figures["cache_rcnn"]["ours"] - (boxes - rows) * 9216 * 2 / 2**20 * 0.9
    assert report["mode"] == "tiny" and report["device"] == "cpu" and report["images"] == report["sizes"]["images"]
    machine = report["machine"]
    for key in ("cpu", "cores", "python", "torch", "torchvision", "opencv", "numpy", "commit"):
        assert machine[key], key
    # The printed table: a row per measurement with its ratio, then the machine and versions.
    for title in ("R-CNN features, AlexNet", "SPP-net features, 5 scales", "fine-tuning, SPP-net (fc)", "SVMs"):
        assert title in done.stdout
    assert f"{figures['svm']['ratio']:.2f}x" in done.stdout
    assert "torchvision" in done.stdout and "random" in done.stdout
    # When and how busy: other work on the machine moves the figures; the precision of each side before the table.
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", report["date"]) and report["load_average_at_start"] >= 0
    assert "precision: ours float32, stock bfloat16 autocast (--precision bfloat16: both in bfloat16)" in done.stdout
    assert f"started {report['date']}, load average " in done.stdout
    assert "per-image figures: one timed round; fine-tuning: one timed step; SVMs: one timed fit" in done.stdout


def test_a_failing_measurement_keeps_the_others_and_fails_the_run(bench_modules, monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run_all as suite

    def broken(bench):
        raise RuntimeError("CUDA out of memory (as a GPU run might say)")

    monkeypatch.setitem(suite.MEASUREMENTS, "svm", broken)
    out = tmp_path / "bench.json"
    code = suite.main(["--tiny", "--only", "svm", "--only", "cache", "--json", str(out)])
    assert code == 1
    report = json.loads(out.read_text())
    assert report["complete"] is True
    assert set(report["measurements"]) == {"cache_rcnn", "cache_rcnn_regression", "cache_spp"}
    assert report["measurements"]["cache_spp"]["ours"] > 0
    assert report["failed"] == {"svm": "RuntimeError: CUDA out of memory (as a GPU run might say)"}
    printed = capsys.readouterr()
    assert "svm: failed" in printed.out and "Traceback" in printed.err


def test_the_json_is_written_after_every_measurement(bench_modules, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run_all as suite

    out = tmp_path / "bench.json"
    seen = []

    def stop_after_first(bench):  # what a run cut short by a time limit leaves behind
        seen.append(json.loads(out.read_text()))
        raise KeyboardInterrupt

    monkeypatch.setitem(suite.MEASUREMENTS, "svm", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        suite.main(["--tiny", "--only", "cache", "--only", "svm", "--json", str(out)])
    assert len(seen) == 1 and seen[0]["complete"] is False and "cache_spp" in seen[0]["measurements"]
    assert json.loads(out.read_text()) == seen[0]


def test_precision_sets_the_library_side(bench_modules, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import measures
    import run_all as suite

    seen = {}

    def look(bench):  # what the measurements build from the bench under --precision
        net = measures._rcnn_net(bench, "squeezenet1_0", 64, None)
        seen["weights"] = next(net.parameters()).dtype
        seen["stage"] = measures._context(bench, "rcnn", 2, 0.0).cfg.model.precision
        return {}

    monkeypatch.setitem(suite.MEASUREMENTS, "svm", look)
    out = tmp_path / "bench.json"
    assert suite.main(["--tiny", "--only", "svm", "--precision", "bfloat16", "--json", str(out)]) == 0
    assert seen == {"weights": torch.bfloat16, "stage": "bfloat16"}
    assert json.loads(out.read_text())["precision"]["ours"].startswith("model.precision bfloat16: bfloat16")
    assert suite.main(["--tiny", "--only", "svm", "--json", str(out)]) == 0  # auto: float32 on a CPU
    assert seen == {"weights": torch.float32, "stage": "auto"}
    assert json.loads(out.read_text())["precision"]["ours"] == "model.precision auto: float32"


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_the_library_side_is_timed_without_tf32_under_float32_as_the_stages_run_it(bench_modules, monkeypatch, tmp_path):
    # The stages run in strict_float32(precision == "float32"); the benchmarks timed the library with TF32 allowed.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import measures
    import run_all as suite

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default for convolutions
    seen = []

    def look(*_):
        seen.append(tf32_flags())
        return SimpleNamespace(arrays=dict)  # what _stream's start gives: a HostCopy

    images, boxes = [np.zeros((8, 8, 3), np.uint8)], [np.zeros((1, 4), np.float32)]
    for precision, ours in (("float32", (False, False)), ("auto", tf32_flags()), ("bfloat16", tf32_flags())):
        bench = measures.Bench(torch.device("cpu"), suite.TINY, tmp_path, [], images, boxes, (), tmp_path, precision=precision)
        seen.clear()
        measures._per_image(bench, look, look)
        measures._stream(bench, look, look)
        assert seen == [ours, tf32_flags(), ours, tf32_flags()], precision  # ours and stock, in turn
    assert tf32_flags() == (True, torch.backends.cuda.matmul.allow_tf32)


def test_bench_overlap_runs_the_stage_without_tf32_under_float32(bench_modules, monkeypatch, pipelines_file, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_overlap as script

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    seen = []

    def compute(ctx, split, work):
        work.mkdir(parents=True)
        seen.append(tf32_flags())
        return None, {"images_computed": 1}

    stage = SimpleNamespace(splits=lambda ctx: ("trainval", "test"), compute=compute)
    monkeypatch.setitem(script.STAGES, "convmaps", stage)
    argv = ["tiny", "--stage", "convmaps", "--repeats", "1", "--runs-dir", str(tmp_path), "--pipelines-file", str(pipelines_file)]
    assert script.main([*argv, "--set", "model.precision=float32"]) == 0
    assert seen == [(False, False)] * 2 and tf32_flags()[0]
    seen.clear()
    assert script.main(argv) == 0
    assert seen == [tf32_flags()] * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_without_a_gpu_is_one_line():
    done = run_all("--tiny", "--device", "cuda")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no CUDA GPU" in done.stderr


def test_data_without_the_split_is_one_line(tmp_path):
    done = run_all("--tiny", "--data", str(tmp_path), "--only", "svm")
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "trainval.txt" in done.stderr


@pytest.mark.parametrize(
    "script, args, code, needle",
    [
        ("bench_features.py", ["--rcnn", "nope"], 2, "unknown pipeline 'nope'"),
        ("bench_features.py", ["--set", "foo"], 2, "--set foo: expected key=value"),
        ("bench_proposals.py", ["--data", "{missing}"], 1, "no split file"),
        ("bench_cluster.py", ["--data", "{missing}"], 1, "no split file"),
        ("bench_spp_pool.py", ["--data", "{missing}"], 1, "no split file"),
        ("bench_spp_pool.py", ["--data", "{tiny_voc}", "--weights", "{missing}"], 1, "does not exist"),
        ("bench_overlap.py", ["nope"], 2, "unknown pipeline 'nope'"),
        ("profile_features.py", ["demo", "--set", "foo"], 2, "--set foo: expected key=value"),
        ("bench_fast_svd.py", ["demo"], 1, "'demo' is an R-CNN pipeline; truncated SVD is Fast R-CNN's"),
        ("bench_fast_svd.py", ["demo-fast", "--runs-dir", "{missing}"], 1, "no proposals of 'demo-fast'"),
    ],
)
def test_bad_input_to_a_benchmark_is_one_line(script, args, code, needle, tiny_voc, tmp_path):
    args = [a.format(missing=tmp_path / "missing", tiny_voc=tiny_voc) for a in args]
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == code and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith(f"{script}: ") and needle in done.stderr, done.stderr


def test_random_boxes_stay_inside_the_image(bench_modules):
    common, _ = bench_modules
    rng = np.random.default_rng(1)
    objects = np.array([[10, 20, 60, 90], [0, 0, 120, 30]], np.float32)
    boxes = common.random_boxes(rng, 120, 100, 500, objects)
    assert boxes.shape == (500, 4) and boxes.dtype == np.float32
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 100).all()
    assert (boxes[:, 2:] - boxes[:, :2] >= 1 - 1e-5).all()
    # Half are jittered objects: about half the boxes overlap one of them by IoU >= 0.5.
    from rcnn.structures.boxes import box_iou

    assert 0.3 < (box_iou(boxes, objects).max(axis=1) >= 0.5).mean() < 0.8


def test_alternate_times_each_function_repeats_times_after_one_warmup(bench_modules):
    common, _ = bench_modules
    calls = {"a": 0, "b": 0}
    fns = {k: (lambda k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls}
    medians = common.alternate(fns, 3, torch.device("cpu"), warmup=True)
    assert calls == {"a": 4, "b": 4}
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())


def test_stock_scales_and_context_match_the_library(bench_modules):
    _, stock = bench_modules
    rng = np.random.default_rng(2)
    for h, w in ((375, 500), (500, 333), (100, 2000)):
        for scales in ((688,), (480, 576, 688, 864, 1200)):
            assert stock.factors_of(h, w, scales, 2000) == pytest.approx(image_scales(h, w, scales, 2000))
    xy = rng.uniform(100, 300, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 150, (200, 2))], axis=1).astype(np.float32)
    factors = image_scales(375, 500, (480, 576, 688, 864, 1200))
    np.testing.assert_array_equal(stock.closest_scale(boxes, factors, 224), select_scale(boxes, factors, 224))
    # Boxes whose context stays inside the image: the library's sampled region is the stock's grown box.
    src, _ = warp_geometry(boxes, 10_000, 10_000, 227, 16)
    np.testing.assert_allclose(stock.with_context(boxes, 227, 16), src, rtol=1e-6, atol=1e-3)


def profile_features(*args) -> subprocess.CompletedProcess:
    script = BENCHMARKS / "profile_features.py"
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "pipeline, phases",
    [
        ("tiny", {"rcnn.decode", "rcnn.to_rgb", "rcnn.warp", "rcnn.cnn", "rcnn.to_host", "rcnn.write"}),
        ("tiny-spp", {"rcnn.decode", "rcnn.to_rgb", "rcnn.upload", "rcnn.conv", "rcnn.pool", "rcnn.fc", "rcnn.write"}),
    ],
)
def test_profile_features_times_each_phase_of_the_stage(pipeline, phases, pipelines_file, tmp_path, capsys):
    from conftest import run_cli

    runs = tmp_path / "runs"
    argv = ["proposals", pipeline, "--runs-dir", str(runs), "--pipelines-file", str(pipelines_file), "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    trace = tmp_path / "trace.json.gz"
    args = ["--images", 1, "--warmup", 1, "--runs-dir", runs, "--pipelines-file", pipelines_file, "--trace", trace]
    done = profile_features(pipeline, *args)
    assert done.returncode == 0, done.stderr
    table = {}
    for line in done.stdout.splitlines():
        if line.startswith("rcnn."):
            name, host, *_, calls = line.split()  # on a GPU, device times between them
            table[name] = (float(host), float(calls))
    assert phases <= set(table), done.stdout
    # One image: one decode and one record; the CNN ran at least once.
    assert table["rcnn.decode"][1] == 1 and table["rcnn.write"][1] >= 1
    assert all(host >= 0 for host, _ in table.values())
    assert "wall time:" in done.stdout and "Self CPU" in done.stdout
    import gzip

    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert {e.get("name") for e in events} >= phases


def test_phase_table_lists_each_range_once_from_its_cpu_row(bench_modules, monkeypatch):
    # On a GPU each record_function range has a second row, of device type CUDA: it was listed as another phase.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_features

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(key, device_type, host_us, device_us, count):
        return SimpleNamespace(key=key, device_type=device_type, cpu_time_total=host_us, device_time_total=device_us, count=count)

    events = [
        event("rcnn.cnn", cpu, 4000, 6000, 2),
        event("rcnn.cnn", cuda, 0, 8000, 2),
        event("rcnn.warp", cpu, 1000, 500, 4),
        event("aten::conv2d", cpu, 3000, 5000, 2),
    ]
    prof = SimpleNamespace(key_averages=lambda: events)
    lines = profile_features.phase_table(prof, 2, torch.device("cuda", 0)).splitlines()
    assert lines[0].split() == ["phase", "host", "ms/img", "device", "ms/img", "device", "span", "ms/img", "calls/img"]
    assert [line.split() for line in lines[2:]] == [
        ["rcnn.cnn", "2.00", "3.00", "4.00", "1.0"],
        ["rcnn.warp", "0.50", "0.25", "0.00", "2.0"],
    ]
    lines = profile_features.phase_table(prof, 2, torch.device("cpu")).splitlines()
    assert [line.split() for line in lines[2:]] == [["rcnn.cnn", "2.00", "1.0"], ["rcnn.warp", "0.50", "2.0"]]


def test_profile_features_without_proposals_is_one_line(pipelines_file, tmp_path):
    done = profile_features("tiny", "--runs-dir", tmp_path / "runs", "--pipelines-file", pipelines_file)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    # The command it gives computes them where the script looks, with the settings it was given.
    assert f"`rcnn proposals tiny --runs-dir {tmp_path / 'runs'} --pipelines-file {pipelines_file}` first" in done.stderr


def bench_overlap(*args) -> subprocess.CompletedProcess:
    script = BENCHMARKS / "bench_overlap.py"
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=600)


def test_bench_overlap_times_a_stage_both_ways_and_checks_the_bytes(pipelines_file, tmp_path, capsys):
    from conftest import TEST_DEVICE, run_cli

    from rcnn.modeling.models import device_for

    runs = tmp_path / "runs"
    argv = ["run", "tiny", "--until", "finetune", "--runs-dir", str(runs), "--pipelines-file", str(pipelines_file), "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    done = bench_overlap("tiny", "--split", "trainval", "--repeats", "2", "--runs-dir", runs, "--pipelines-file", pipelines_file)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"tiny (rcnn), stage features, split trainval: 4 images, device {device_for(TEST_DEVICE)}")
    for way in ("in turn", "overlapped"):
        (line,) = [x for x in lines if x.split(":")[0].strip() == way]
        assert len(line.split("rounds: ")[1].split(", ")) == 2  # one figure per round
    assert "same bytes written both ways: yes" in lines
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before  # the runs folder was only read


def test_bench_overlap_without_a_fine_tuned_model_is_one_line(pipelines_file, tmp_path):
    done = bench_overlap("tiny", "--runs-dir", tmp_path / "runs", "--pipelines-file", pipelines_file, "--set", "svm.C=0.01")
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    need = f"rcnn finetune tiny --runs-dir {tmp_path / 'runs'} --pipelines-file {pipelines_file} --set svm.C=0.01"
    assert f"`{need}` first" in done.stderr, done.stderr


def test_bench_spp_pool_checks_both_algorithms_agree_and_times_them(tiny_voc):
    script = BENCHMARKS / "bench_spp_pool.py"
    args = ["--data", tiny_voc, "--weights", "scratch", "--images", "1", "--repeats", "1"]
    done = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = [x for x in done.stdout.splitlines() if x.startswith("up to ")]
    assert len(lines) == 4 and all("roi_pool" in x and "table on float16 maps" in x for x in lines[:2]), done.stdout
    assert all("RoIs per image" in x and "x)" in x for x in lines[2:]) and "Fast R-CNN: conv maps at 600 px" in done.stdout


def test_bench_fast_svd_times_both_networks_and_compares_their_outputs(tiny_voc, tmp_path, capsys):
    from conftest import run_cli, write_pipelines

    fast = "  tiny-fast:\n    extends: tiny\n    method: fast\n    fast: {scales: [96], max_side: null}\n"
    fast += "    finetune: {max_iter: 4}"
    pipelines = write_pipelines(tmp_path / "pipelines.yaml", tiny_voc, fast)
    common = ["--runs-dir", str(tmp_path / "runs"), "--pipelines-file", str(pipelines)]
    code, _, err = run_cli(["run", "tiny-fast", "--until", "finetune", *common, "--quiet"], capsys)
    assert code == 0, err
    script = BENCHMARKS / "bench_fast_svd.py"
    argv = [sys.executable, str(script), "tiny-fast", "--images", "2", "--repeats", "1", *common]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # by default a quarter and a sixteenth of the fc layers' widths, as the paper's 1024 and 256 of VGG16's 4096
    layers = re.search(r"fc6 (\d+)x(\d+) at rank (\d+), fc7 (\d+)x(\d+) at rank (\d+)", done.stdout)
    assert layers, done.stdout
    _, fc6_out, fc6_rank, _, fc7_out, fc7_rank = map(int, layers.groups())
    assert (fc6_rank, fc7_rank) == (fc6_out // 4, fc7_out // 16)
    ratio = re.search(r"as trained / compressed: ([0-9.]+)x whole network", done.stdout)
    moved = re.search(r"moved by at most ([0-9.]+); best class unchanged for ([0-9.]+)% of (\d+) regions", done.stdout)
    assert ratio and moved, done.stdout
    assert 0 < float(moved.group(1)) <= 1 and 0 <= float(moved.group(2)) <= 100 and int(moved.group(3)) > 0
