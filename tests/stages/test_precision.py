"""`model.precision`: bfloat16 on a CPU (what `auto` picks on a GPU) fine-tunes and extracts features through the
stages, close to float32's numbers; changing it recomputes what depends on it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli


def test_bfloat16_runs_the_stages_close_to_float32_and_is_in_the_fingerprint(pipelines_file, tmp_path, capsys):
    from rcnn.commands.shared import make_context
    from rcnn.stages import features

    runs = tmp_path / "runs"
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(runs), "--quiet"]
    for stage in ("proposals", "finetune", "features"):
        code, _, err = run_cli([stage, "tiny", *common], capsys)
        assert code == 0, err
    ctx32 = make_context("tiny", runs, (), str(pipelines_file), quiet=True)
    with features.load(ctx32, "test") as rs:
        want = {i: rs.array(i, "fc7", np.float16, 2).astype(np.float32) for i in rs.ids}

    bf16 = ["--set", "model.precision=bfloat16"]
    code, out, _ = run_cli(["status", "tiny", *common[:-1], *bf16], capsys)
    assert code == 0
    assert [line.split()[1] for line in out.splitlines() if line.strip().startswith(("finetune/", "features/"))] == ["stale"] * 3
    for stage in ("finetune", "features"):
        code, _, err = run_cli([stage, "tiny", *common, *bf16], capsys)
        assert code == 0, err
    ctx16 = make_context("tiny", runs, ("model.precision=bfloat16",), str(pipelines_file), quiet=True)
    with features.load(ctx16, "test") as rs:
        got = {i: rs.array(i, "fc7", np.float16, 2).astype(np.float32) for i in rs.ids}
    assert got.keys() == want.keys()
    a, b = np.concatenate(list(want.values())), np.concatenate(list(got.values()))
    assert a.shape == b.shape and not np.array_equal(a, b)  # bfloat16 did run, in fine-tuning and features
    # Not the same network: 24 Adam steps from scratch drift apart under bfloat16's rounding (about 12 % of a
    # feature vector here). The features' own bfloat16 error, on one network, is checked tightly in
    # tests/modeling/test_inference.py.
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-6)
    assert np.median(rel) < 0.3, np.median(rel)


def test_an_unknown_precision_is_one_line(pipelines_file, tmp_path, capsys):
    common = ["--pipelines-file", str(pipelines_file), "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    code, _, err = run_cli(["finetune", "tiny", *common, "--set", "model.precision=float16"], capsys)
    assert code == 2
    assert "precision" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("precision", ["auto", "float32", "bfloat16"])
def test_each_precision_names_a_type_on_each_device(precision):
    import torch

    from rcnn.modeling.inference import inference_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    expected = {"auto": (torch.float32, torch.bfloat16), "float32": (torch.float32,) * 2, "bfloat16": (torch.bfloat16,) * 2}
    assert (inference_dtype(cpu, precision), inference_dtype(gpu, precision)) == expected[precision]
