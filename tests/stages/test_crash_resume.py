"""A stage killed (SIGKILL) or interrupted (Ctrl-C), then rerun, ends with the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import interrupted_at_checkpoint, write_pipelines

from rcnn.data.synth import generate_dataset


def rcnn(*args: str) -> list[str]:
    return [sys.executable, "-c", "from rcnn.cli import main; main()", *args]


@pytest.fixture(scope="module")
def medium_voc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("medium") / "voc"
    generate_dataset(root, n_images=48, seed=5, size=128, test_fraction=0.25, progress=False)
    return root


def outputs(runs: Path) -> dict:
    out = {}
    for manifest in sorted(runs.glob("tiny/proposals/*/manifest.json")):
        out[manifest.parent.name] = json.loads(manifest.read_text())["outputs"]
    return out


PROPOSALS = ["--set", "proposals.mode=fast", "--set", "proposals.max_proposals=null", "--quiet"]
CWD = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference(medium_voc, tmp_path_factory) -> Path:
    """The runs folder of an uninterrupted proposals run."""
    tmp = tmp_path_factory.mktemp("reference")
    pf = write_pipelines(tmp / "p.yaml", medium_voc)
    runs = tmp / "runs"
    argv = rcnn("proposals", "tiny", "--runs-dir", str(runs), "--pipelines-file", str(pf), *PROPOSALS)
    subprocess.run(argv, check=True, cwd=CWD, capture_output=True)
    return runs


def start_until_first_part(runs: Path, common: list[str], **popen) -> subprocess.Popen:
    """`rcnn proposals tiny` in a process group of its own, returned once its first per-image part is on disk
    (or it ended, or two minutes passed)."""
    parts = runs / "tiny" / "proposals" / "trainval" / ".work" / "parts"
    proc = subprocess.Popen(rcnn("proposals", "tiny", "--runs-dir", str(runs), *common), cwd=CWD, start_new_session=True, **popen)
    deadline = time.time() + 120
    while time.time() < deadline and not list(parts.glob("part-*.h5")) and proc.poll() is None:
        time.sleep(0.02)
    return proc


def test_sigkill_midway_then_resume_gives_identical_outputs(medium_voc, reference, tmp_path):
    pf = write_pipelines(tmp_path / "p.yaml", medium_voc)
    # `fast` mode on 36 trainval images takes a few seconds: long enough to kill midway.
    common = ["--pipelines-file", str(pf), *PROPOSALS]
    cwd = CWD
    runs = tmp_path / "runs"
    parts = runs / "tiny" / "proposals" / "trainval" / ".work" / "parts"
    proc = start_until_first_part(runs, common, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_parts = list(parts.glob("part-*.h5"))
    assert done_parts, "the run finished no part before the deadline"
    assert not (runs / "tiny" / "proposals" / "trainval" / "manifest.json").exists()

    resumed = subprocess.run(
        rcnn("proposals", "tiny", "--runs-dir", str(runs), *common), cwd=cwd, capture_output=True, text=True, check=True
    )
    assert "resuming" in resumed.stdout
    assert outputs(runs) == outputs(reference)
    # Its recorded time is that of the images this run computed, and the status says so.
    options = [c for c in common if c != "--quiet"]
    status = subprocess.run(rcnn("status", "tiny", "--runs-dir", str(runs), *options), cwd=cwd, capture_output=True, text=True)
    (line,) = [x for x in status.stdout.splitlines() if "proposals/trainval" in x]
    assert re.search(r"\(resumed: the time of \d+ of 36 images\)", line), line


def _live_processes_in_group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies (an orphan's zombie waits for init to reap it)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(group) == pgid and state != "Z":
            live.append(int(stat.parent.name))
    return live


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_ctrl_c_stops_the_workers_says_what_is_kept_and_a_rerun_resumes(medium_voc, reference, tmp_path):
    pf = write_pipelines(tmp_path / "p.yaml", medium_voc)
    common = ["--pipelines-file", str(pf), *PROPOSALS, "--set", "proposals.n_jobs=2"]
    runs = tmp_path / "runs"
    proc = start_until_first_part(runs, common, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.poll() is None, "the stage finished before it could be interrupted"
    # Ctrl-C in a terminal: SIGINT to the whole foreground process group, the workers too.
    os.killpg(proc.pid, signal.SIGINT)
    # Bounds against a hang, not timings: the workers are in the middle of an image, and stop.
    out, err = proc.communicate(timeout=60)
    gone = time.time() + 30
    while _live_processes_in_group(proc.pid) and time.time() < gone:
        time.sleep(0.1)
    assert _live_processes_in_group(proc.pid) == [], "worker processes outlived the interrupted run"

    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "rcnn: interrupted; completed work is kept and a rerun resumes it"
    assert "aborted" not in err and "Traceback" not in err
    kept = re.search(r"proposals/trainval: interrupted; the proposals of (\d+) of 36 images are kept", out)
    assert kept, out
    assert not (runs / "tiny" / "proposals" / "trainval" / "manifest.json").exists()

    resumed = subprocess.run(
        rcnn("proposals", "tiny", "--runs-dir", str(runs), *common), cwd=CWD, capture_output=True, text=True, check=True
    )
    # The rerun finds exactly the images the interrupted run said it kept.
    assert f"proposals/trainval: resuming, {kept.group(1)} of 36 images already done" in resumed.stdout
    assert outputs(runs) == outputs(reference)


def test_sigterm_saves_the_work_done_as_ctrl_c_does(medium_voc, tmp_path):
    # kill, timeout and a batch system's preemption send SIGTERM: the run died without a word and lost the
    # images not yet written to a part.
    pf = write_pipelines(tmp_path / "p.yaml", medium_voc)
    common = ["--pipelines-file", str(pf), *PROPOSALS]
    runs = tmp_path / "runs"
    proc = start_until_first_part(runs, common, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.poll() is None, "the stage finished before it could be terminated"
    proc.send_signal(signal.SIGTERM)  # to the process alone, as kill PID does
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "rcnn: terminated (SIGTERM); completed work is kept and a rerun resumes it"
    kept = re.search(r"proposals/trainval: interrupted; the proposals of (\d+) of 36 images are kept", out)
    assert kept and "Traceback" not in err, (out, err)
    options = [c for c in common if c != "--quiet"]
    status = subprocess.run(rcnn("status", "tiny", "--runs-dir", str(runs), *options), cwd=CWD, capture_output=True, text=True)
    (line,) = [x for x in status.stdout.splitlines() if "proposals/trainval" in x]
    assert line.endswith(f"never completed; its unfinished work resumes ({kept.group(1)} images done)"), line
    resumed = subprocess.run(
        rcnn("proposals", "tiny", "--runs-dir", str(runs), *common), cwd=CWD, capture_output=True, text=True, check=True
    )
    assert f"proposals/trainval: resuming, {kept.group(1)} of 36 images already done" in resumed.stdout
    # Its rate is over the images it computed, and says so (it read like a tenfold slowdown).
    computed = 36 - int(kept.group(1))
    assert f" img/s over the {computed} images computed (start-up included; the rest resumed)" in resumed.stdout


def test_ctrl_c_outside_the_wait_for_workers_still_stops_them(pipelines_file, tmp_path, monkeypatch, capsys):
    # Ctrl-C can land while the loop writes records rather than waits for the workers; joblib
    # then kills them only if the stage closes its results (else the exit waits for the queue).
    from conftest import run_cli

    from rcnn.stages import proposals
    from rcnn.store import records

    closed = []

    class InProcessParallel:
        def __init__(self, **kwargs):
            pass

        def __call__(self, tasks):
            def results():
                try:
                    for f, args, kwargs in tasks:
                        yield f(*args, **kwargs)
                except GeneratorExit:
                    closed.append(True)
                    raise

            return results()

    def interrupted(self, image_id, arrays, attrs=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(proposals, "Parallel", InProcessParallel)
    monkeypatch.setattr(records.RecordWriter, "add", interrupted)
    argv = ["proposals", "tiny", "--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path), "--quiet"]
    code, out, err = run_cli([*argv, "--set", "proposals.n_jobs=2"], capsys)
    assert code == 130
    assert closed == [True]
    assert "proposals/trainval: interrupted; the proposals of 0 of 4 images are kept" in out
    assert err.strip().endswith("rcnn: interrupted; completed work is kept and a rerun resumes it")


def test_ctrl_c_in_finetune_says_where_the_rerun_resumes(pipelines_file, tmp_path, monkeypatch, capsys):
    # It said only "completed work is kept", not that the work since the last checkpoint is lost.
    from conftest import run_cli

    from rcnn.stages import finetune

    real = finetune.fine_tune
    monkeypatch.setattr(finetune, "fine_tune", interrupted_at_checkpoint(real, 4))
    argv = ["finetune", "tiny", "--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path), "--quiet"]
    argv += ["--set", "finetune.max_iter=8", "--set", "finetune.eval_every=2"]
    assert run_cli(["proposals", *argv[1:]], capsys)[0] == 0
    code, out, err = run_cli(argv, capsys)
    assert code == 130, err
    said = "finetune/trainval: interrupted; a rerun resumes from the checkpoint of iteration 4 (one every finetune.eval_every = 2"
    assert said in out and err.strip().endswith("rcnn: interrupted; completed work is kept and a rerun resumes it")
    # rcnn status said only "missing  never completed".
    status = ["status", "tiny", *[a for a in argv[2:] if a != "--quiet"]]
    code, out, _ = run_cli(status, capsys)
    line = next(x for x in out.splitlines() if "finetune/trainval" in x)
    assert line.split()[1] == "missing" and line.endswith("its unfinished work resumes (fine-tuning checkpointed at iteration 4)")
    monkeypatch.setattr(finetune, "fine_tune", real)
    code, out, err = run_cli(argv, capsys)
    assert code == 0 and "finetune/trainval: resuming from iteration 4" in out, err
    assert finetune.resume_point(0, 1000) == (
        "no checkpoint was written yet (one every finetune.eval_every = 1000 iterations), so a rerun starts afresh"
    )


def test_a_training_state_made_on_another_device_resumes_with_a_note(pipelines_file, tmp_path, monkeypatch, capsys):
    # A scratch folder moved from a GPU machine: model.precision and model.warp `auto` resolve otherwise here, and
    # the GPU's random state cannot be restored, so the run goes on but is not an unbroken run's.
    import torch
    from conftest import run_cli

    from rcnn.stages import finetune
    from rcnn.training.finetune import TrainState

    real = finetune.fine_tune
    stopped = interrupted_at_checkpoint(real, 1)
    monkeypatch.setattr(finetune, "fine_tune", stopped)
    argv = ["finetune", "tiny", "--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path), "--quiet"]
    argv += ["--set", "finetune.max_iter=6", "--set", "finetune.eval_every=3"]
    assert run_cli(["proposals", *argv[1:]], capsys)[0] == 0
    assert run_cli(argv, capsys)[0] == 130
    monkeypatch.setattr(finetune, "fine_tune", real)
    (path,) = (tmp_path / "tiny" / "finetune" / "trainval").rglob("train_state.pt")
    state = TrainState.load(path)
    assert state.cuda_rng is None  # made on this CPU
    code, out, err = run_cli(argv, capsys)  # a plain resume says nothing more
    assert code == 0 and "resuming from iteration 3" in out and "note:" not in out, err
    monkeypatch.setattr(finetune, "fine_tune", stopped)  # another configuration, stopped at its first checkpoint
    assert run_cli([*argv, "--set", "finetune.max_iter=12"], capsys)[0] == 130
    monkeypatch.setattr(finetune, "fine_tune", real)
    (path,) = (tmp_path / "tiny" / "finetune" / "trainval").rglob("train_state.pt")
    state = TrainState.load(path)
    state.cuda_rng = torch.zeros(16, dtype=torch.uint8)  # as a GPU saves its generator's state
    state.save(path)
    code, out, err = run_cli([*argv, "--set", "finetune.max_iter=12"], capsys)
    assert code == 0 and "resuming from iteration 3" in out, err
    said = "finetune/trainval: note: its saved state was made on a GPU and goes on on cpu, in this device's precision"
    assert said in out, out


def _digests(runs: Path, stage: str, split: str) -> dict:
    manifest = json.loads((runs / "tiny" / stage / split / "manifest.json").read_text())
    return {k: v["digest"] for k, v in manifest["outputs"].items()}


def _kill_when(cmd: list[str], cwd: Path, ready, timeout: float = 120) -> None:
    """Start ``cmd``, SIGKILL its process group as soon as ``ready()`` holds, and check it had not finished."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.02)
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not finished, "the stage finished before it could be killed"


def test_sigkill_in_finetune_features_and_svm_then_resume(medium_voc, tmp_path):
    pf = write_pipelines(tmp_path / "p.yaml", medium_voc)
    cwd = Path(__file__).resolve().parents[2]
    common = [
        "--pipelines-file",
        str(pf),
        "--quiet",
        "--set",
        "proposals.max_proposals=120",
        "--set",
        "finetune.max_iter=60",
        "--set",
        "finetune.eval_every=10",
        "--set",
        "model.input_size=64",
    ]
    ref, runs = tmp_path / "ref", tmp_path / "runs"
    subprocess.run(
        rcnn("run", "tiny", "--until", "train-svm", "--runs-dir", str(ref), *common), cwd=cwd, check=True, capture_output=True
    )
    subprocess.run(rcnn("proposals", "tiny", "--runs-dir", str(runs), *common), cwd=cwd, check=True, capture_output=True)

    def unit(stage: str) -> Path:
        return runs / "tiny" / stage / "trainval"

    # Fine-tuning: killed after its first checkpoint, resumed from it, same weights as an unbroken run.
    _kill_when(
        rcnn("finetune", "tiny", "--runs-dir", str(runs), *common),
        cwd,
        lambda: (unit("finetune") / ".work" / "train_state.pt").exists(),
    )
    out = subprocess.run(
        rcnn("finetune", "tiny", "--runs-dir", str(runs), *common), cwd=cwd, check=True, capture_output=True, text=True
    )
    assert "resuming from iteration" in out.stdout
    assert _digests(runs, "finetune", "trainval") == _digests(ref, "finetune", "trainval")
    options = [c for c in common if c != "--quiet"]
    status = subprocess.run(rcnn("status", "tiny", "--runs-dir", str(runs), *options), cwd=cwd, capture_output=True, text=True)
    (line,) = [x for x in status.stdout.splitlines() if "finetune/trainval" in x]
    assert re.search(r"\(resumed: the time of \d+ of 60 iterations\)", line), line

    # Features: killed after the first complete part, resumed at the next image, same bytes.
    _kill_when(
        rcnn("features", "tiny", "--runs-dir", str(runs), *common),
        cwd,
        lambda: any((unit("features") / ".work" / "parts").glob("part-*.h5")),
    )
    out = subprocess.run(
        rcnn("features", "tiny", "--runs-dir", str(runs), *common), cwd=cwd, check=True, capture_output=True, text=True
    )
    assert "resuming" in out.stdout
    for split in ("trainval", "test"):
        assert _digests(runs, "features", split) == _digests(ref, "features", split)

    # SVM training: killed while mining, rerun from the start, same model.
    _kill_when(rcnn("train-svm", "tiny", "--runs-dir", str(runs), *common), cwd, lambda: (unit("train-svm") / ".work").exists())
    subprocess.run(rcnn("train-svm", "tiny", "--runs-dir", str(runs), *common), cwd=cwd, check=True, capture_output=True)
    assert _digests(runs, "train-svm", "trainval") == _digests(ref, "train-svm", "trainval")


def test_a_damaged_training_state_is_dropped_and_training_starts_afresh(pipelines_file, tmp_path, capsys):
    """A state file cut short (a crash during its write, a full disk) must not stop every later run: it is never
    trusted, and training starts again from the pretrained weights, to the bytes of a run that never had it."""
    from conftest import run_cli

    from rcnn.commands.shared import make_context
    from rcnn.stages import finetune
    from rcnn.stages.provenance import fingerprint
    from rcnn.store import artifacts as store

    common = ["--pipelines-file", str(pipelines_file), "--set", "finetune.max_iter=6", "--set", "finetune.eval_every=3"]
    ref, runs = tmp_path / "ref", tmp_path / "runs"
    for where in (ref, runs):
        assert run_cli(["run", "tiny", "--until", "proposals", "--quiet", "--runs-dir", str(where), *common], capsys)[0] == 0
    assert run_cli(["finetune", "tiny", "--quiet", "--runs-dir", str(ref), *common], capsys)[0] == 0
    ctx = make_context("tiny", str(runs), tuple(common[3::2]), str(pipelines_file), quiet=True)
    unit = ctx.unit_dir("finetune", "trainval")
    work = store.work_dir(unit, fingerprint(ctx, finetune, "trainval"))
    (work / "train_state.pt").write_bytes(b"PK\x03\x04" + bytes(3000))  # a zip archive cut short
    (work / "history.json").write_text('[{"iteration": 3, "lo')
    code, out, err = run_cli(["finetune", "tiny", "--runs-dir", str(runs), *common], capsys)
    assert code == 0, err
    assert "the saved training state cannot be used (" in out and "starting afresh" in out and "resuming" not in out
    written = [store.read_manifest(r / "tiny" / "finetune" / "trainval")["outputs"] for r in (ref, runs)]
    assert [{n: o["digest"] for n, o in w.items()} for w in written] == [{n: o["digest"] for n, o in written[0].items()}] * 2
