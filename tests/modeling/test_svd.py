"""Truncated SVD of fc layers (Fast R-CNN section 3.1) against numpy's SVD, and inside a model made ready for
inference (with the fc6 input scale folded first, on nn.Linear and on oneDNN's layers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rcnn.modeling import inference
from rcnn.modeling.inference import ENV_ONEDNN_LINEAR, OneDNNLinear, for_inference
from rcnn.modeling.models import build_model
from rcnn.modeling.svd import TruncatedLinear, compress_fc, truncated_svd


def _linear(out_dim: int, in_dim: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_dim, out_dim)
    nn.init.normal_(layer.bias)
    return layer


def test_truncated_svd_is_numpys_best_rank_t_approximation():
    layer = _linear(40, 60)
    x = torch.randn(7, 60)
    compressed = truncated_svd(layer, 5)
    assert isinstance(compressed, TruncatedLinear) and compressed.rank == 5
    assert compressed.first.bias is None and compressed.first.weight.shape == (5, 60)
    assert compressed.second.weight.shape == (40, 5)
    w = layer.weight.detach().double().numpy()
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    approx = (u[:, :5] * s[:5]) @ vh[:5]
    expected = x.double().numpy() @ approx.T + layer.bias.detach().double().numpy()
    with torch.no_grad():
        np.testing.assert_allclose(compressed(x).double().numpy(), expected, rtol=1e-4, atol=1e-4)
        # Eckart-Young: what is left out is exactly the discarded singular values' energy.
        product = (compressed.second.weight @ compressed.first.weight).double().numpy()
    assert np.linalg.norm(w - product) == pytest.approx(np.sqrt((s[5:] ** 2).sum()), rel=1e-4)


def test_a_weight_of_low_rank_is_recovered_exactly():
    layer = _linear(30, 50)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(30, 3) @ torch.randn(3, 50))
    x = torch.randn(4, 50)
    with torch.no_grad():
        torch.testing.assert_close(truncated_svd(layer, 3)(x), layer(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(truncated_svd(layer, 2)(x), layer(x), rtol=1e-2, atol=1e-2)


def test_a_rank_that_would_not_save_work_leaves_the_layer_as_it_is():
    layer = _linear(8, 8)
    assert truncated_svd(layer, 4) is layer  # 4 (8 + 8) = 64 weights, as many as the layer's
    assert isinstance(truncated_svd(layer, 3), TruncatedLinear)
    with pytest.raises(ValueError):
        truncated_svd(layer, 0)
    model = build_model("tiny", 3, 64, 32)
    fc7 = model.fc7
    compress_fc(model, 4, None)
    assert isinstance(model.fc6, TruncatedLinear) and model.fc7 is fc7
    fc6 = model.fc6
    compress_fc(model, 2, None)  # compressed already: left as it is
    assert model.fc6 is fc6 and fc6.rank == 4


def _low_rank_tiny(rank: int) -> nn.Module:
    """A tiny net whose fc6 and fc7 weights have rank ``rank``: their SVDs of that rank are exact."""
    torch.manual_seed(2)
    model = build_model("tiny", 3, 64, 32).eval()
    with torch.no_grad():
        for layer in (model.fc6, model.fc7):
            out_dim, in_dim = layer.weight.shape
            layer.weight.copy_(torch.randn(out_dim, rank) @ torch.randn(rank, in_dim) / in_dim)
    model.fc6_input_scale.fill_(0.25)  # folded into fc6 before it is factorised
    return model


@pytest.mark.parametrize("onednn", ["1", "0"])
def test_for_inference_with_svd_computes_the_heads_outputs(onednn, monkeypatch):
    monkeypatch.setenv(ENV_ONEDNN_LINEAR, onednn)
    model = _low_rank_tiny(4)
    pooled = torch.rand(6, model.spec.pool5_dim) * 10
    with torch.no_grad():
        plain = model.head(pooled, ("fc6", "fc7"))
        for_inference(model, svd=(4, 4))
        assert isinstance(model.fc6, TruncatedLinear) and isinstance(model.fc7, TruncatedLinear)
        if inference.onednn_linear_helps(torch.device("cpu")):
            assert isinstance(model.fc6.second, OneDNNLinear) and model.fc6.second.relu
            assert isinstance(model.fc6.first, OneDNNLinear) and not model.fc6.first.relu
        compressed = model.head(pooled, ("fc6", "fc7"))
        for_inference(model, svd=(4, 4))  # a second call changes nothing
        torch.testing.assert_close(model.head(pooled, ("fc7",))["fc7"], compressed["fc7"])
    for layer in ("fc6", "fc7"):
        torch.testing.assert_close(compressed[layer], plain[layer], rtol=1e-3, atol=1e-3)
    assert (compressed["fc7"] >= 0).all() and (compressed["fc7"] == 0).any()  # the ReLU after the second factor


def test_for_inference_with_svd_in_bfloat16_computes_what_float32_does(monkeypatch):
    monkeypatch.setenv(ENV_ONEDNN_LINEAR, "0")
    pooled = torch.rand(6, build_model("tiny", 3, 64, 32).spec.pool5_dim) * 10
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _low_rank_tiny(4)
        with torch.no_grad():
            for_inference(model, dtype=dtype, svd=(4, 2))
            assert model.fc6.first.weight.dtype == dtype and model.fc7.rank == 2
            outputs[dtype] = model.head(pooled.to(dtype))["fc7"].float()
    scale = outputs[torch.float32].abs().max()
    torch.testing.assert_close(outputs[torch.bfloat16], outputs[torch.float32], rtol=0.03, atol=0.03 * float(scale))
