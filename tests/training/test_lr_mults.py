"""Fine-tuning's optimiser: R-CNN's per-layer rates and weight decay (its prototxt's multipliers), and cuDNN's flags."""

from __future__ import annotations

import torch

from rcnn.modeling.models import build_model
from rcnn.training.finetune import Schedule


def _groups_by_param(schedule: Schedule, model, trainable) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in schedule.make_optimizer(model, trainable).param_groups:
        for p in group["params"]:
            out[names[id(p)]] = (group["lr"], group["weight_decay"])
    return out


def test_rcnn_multipliers_give_biases_twice_the_rate_without_decay_and_the_classifier_ten_times():
    model = build_model("tiny", 3, 32)
    schedule = Schedule(max_iter=10, lr=0.01, weight_decay=0.0005)
    got = _groups_by_param(schedule, model, list(model.parameters()))
    assert set(got) == {n for n, _ in model.named_parameters()}
    assert got["fc6.weight"] == (0.01, 0.0005)
    assert got["fc6.bias"] == (0.02, 0.0)
    assert got["classifier.weight"] == (0.1, 0.0005)
    assert abs(got["classifier.bias"][0] - 0.2) < 1e-12 and got["classifier.bias"][1] == 0.0
    conv_weights = [n for n in got if n.startswith("trunk.") and n.endswith(".weight")]  # batch-norm scales too
    assert conv_weights and all(got[n] == (0.01, 0.0005) for n in conv_weights)


def test_rates_follow_the_step_schedule_in_every_group():
    model = build_model("tiny", 3, 32)
    schedule = Schedule(max_iter=10, lr=0.01, step_size=5, gamma=0.1)
    optimizer = schedule.make_optimizer(model, list(model.parameters()))
    schedule.set_lr(optimizer, 7)
    rates = sorted(round(g["lr"] / 0.001, 9) for g in optimizer.param_groups)
    assert rates == [1.0, 2.0, 10.0, 20.0]


def test_only_trainable_parameters_are_optimised():
    model = build_model("tiny", 3, 32, spp_levels=(2, 1))
    head = [p for n, p in model.named_parameters() if not n.startswith("trunk.")]
    optimizer = Schedule(max_iter=1).make_optimizer(model, head)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == len(head) and {id(p) for p in params} == {id(p) for p in head}


def test_uniform_settings_train_exactly_as_one_group():
    """The demo's settings (every multiplier 1, biases decayed): the same steps as a plain optimiser."""
    torch.manual_seed(0)
    a, b = build_model("tiny", 3, 32).eval(), build_model("tiny", 3, 32).eval()  # eval: no dropout masks to differ
    b.load_state_dict(a.state_dict())
    for name in ("sgd", "adam"):
        schedule = Schedule(
            max_iter=3, lr=0.01, optimizer=name, bias_lr_mult=1, bias_decay=True, classifier_lr_mult=1, weight_decay=0.001
        )
        ours = schedule.make_optimizer(a, list(a.parameters()))
        assert len(ours.param_groups) == 1
        if name == "sgd":
            plain = torch.optim.SGD(b.parameters(), lr=0.01, momentum=0.9, weight_decay=0.001)
        else:
            plain = torch.optim.Adam(b.parameters(), lr=0.01, weight_decay=0.001)
        x = torch.randn(4, 3, 32, 32)
        for _ in range(3):
            for model, opt in ((a, ours), (b, plain)):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa, pb), n


def test_fine_tunings_cudnn_settings_last_only_while_it_runs():
    # They were set for the rest of the process: a `rcnn run` then extracted features with deterministic kernels.
    import torch

    from rcnn.training.finetune import deterministic_cudnn

    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
        with deterministic_cudnn(torch.device("cuda")):  # the flags can be set without a card
            assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
        with deterministic_cudnn(torch.device("cpu")):
            assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def test_float32_turns_tf32_off_while_a_stage_computes(pipelines_file, tmp_path, capsys, monkeypatch):
    # model.precision: float32 on an NVIDIA card still let cuDNN use TF32 (a 10-bit mantissa) for convolutions.
    from conftest import run_cli

    from rcnn.runtime import strict_float32
    from rcnn.stages import proposals

    seen = []
    real = proposals.compute

    def recording(ctx, split, work):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return real(ctx, split, work)

    monkeypatch.setattr(proposals, "compute", recording)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    common = ["proposals", "tiny", "--pipelines-file", str(pipelines_file), "--quiet"]
    assert run_cli([*common, "--runs-dir", str(tmp_path / "a"), "--set", "model.precision=float32"], capsys)[0] == 0
    assert seen == [(False, False)] * 2
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before  # restored
    seen.clear()
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
    assert run_cli([*common, "--runs-dir", str(tmp_path / "b")], capsys)[0] == 0
    assert seen[0][0] is True  # auto (bfloat16 on a GPU) leaves the flags alone
    with strict_float32(False):
        assert torch.backends.cudnn.allow_tf32 is True
