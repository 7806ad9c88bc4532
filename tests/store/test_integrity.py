"""Integrity of the artifact store: a stage is stale after a change to any of our modules it uses
(so a result is never reported from older code), and a damaged cached file is refused, not read."""

from __future__ import annotations

import importlib.util
import json
import pickle
import pkgutil
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli, write_pipelines

import rcnn
import rcnn.stages
from rcnn.config import PipelineFile
from rcnn.stages import STAGES, features, pipeline_stages, proposals
from rcnn.stages.context import Context
from rcnn.stages.provenance import upstream_check
from rcnn.stages.runner import run_stage, unit_status
from rcnn.store import artifacts as store
from rcnn.store import code_identity

PIPELINES = ("tiny", "tiny-spp")
FAST = ("finetune.max_iter=8",)
# Which stages read each stage's outputs (the pipeline's data flow, written out by hand).
READERS = {
    "proposals": ("finetune", "features"),
    "convmaps": ("finetune", "features"),
    "finetune": ("features",),
    "features": ("train-svm", "train-bbox", "evaluate"),
    "train-svm": ("evaluate",),
    "train-bbox": ("evaluate",),
    "evaluate": (),
}


def downstream(stage: str) -> set[str]:
    out = set()
    for reader in READERS[stage]:
        out |= {reader} | downstream(reader)
    return out


def context(pipelines_file: Path, runs: Path, name: str, **kw) -> Context:
    cfg = PipelineFile(pipelines_file).load(name, FAST)
    return Context(cfg=cfg, runs_dir=runs, progress=False, log=lambda line: None, **kw)


def module_files() -> dict[str, str]:
    """Source file -> module name, for every module of the package."""
    out = {}
    for pkg in (rcnn, rcnn.stages):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            out[str(Path(importlib.util.find_spec(info.name).origin).resolve())] = info.name
    return out


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tiny_voc):
    """Both tiny pipelines run once, recording for each stage the modules whose functions it ran."""
    tmp = tmp_path_factory.mktemp("traced")
    pf = write_pipelines(tmp / "pipelines.yaml", tiny_voc)
    runs = tmp / "runs"
    files = module_files()
    used: dict[tuple[str, str], set[str]] = {}
    for name in PIPELINES:
        ctx = context(pf, runs, name)
        for stage_name, stage in pipeline_stages(ctx.cfg.method).items():
            seen: set[str] = set()
            sys.setprofile(lambda frame, event, arg, seen=seen: seen.add(frame.f_code.co_filename) if event == "call" else None)
            try:
                run_stage(ctx, stage)
            finally:
                sys.setprofile(None)
            resolved = {str(Path(f).resolve()) for f in seen}
            used[name, stage_name] = {files[f] for f in resolved if f in files}
    return SimpleNamespace(pipelines=pf, runs=runs, used=used)


def copy_runs(traced, tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    shutil.copytree(traced.runs, runs)
    return runs


@pytest.fixture
def edit(monkeypatch):
    """``edit(module, ...)``: from then on the code identity reads those modules' sources with a line added."""
    edited: set[Path] = set()
    real = code_identity.read_source
    monkeypatch.setattr(code_identity, "read_source", lambda path: real(path) + (b"\n# edited\n" if path in edited else b""))

    def apply(*modules: str) -> None:
        code_identity.clear()
        edited.clear()
        edited.update(code_identity.source_path(m) for m in modules)

    yield apply
    code_identity.clear()


def closure(stage_name: str) -> set[str]:
    return set(code_identity.closure(STAGES[stage_name].__name__))


def test_code_identity_holds_every_module_a_stage_runs(traced):
    for (pipeline, stage_name), used in traced.used.items():
        assert STAGES[stage_name].__name__ in used  # the trace sees the stage itself
        assert used <= closure(stage_name), (pipeline, stage_name, used - closure(stage_name))
    # What the hand-written lists missed: IoU and mirroring, how scores become detections, the records.
    assert {"rcnn.learners.svm", "rcnn.detection.nms", "rcnn.detection.detector"} <= traced.used["tiny", "evaluate"]
    assert {
        "rcnn.learners.svm",
        "rcnn.learners.bbox_regression",
        "rcnn.structures.box_coding",
        "rcnn.detection.detector",
        "rcnn.data.datasets",
    } <= closure("evaluate")
    assert {"rcnn.structures.boxes", "rcnn.stages.features", "rcnn.stages.train_svm", "rcnn.stages.train_bbox"} <= closure(
        "evaluate"
    )
    assert "rcnn.store.records" in closure("train-svm") and "rcnn.structures.boxes" in closure("finetune")
    # ... and no more than it imports: selective search is no part of the conv maps, nor SVMs of fine-tuning.
    assert "rcnn.proposals.selective_search" not in closure("convmaps") and "rcnn.learners.svm" not in closure("finetune")
    assert "rcnn.report.study" not in closure("evaluate") and "rcnn.cli" not in closure("evaluate")


def test_a_change_to_any_imported_module_makes_the_stage_and_its_readers_stale(traced, edit):
    contexts = {name: context(traced.pipelines, traced.runs, name) for name in PIPELINES}
    modules = sorted(set().union(*(closure(s) for s in STAGES)))
    for module in [*modules, "rcnn.report.study"]:
        edit(module)
        for name, ctx in contexts.items():
            stale, edited = set(), set()  # stale: for any reason; edited: the module is in the stage's own code
            for stage_name, stage in pipeline_stages(ctx.cfg.method).items():  # in run order, readers after what they read
                above = {s for s in stale if stage_name in downstream(s)}
                for split in stage.splits(ctx):
                    st = unit_status(ctx, stage, split)
                    if module in closure(stage_name) and not above:
                        assert st.state == "stale" and st.reasons == [f"code changed: {module}"], (module, name, stage_name)
                    elif above:  # a stale unit above makes this one stale, naming the first one found and its reason
                        assert st.state == "stale" and len(st.reasons) == 1, (module, name, stage_name, st.reasons)
                        assert f"is stale (code changed: {module})" in st.reasons[0], (module, name, stage_name, st.reasons)
                    else:
                        assert st.state == "done", (module, name, stage_name, st.reasons)
                if module in closure(stage_name):
                    edited.add(stage_name)
                if module in closure(stage_name) or above:
                    stale.add(stage_name)
            ran = {s for (p, s), used in traced.used.items() if p == name and module in used}
            assert ran <= edited, (module, name)
            for stage_name in edited:
                assert downstream(stage_name) & set(pipeline_stages(ctx.cfg.method)) <= stale, (module, stage_name)
    edit()
    for ctx in contexts.values():
        for stage in pipeline_stages(ctx.cfg.method).values():
            assert all(unit_status(ctx, stage, split).state == "done" for split in stage.splits(ctx))


def test_a_manifest_without_module_digests_says_code_changed(traced, tmp_path):
    runs = copy_runs(traced, tmp_path)
    ctx = context(traced.pipelines, runs, "tiny")
    path = ctx.unit_dir("proposals", "test") / store.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["code"]["modules"] = sorted(manifest["code"]["modules"])  # as older versions recorded them: names only
    manifest["code"]["digest"] = manifest["fingerprint"] = "0" * 32
    path.write_text(json.dumps(manifest))
    assert unit_status(ctx, proposals, "test").reasons == ["code changed"]


def test_a_changed_scoring_function_is_never_reported_with_the_old_mAP(traced, tmp_path, capsys, edit, monkeypatch):
    from rcnn.learners.svm import SVMModel

    runs, oracle_runs = copy_runs(traced, tmp_path), copy_runs(traced, tmp_path / "oracle")
    ctx = context(traced.pipelines, runs, "tiny")
    old = store.read_manifest(ctx.unit_dir("evaluate", "test"))["metrics"]["mAP"]
    svm_digest = store.read_manifest(ctx.unit_dir("train-svm", "trainval"))["outputs"]["svm.npz"]["digest"]
    # An edit of rcnn/learners/svm.py that changes how features are scored, and nothing about training.
    scores = SVMModel.scores
    monkeypatch.setattr(SVMModel, "scores", lambda self, x: -scores(self, x))
    edit("rcnn.learners.svm")
    # What the present code gives: every stale unit recomputed on a copy, evaluate among them.
    oracle = context(traced.pipelines, oracle_runs, "tiny")
    for stage in pipeline_stages(oracle.cfg.method).values():
        new = run_stage(oracle, stage).get("test", {}).get("metrics", {}).get("mAP")
    assert f"{new:.4f}" != f"{old:.4f}"

    common = ["--pipelines-file", str(traced.pipelines), "--runs-dir", str(runs), "--set", FAST[0]]
    code, out, _ = run_cli(["status", "tiny", *common], capsys)
    line = next(line for line in out.splitlines() if "evaluate/test" in line)
    assert "stale" in line and "code changed: rcnn.learners.svm" in line
    code, out, err = run_cli(["run", "tiny", "--quiet", *common], capsys)
    assert code == 0, err
    # The SVMs were retrained to the same bytes, as in the report; evaluate still ran again.
    assert store.read_manifest(ctx.unit_dir("train-svm", "trainval"))["outputs"]["svm.npz"]["digest"] == svm_digest
    assert re.search(r"evaluate/test: mAP (\S+)", out).group(1) == f"{new:.4f}"
    code, out, _ = run_cli(["status", "tiny", *common], capsys)
    assert out.count(" done ") == 8 and "stale" not in out
    assert store.read_manifest(ctx.unit_dir("evaluate", "test"))["metrics"]["mAP"] == new


def test_a_changed_setting_makes_every_stage_below_stale_and_no_old_result_is_used(traced, tmp_path, capsys):
    runs = copy_runs(traced, tmp_path)
    common = ["--pipelines-file", str(traced.pipelines), "--runs-dir", str(runs)]
    changed = ["--set", "finetune.max_iter=9"]  # the runs were made with 8
    image = sorted((context(traced.pipelines, runs, "tiny").data_root / "JPEGImages").glob("*.jpg"))[0]
    below = ("features/trainval", "features/test", "train-svm/trainval", "train-bbox/trainval", "evaluate/test")
    for finetuned in (False, True):  # before anything was recomputed, and once fine-tuning alone was
        if finetuned:
            code, _, err = run_cli(["finetune", "tiny", "--quiet", *common, *changed], capsys)
            assert code == 0, err
        code, out, _ = run_cli(["status", "tiny", *common, *changed], capsys)
        states = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  ")}
        assert states["proposals/trainval"] == states["proposals/test"] == "done"
        assert states["finetune/trainval"] == ("done" if finetuned else "stale")
        assert all(states[unit] == "stale" for unit in below), out
        reason = (
            "finetune/trainval of pipeline 'tiny' is stale" if not finetuned else "features/trainval of pipeline 'tiny' is stale"
        )
        assert reason in out, out
        # Neither the old mAP nor a detector of the old SVMs on the new network: one line saying what to run.
        code, out, err = run_cli(["evaluate", "tiny", *common, *changed], capsys)
        assert code == 1 and "mAP" not in out and "up to date" not in out and err.count("\n") == 1, (out, err)
        assert "is stale" in err and "rcnn run tiny" in err
        code, out, err = run_cli(["detect", "tiny", str(image), "--out", str(tmp_path / "det"), *common, *changed], capsys)
        assert code == 1 and err.count("\n") == 1 and "is stale" in err and not (tmp_path / "det").exists(), (out, err)
    code, _, err = run_cli(["run", "tiny", "--quiet", *common, *changed], capsys)
    assert code == 0, err
    code, out, _ = run_cli(["status", "tiny", *common, *changed], capsys)
    assert out.count(" done ") == 8 and "stale" not in out


def test_compare_says_which_results_are_stale_under_todays_pipelines_file(traced, tmp_path, capsys, monkeypatch):
    import yaml

    runs = copy_runs(traced, tmp_path)
    monkeypatch.setenv("RCNN_PIPELINES", str(traced.pipelines))  # tiny's own max_iter, not the runs' 8: stale
    code, _, err = run_cli(["compare", "tiny", "tiny-spp", "--runs-dir", str(runs), "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert "tiny: finetune/trainval (parameter finetune.max_iter: 8 -> " in err and "are stale" in err, err
    # The command it gives must reach these runs, which are not in ./runs: it said `rcnn run tiny` alone.
    assert f"`rcnn run tiny --runs-dir {runs}` recomputes them" in err, err
    # Following it would recompute a run made with --set without them, replacing it: the --set come first.
    assert "recomputes them (for a run made with --set options, give `rcnn compare` the same ones first)" in err, err
    assert "stale" in (tmp_path / "a" / "report.md").read_text()
    # Judged with the --set the runs were made with, as `rcnn status` would be: current.
    common = ["--runs-dir", str(runs), "--set", "finetune.max_iter=8"]
    code, _, err = run_cli(["compare", "tiny", "tiny-spp", *common, "--out", str(tmp_path / "c")], capsys)
    assert code == 0 and "stale" not in err, err
    code, _, err = run_cli(["compare", "tiny", "tiny-spp", *common, "--set", "svm.C=0.01", "--out", str(tmp_path / "d")], capsys)
    assert code == 0, err
    assert f"`rcnn run tiny --runs-dir {runs} --set finetune.max_iter=8 --set svm.C=0.01` recomputes them" in err, err
    assert "give `rcnn compare` the same ones" not in err
    code, _, err = run_cli(["compare", "tiny", "tiny-spp", *common, "--set", "svm.nope=1", "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "svm.nope" in err and "Traceback" not in err, err
    doc = yaml.safe_load(traced.pipelines.read_text())
    for name in PIPELINES:
        doc["pipelines"][name].setdefault("finetune", {})["max_iter"] = 8  # what the runs were made with
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("RCNN_PIPELINES", str(same))
    code, _, err = run_cli(["compare", "tiny", "tiny-spp", "--runs-dir", str(runs), "--out", str(tmp_path / "b")], capsys)
    assert code == 0 and "stale" not in err, err


def overwrite_in_place(path: Path) -> None:
    """Damage a file without changing its size: invert a run of bytes in the middle."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    with open(path, "r+b") as f:
        f.write(data)


def test_same_size_damage_to_a_cached_part_is_refused_and_shown_by_verify(traced, tmp_path, capsys):
    runs = copy_runs(traced, tmp_path)
    part = sorted((runs / "tiny" / "features" / "trainval" / "parts").glob("*.h5"))[0]
    size = part.stat().st_size
    overwrite_in_place(part)
    assert part.stat().st_size == size
    common = ["--pipelines-file", str(traced.pipelines), "--runs-dir", str(runs), "--set", FAST[0]]

    code, _, err = run_cli(["train-svm", "tiny", "--force", "--quiet", *common], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{part.name}' is damaged" in lines[0] and f"rerun `rcnn features tiny --runs-dir {runs} --force`" in lines[0]

    # Sizes are checked always, bytes on request: only --verify sees this damage.
    code, out, _ = run_cli(["status", "tiny", *common], capsys)
    assert code == 0 and "damaged" not in out
    code, out, err = run_cli(["status", "tiny", "--verify", *common], capsys)
    damaged = [line for line in out.splitlines() if "damaged" in line]
    assert code == 1 and "1 stage output(s) damaged; rerun each with --force" in err
    assert len(damaged) == 1 and "features/trainval" in damaged[0] and part.name in damaged[0]

    code, _, err = run_cli(["features", "tiny", "--force", "--quiet", *common], capsys)
    assert code == 0, err
    code, out, _ = run_cli(["status", "tiny", "--verify", *common], capsys)
    assert "damaged" not in out and "features/trainval" in out


def test_a_truncated_output_is_shown_damaged_and_recomputed(traced, tmp_path, capsys):
    runs = copy_runs(traced, tmp_path)
    out_file = runs / "tiny" / "proposals" / "test" / proposals.OUTPUT
    size = out_file.stat().st_size
    with open(out_file, "r+b") as f:
        f.truncate(size - 100)
    common = ["--pipelines-file", str(traced.pipelines), "--runs-dir", str(runs), "--set", FAST[0]]
    code, out, _ = run_cli(["status", "tiny", *common], capsys)
    line = next(line for line in out.splitlines() if "proposals/test" in line)
    assert code == 1 and "damaged" in line and f"proposals.h5 is {size - 100} bytes, {size} when written" in line
    code, out, err = run_cli(["run", "tiny", "--until", "features", "--quiet", *common], capsys)
    assert code == 0 and "proposals/test: damaged (" in out and "recomputing" in out, err
    assert out_file.stat().st_size == size and "features/test: up to date" in out  # same proposals again


def test_a_damaged_twin_is_not_shared(traced, tmp_path):
    runs = copy_runs(traced, tmp_path)
    shutil.rmtree(runs / "tiny-spp")  # its proposals are a second, undamaged twin
    overwrite_in_place(runs / "tiny" / "proposals" / "test" / proposals.OUTPUT)
    logs: list[str] = []
    twin = context(traced.pipelines, runs, "tiny-twin")
    twin.log = logs.append
    run_stage(twin, proposals)
    assert any(line.startswith("proposals/trainval: identical inputs") for line in logs)
    assert not any(line.startswith("proposals/test: identical inputs") for line in logs)
    assert (
        store.read_manifest(twin.unit_dir("proposals", "test"))["outputs"]
        == (store.read_manifest(traced.runs / "tiny" / "proposals" / "test")["outputs"])
    )  # computed again, to the undamaged bytes


def test_each_file_is_hashed_once_per_process_and_workers_inherit_the_digests(traced, monkeypatch):
    ctx = context(traced.pipelines, traced.runs, "tiny")
    calls: list[Path] = []
    real = store.file_digest
    monkeypatch.setattr(store, "file_digest", lambda path: calls.append(Path(path)) or real(path))
    store.forget_digests()
    for _ in range(2):
        with features.load(ctx, "trainval") as rs:
            for image_id in rs.ids:
                rs.array(image_id, "boxes")
    manifest = store.read_manifest(ctx.unit_dir("features", "trainval"))
    assert sorted(p.name for p in calls) == sorted(Path(name).name for name in manifest["outputs"])

    verify = upstream_check(ctx, "features", "trainval")
    sent = pickle.dumps(verify)  # as joblib sends it to a worker process, which has hashed nothing
    store.forget_digests()
    calls.clear()
    received = pickle.loads(sent)
    for name in manifest["outputs"]:
        received(ctx.unit_dir("features", "trainval") / name)
    assert calls == []


def test_the_data_generator_is_no_stages_code():
    """Synthetic data is fingerprinted by its content, so the generator's source belongs to no stage's identity:
    editing it must not make finished results stale on its own."""
    from rcnn.stages import STAGES
    from rcnn.store import code_identity

    for stage in STAGES.values():
        closure = code_identity.closure(stage.__name__)
        assert "rcnn.data.synth" not in closure and "rcnn.stages.prepare" not in closure, stage.__name__


def test_compare_leaves_out_a_damaged_evaluation_and_says_so(traced, tmp_path, capsys, monkeypatch):
    runs = copy_runs(traced, tmp_path)
    monkeypatch.setenv("RCNN_PIPELINES", str(traced.pipelines))
    results = runs / "tiny" / "evaluate" / "test" / "results.json"
    doc = json.loads(results.read_text())
    doc["mAP"] = 0.97531  # an edit of the kind a hand or a bad disk makes, keeping the file's size or not
    results.write_text(json.dumps(doc))
    code, _, err = run_cli(["compare", "tiny", "tiny-spp", "--runs-dir", str(runs), "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert "tiny: evaluate/test is damaged (output results.json " in err, err
    assert f"rerun `rcnn evaluate tiny --runs-dir {runs} --force`" in err, err  # one --runs-dir, not two
    assert "0.9753" not in (tmp_path / "r" / "report.md").read_text()


def test_compare_judges_like_for_like_by_the_data_not_by_its_path(traced, tmp_path, capsys, monkeypatch):
    runs = copy_runs(traced, tmp_path)
    monkeypatch.setenv("RCNN_PIPELINES", str(traced.pipelines))
    manifests = sorted((runs / "tiny-spp").glob("*/*/manifest.json"))
    root = json.loads(manifests[0].read_text())["data"]["root"]
    moved = tmp_path / "moved"
    moved.symlink_to(root)  # the same data, reached by another path (a copied runs folder, a moved dataset)
    for path in manifests:
        path.write_text(path.read_text().replace(json.dumps(root), json.dumps(str(moved))))
    warning = "tested on different data or splits"
    code, _, err = run_cli(["compare", "tiny", "tiny-spp", "--runs-dir", str(runs), "--out", str(tmp_path / "a")], capsys)
    assert code == 0 and warning not in (tmp_path / "a" / "report.md").read_text(), err
    # What the evaluation read decides, not the proposals rebuilt since (`rcnn proposals tiny-spp --set data.root=…`).
    for stage, out, said in (("proposals", "b", False), ("evaluate", "c", True)):
        manifest = runs / "tiny-spp" / stage / "test" / "manifest.json"
        doc = json.loads(manifest.read_text())
        doc["inputs"]["data/test"] = "0" * 32  # other test images
        manifest.write_text(json.dumps(doc))
        code, _, err = run_cli(["compare", "tiny", "tiny-spp", "--runs-dir", str(runs), "--out", str(tmp_path / out)], capsys)
        assert code == 0 and (warning in (tmp_path / out / "report.md").read_text()) is said, err
