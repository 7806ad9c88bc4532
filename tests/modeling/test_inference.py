"""Inference preparation: folded batch norms and fc6 scale, oneDNN fc layers, float16 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcnn.modeling import inference
from rcnn.modeling.inference import (
    ENV_ONEDNN_LINEAR,
    OneDNNLinear,
    fold_batch_norm,
    for_inference,
    onednn_linear_helps,
    to_float16,
)
from rcnn.modeling.models import build_model


def _trained_looking_tiny(spp_levels=None) -> torch.nn.Module:
    """A tiny net whose batch norms hold non-trivial statistics, as after training."""
    torch.manual_seed(1)
    model = build_model("tiny", 3, 64, 32, spp_levels=spp_levels)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("whole_images", [False, True])
def test_for_inference_folds_batch_norm_and_fc6_scale_without_changing_outputs(whole_images):
    model = _trained_looking_tiny(spp_levels=(2, 1) if whole_images else None)
    model.fc6_input_scale.fill_(0.01)
    images = torch.randn(5, 3, 64, 64)
    pooled = torch.rand(5, model.spec.pool5_dim) * 100
    with torch.no_grad():
        maps, head = model.trunk(images), model.head(pooled, ("fc6", "fc7"))
        for_inference(model, whole_images=whole_images)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert float(model.fc6_input_scale) == 1.0
        torch.testing.assert_close(model.trunk(images), maps, rtol=1e-4, atol=1e-4)
        folded = model.head(pooled, ("fc6", "fc7"))
        for layer in ("fc6", "fc7"):
            torch.testing.assert_close(folded[layer], head[layer], rtol=1e-4, atol=1e-4)
        # a second call changes nothing
        for_inference(model, whole_images=whole_images)
        torch.testing.assert_close(model.head(pooled, ("fc7",))["fc7"], folded["fc7"])
    assert model.trunk[0].weight.is_contiguous(memory_format=torch.channels_last) == whole_images


def test_fold_batch_norm_leaves_a_convolution_without_batch_norm_alone():
    conv = torch.nn.Conv2d(3, 4, 3)
    net = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.BatchNorm2d(4).eval())
    fold_batch_norm(net)
    assert net[0] is conv and isinstance(net[2], torch.nn.BatchNorm2d)  # the batch norm follows a ReLU


def test_to_float16_rounds_exactly_as_numpy():
    x = torch.cat([torch.randn(10_000) * s for s in (1e-7, 1e-4, 1.0, 1e3, 6e4, 1e5)])
    x = torch.cat([x, torch.tensor([65504.0, 65519.0, 65520.0, 2.0**-24 * 1.5, float("inf"), -float("inf")])])
    x = x[: len(x) // 2 * 2].view(2, -1).t()  # a transposed (non-contiguous) view, as channels-last maps are
    got = to_float16(x)
    with np.errstate(over="ignore"):  # 1e5 and 65520 round to infinity, on both sides
        want = x.numpy().astype(np.float16)
    assert got.dtype == np.float16 and got.flags.c_contiguous
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_nn_linear(bias, relu, fused, monkeypatch):
    if fused and not inference._has_fused_linear():
        pytest.skip("this torch has no fused oneDNN linear operator")
    monkeypatch.setattr(inference, "_has_fused_linear", lambda: fused)
    torch.manual_seed(0)
    layer = torch.nn.Linear(300, 70, bias=bias)
    fast = OneDNNLinear.of(layer, relu=relu)
    assert OneDNNLinear.of(fast) is fast and fast.fused == fused

    def reference(x):
        y = layer(x)
        return torch.relu(y) if relu else y

    for rows in (1, 37):
        x = torch.randn(rows, 300) * 5
        with torch.no_grad():
            torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-4)
            assert relu == bool((fast(x) >= 0).all())  # about half the outputs are negative without the ReLU
    # a non-contiguous input (a transposed view), a float16 one, and no rows at all
    x = torch.randn(300, 9).t()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fast(x.half()), reference(x.half().float()), rtol=1e-5, atol=1e-4)
    assert fast(torch.zeros(0, 300)).shape == (0, 70)


@needs_onednn
def test_for_inference_uses_onednn_linear_where_it_helps(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert onednn_linear_helps(cpu) and not onednn_linear_helps(torch.device("cuda"))
    model = for_inference(_trained_looking_tiny())
    assert isinstance(model.fc6, OneDNNLinear) and isinstance(model.fc7, OneDNNLinear)
    # each takes over its ReLU
    assert model.fc6.relu and model.fc7.relu
    assert isinstance(model.relu6, torch.nn.Identity) and isinstance(model.relu7, torch.nn.Identity)
    monkeypatch.setattr("platform.machine", lambda: "arm64")
    assert not onednn_linear_helps(cpu)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setenv(ENV_ONEDNN_LINEAR, "0")
    assert not onednn_linear_helps(cpu)
    model = for_inference(_trained_looking_tiny())
    assert type(model.fc6) is torch.nn.Linear and type(model.fc7) is torch.nn.Linear


def test_to_float32_is_numpys_exact_conversion():
    import numpy as np

    from rcnn.modeling.inference import to_float32

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 70)) * 1e3).astype(np.float16)
    x[0, :4] = [np.inf, -np.inf, 0.0, -0.0]
    x[1, :2] = [np.float16(6e-8), np.float16(65504)]  # a subnormal and the largest float16
    got = to_float32(x[::2])  # a strided view too
    assert got.dtype == np.float32 and np.array_equal(got, x[::2].astype(np.float32))
    assert np.signbit(got[0, 3])
