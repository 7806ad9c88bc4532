"""The skip / stale / reuse / resume cycle, driven through the proposals stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rcnn.config import PipelineFile
from rcnn.errors import UserError
from rcnn.stages import proposals
from rcnn.stages.context import Context
from rcnn.stages.provenance import fingerprint
from rcnn.stages.runner import run_stage, unit_status
from rcnn.store import artifacts as store
from rcnn.store import records


def make_ctx(pipelines_file, runs, name="tiny", overrides=(), **kw) -> tuple[Context, list[str]]:
    logs: list[str] = []
    cfg = PipelineFile(pipelines_file).load(name, overrides)
    return Context(cfg=cfg, runs_dir=runs, progress=False, log=logs.append, **kw), logs


def test_first_run_computes_second_skips(pipelines_file, tmp_path):
    runs = tmp_path / "runs"
    ctx, logs = make_ctx(pipelines_file, runs)
    first = run_stage(ctx, proposals)
    assert set(first) == {"trainval", "test"}
    m = first["test"]
    assert m["metrics"]["images"] == len(ctx.dataset("test"))
    assert 0 < m["metrics"]["boxes_per_image"] <= 50
    assert m["params"]["max_proposals"] == 50 and "n_jobs" not in m["params"]
    assert set(m["libraries"]) >= {"torch", "opencv", "numpy"}
    unit = ctx.unit_dir("proposals", "test")
    assert json.loads((unit / "manifest.json").read_text())["fingerprint"] == m["fingerprint"]
    assert not (unit / ".work").exists()

    # What an interrupted `--force` run of the complete unit left is removed by the skip: nothing would resume it.
    leftover = store.work_dir(unit, fingerprint(ctx, proposals, "test")) / "parts"
    leftover.mkdir()
    ctx2, logs2 = make_ctx(pipelines_file, runs)
    again = run_stage(ctx2, proposals)
    assert all("up to date, skipped" in line for line in logs2)
    assert again["test"]["fingerprint"] == m["fingerprint"] and not (unit / ".work").exists()


def test_parameter_change_makes_stale_with_reason(pipelines_file, tmp_path):
    runs = tmp_path / "runs"
    run_stage(make_ctx(pipelines_file, runs)[0], proposals)
    ctx, logs = make_ctx(pipelines_file, runs, overrides=["proposals.max_proposals=20"])
    st = unit_status(ctx, proposals, "test")
    assert st.state == "stale" and st.reasons == ["parameter max_proposals: 50 -> 20"]
    out = run_stage(ctx, proposals)
    assert any("stale (parameter max_proposals: 50 -> 20)" in line for line in logs)
    assert out["test"]["metrics"]["boxes_per_image"] <= 20
    # n_jobs does not change outputs, so it does not make the stage stale.
    ctx3, _ = make_ctx(pipelines_file, runs, overrides=["proposals.max_proposals=20", "proposals.n_jobs=2"])
    assert unit_status(ctx3, proposals, "test").state == "done"


def test_data_change_and_deleted_output_make_stale(pipelines_file, tmp_path, voc_copy):
    from conftest import write_pipelines

    pf = write_pipelines(tmp_path / "p.yaml", voc_copy)
    runs = tmp_path / "runs"
    ctx, _ = make_ctx(pf, runs)
    run_stage(ctx, proposals)
    xml = next((voc_copy / "Annotations").glob("*.xml"))
    xml.write_text(xml.read_text() + "\n")
    ctx2, _ = make_ctx(pf, runs)
    reasons = [r for s in ctx2.splits for r in unit_status(ctx2, proposals, s).reasons]
    assert any(r.startswith("input data/") for r in reasons)
    run_stage(ctx2, proposals)
    (ctx2.unit_dir("proposals", "test") / "proposals.h5").unlink()
    st = unit_status(make_ctx(pf, runs)[0], proposals, "test")
    assert st.state == "stale" and "deleted" in st.reasons[0]


def test_a_unit_built_from_another_folder_says_so_rather_than_changed(tmp_path, voc_copy):
    # `--set data.root=OTHER` read as "input data/test changed", as if the files had been edited. (A copy of the
    # same files is the same data: its units stay done.)
    import shutil

    from conftest import write_pipelines

    pf = write_pipelines(tmp_path / "p.yaml", voc_copy)
    runs = tmp_path / "runs"
    run_stage(make_ctx(pf, runs)[0], proposals)
    other = tmp_path / "other"
    shutil.copytree(voc_copy, other)
    for xml in (other / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text() + "\n")
    ctx, _ = make_ctx(pf, runs, overrides=[f"data.root={other}"])
    reasons = unit_status(ctx, proposals, "test").reasons
    assert f"input data/test is another folder: {other.resolve()}, where the unit read {voc_copy.resolve()}" in reasons
    for xml in (voc_copy / "Annotations").glob("*.xml"):  # the same folder, its files edited: "changed"
        xml.write_text(xml.read_text() + "\n")
    assert "input data/test changed" in unit_status(make_ctx(pf, runs)[0], proposals, "test").reasons


def test_force_recomputes_identically(pipelines_file, tmp_path):
    runs = tmp_path / "runs"
    first = run_stage(make_ctx(pipelines_file, runs)[0], proposals)
    ctx, logs = make_ctx(pipelines_file, runs, force=True)
    again = run_stage(ctx, proposals)
    assert not any("skipped" in line for line in logs)
    # Seeded search: recomputation gives byte-identical records.
    for split in ("trainval", "test"):
        a, b = first[split]["outputs"], again[split]["outputs"]
        assert a["proposals.h5"]["digest"] == b["proposals.h5"]["digest"]


def test_identical_pipeline_reuses_proposals(pipelines_file, tmp_path):
    runs = tmp_path / "runs"
    run_stage(make_ctx(pipelines_file, runs)[0], proposals)
    twin, logs = make_ctx(pipelines_file, runs, name="tiny-twin")
    out = run_stage(twin, proposals)
    assert all("reused its outputs" in line for line in logs)
    assert out["test"]["reused_from"].endswith("tiny/proposals/test")
    a = runs / "tiny" / "proposals" / "test" / "proposals.h5"
    b = runs / "tiny-twin" / "proposals" / "test" / "proposals.h5"
    assert a.stat().st_ino == b.stat().st_ino  # hard link: no second copy on disk
    assert unit_status(twin, proposals, "test").state == "done"


def test_resume_uses_completed_records(pipelines_file, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    ctx, logs = make_ctx(pipelines_file, runs)
    ids = ctx.dataset("test").ids
    # Simulate a run killed after one image: its record exists under .work.
    fp = fingerprint(ctx, proposals, "test")
    work = store.work_dir(ctx.unit_dir("proposals", "test"), fp)
    marker = np.array([[1, 2, 3, 4]], np.float32)
    with records.RecordWriter(work / "parts", proposals.KIND) as w:
        w.add(ids[0], {"boxes": marker})
    out = run_stage(ctx, proposals)
    assert out["test"]["metrics"]["images_computed"] == len(ids) - 1
    assert any("resuming, 1 of" in line for line in logs)
    with proposals.load(ctx, "test") as f:
        np.testing.assert_array_equal(f.array(ids[0], "boxes"), marker)
        assert len(f.array(ids[-1], "boxes")) > 1


def test_work_from_other_parameters_is_discarded(pipelines_file, tmp_path):
    runs = tmp_path / "runs"
    ctx, _ = make_ctx(pipelines_file, runs)
    unit = ctx.unit_dir("proposals", "test")
    stale = store.Fingerprint("proposals", 1, {"other": 1}, {}, "x")
    with records.RecordWriter(store.work_dir(unit, stale) / "parts", proposals.KIND) as w:
        w.add(ctx.dataset("test").ids[0], {"boxes": np.zeros((1, 4), np.float32)})
    out = run_stage(ctx, proposals)
    assert out["test"]["metrics"]["images_computed"] == len(ctx.dataset("test"))


def test_lock_refuses_second_writer(pipelines_file, tmp_path):
    runs = tmp_path / "runs"
    ctx, _ = make_ctx(pipelines_file, runs)
    unit = ctx.unit_dir("proposals", "trainval")
    with store.unit_lock(unit):
        with pytest.raises(UserError, match="another rcnn process is writing proposals/trainval.*--wait"):
            run_stage(ctx, proposals)


def test_damaged_manifest_is_reported(pipelines_file, tmp_path):
    runs = tmp_path / "runs"
    ctx, _ = make_ctx(pipelines_file, runs)
    run_stage(ctx, proposals)
    path = ctx.unit_dir("proposals", "test") / "manifest.json"
    good = path.read_text()
    path.write_text(good[:40])
    # The command reaches this runs folder, which is not the default one.
    hint = f"rerun `rcnn proposals tiny --runs-dir {runs} --force`"
    with pytest.raises(UserError, match=rf"manifest.json' is damaged \(not valid JSON\); {hint}$"):
        store.read_manifest(path.parent)
    # Shown as damaged, not raised, and rebuilt by the next run without --force.
    status = unit_status(ctx, proposals, "test")
    assert status.state == "damaged" and "not valid JSON" in status.reasons[0] and status.manifest is None
    out = run_stage(ctx, proposals)
    assert json.loads(path.read_text())["fingerprint"] == out["test"]["fingerprint"] == json.loads(good)["fingerprint"]
    for bad in ("{}", json.dumps({**json.loads(good), "outputs": ["proposals.h5"]})):
        path.write_text(bad)
        with pytest.raises(UserError, match=rf"is not an rcnn manifest; {hint}$"):
            store.read_manifest(path.parent)
        assert unit_status(ctx, proposals, "test").state == "damaged"
    assert store.rerun_hint(runs / "tiny" / "evaluate" / "test") == f"rerun `rcnn evaluate tiny --runs-dir {runs} --force`"
    assert store.rerun_hint(Path("runs") / "tiny" / "evaluate" / "test") == "rerun `rcnn evaluate tiny --force`"


def test_spp_models_map_windows_with_the_configured_offset(pipelines_file, tmp_path):
    from rcnn.stages.convmaps import untrained_model

    ctx, _ = make_ctx(pipelines_file, tmp_path / "runs", "tiny-spp")
    assert ctx.cfg.spp.offset == "trunk"
    assert untrained_model(ctx, spp=True).spec.offset == 3.0  # the tiny trunk's own
    ctx, _ = make_ctx(pipelines_file, tmp_path / "runs", "tiny-spp", ["spp.offset=0"])
    assert untrained_model(ctx, spp=True).spec.offset == 0.0  # the paper's formula as printed
    ctx, _ = make_ctx(pipelines_file, tmp_path / "runs", "tiny-spp", ["spp.offset=2.5"])
    assert untrained_model(ctx, spp=True).spec.offset == 2.5


def test_a_complete_unit_in_a_read_only_runs_folder_is_skipped_without_its_lock(pipelines_file, tmp_path, monkeypatch):
    # A shared or archived store: `rcnn run` stopped at the first lock file it could not create, with nothing to do.
    import errno

    runs = tmp_path / "runs"
    run_stage(make_ctx(pipelines_file, runs)[0], proposals)

    def read_only(unit_dir, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(unit_dir / ".lock"))

    monkeypatch.setattr(store, "unit_lock", read_only)
    ctx, logs = make_ctx(pipelines_file, runs)
    out = run_stage(ctx, proposals)
    assert set(out) == {"trainval", "test"}
    assert logs == ["proposals/trainval: up to date, skipped", "proposals/test: up to date, skipped"]
    # Work to do, or --force, still needs the lock: the error is the file system's, as before.
    for overrides, force in (("proposals.max_proposals=20",), False), ((), True):
        ctx, _ = make_ctx(pipelines_file, runs, overrides=list(overrides), force=force)
        with pytest.raises(OSError, match="Read-only file system"):
            run_stage(ctx, proposals)
