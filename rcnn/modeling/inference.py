"""A trained network made ready to extract features: folded, on fast kernels, in the right precision.

Nothing here changes what a network computes beyond float rounding, and nothing here is ever
trained or saved: stages call :func:`for_inference` on a loaded checkpoint before extracting.
"""

from __future__ import annotations

import os
import platform

import numpy as np
import torch
from torch import nn

from rcnn.modeling.models import DetectorNet, channels_last
from rcnn.modeling.svd import TruncatedLinear, compress_fc


def to_float16(x: torch.Tensor) -> np.ndarray:
    """``x`` as a contiguous float16 numpy array (the feature caches' type), rounded to nearest even.

    Bit-identical to ``x.float().numpy().astype(np.float16)`` but about 8x faster on a CPU: numpy
    converts element by element, torch with vector instructions (and on the GPU, before the copy).
    """
    return x.detach().to(torch.float16).contiguous().cpu().numpy()


def to_float32(x: np.ndarray) -> np.ndarray:
    """A float16 array (a feature cache's) as float32: exact, like ``x.astype(np.float32)``, and about 4x
    faster on a CPU, for the same reason as :func:`to_float16`."""
    return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """Fold every batch norm that directly follows a convolution into that convolution, in place.

    In eval mode a batch norm is a per-channel affine map, so ``conv -> bn`` equals one convolution
    with rescaled weights and a bias (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`); the batch
    norm becomes an identity. Outputs agree up to float rounding and one pass over the activations
    is saved (the demo's tiny trunk on a 512 px image: about 2x faster on a CPU). Only for inference:
    the folded model cannot train its batch norms, and its state dict no longer fits a checkpoint.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        fold_batch_norm(child)
    if isinstance(module, nn.Sequential):
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module[i] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                module[i + 1] = nn.Identity()
    return module


@torch.no_grad()
def flush_denormals(tensors) -> None:
    """Set every subnormal value of the floating-point ``tensors`` (float32 magnitudes below 1.2e-38) to zero,
    in place, without reading any value back to the host.

    A processor computes with subnormal operands in microcode, many times slower than with normal ones,
    unless the thread runs with flush-to-zero, which ``torch.set_flush_denormal`` sets for the calling
    thread only, not for the threads a matrix product runs on. Training leaves some (the demo's fine-tuned
    SPP-net fc6 held 27,117 of its 516,096 weights below that bound), and on the 2-core Xeon they made that
    fc6 take 78 ms per call instead of 2.3 ms. A subnormal weight adds less than 1e-38 times its input to
    a sum: zero for every output that is not itself about that small.
    """
    for t in tensors:
        if t.is_floating_point() and t.numel():
            t.masked_fill_(t.abs() < torch.finfo(t.dtype).tiny, 0)


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The precision networks compute in (``model.precision``): ``auto`` is bfloat16 on a GPU, float32 on a CPU.

    The same for both methods and every layer they run (trunk, crops and fc layers), so their timings
    compare like with like.
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def for_inference(
    model: DetectorNet,
    whole_images: bool = False,
    dtype: torch.dtype | str | None = None,
    svd: tuple[int | None, int | None] = (None, None),
) -> DetectorNet:
    """``model`` ready to extract features, in place: eval mode, batch norms folded into the convs,
    fc6's input scale folded into its weights, the weights in ``dtype`` (or a ``model.precision`` name; default
    :func:`inference_dtype`'s ``auto``). ``svd`` gives ranks for fc6 and fc7's truncated SVDs
    (:func:`rcnn.modeling.svd.compress_fc`; Fast R-CNN's test-time compression), the only option here that
    changes what the network computes beyond rounding.

    The weights go channels-last where :func:`rcnn.modeling.models.channels_last` says (on a GPU, and on a
    CPU for ``whole_images``: SPP-net's trunk sees each image once, at full size). Numbers agree with the
    trained model up to float rounding; training never sees this form, so checkpoints do not depend on it.

    In a lower precision (bfloat16 on a GPU) the weights are cast once, here, and :func:`inference_autocast`
    then casts only the inputs: under autocast with float32 weights every chunk of regions would cast every
    weight again (autocast forgets its casts when its block ends), 61 M of them for AlexNet.

    Subnormal weights are set to zero (:func:`flush_denormals`). On an x86-64 CPU in float32, fc6 and
    fc7 also become :class:`OneDNNLinear` with their ReLUs fused (see there; about 2x faster on AMD
    processors). Set ``RCNN_ONEDNN_LINEAR=0`` to keep ``nn.Linear``.
    """
    model.eval()
    device = next(model.parameters()).device
    if not isinstance(dtype, torch.dtype):
        dtype = inference_dtype(device, dtype or "auto")
    fold_batch_norm(model.trunk)
    if isinstance(model.fc6, nn.Linear):
        with torch.no_grad():  # fc6(s x) = (s W) x + b: the input scale moves into the weights
            model.fc6.weight.mul_(model.fc6_input_scale)
            model.fc6_input_scale.fill_(1.0)
    model.input_scale_folded = True
    compress_fc(model, *svd)  # after folding: the factors approximate the weights fc6 computes with
    flush_denormals(model.parameters())  # after folding, which can make more
    if dtype != torch.float32:
        model.to(dtype)
    elif onednn_linear_helps(device):
        # Each fc layer takes over its ReLU (an identity from then on).
        model.fc6, model.relu6 = _onednn(model.fc6), nn.Identity()
        model.fc7, model.relu7 = _onednn(model.fc7), nn.Identity()
    return model.to(memory_format=torch.channels_last) if channels_last(device, whole_images) else model


def _onednn(layer: nn.Module) -> nn.Module:
    """An fc layer and its ReLU as :class:`OneDNNLinear`; a truncated SVD's two factors each, the ReLU with the
    second."""
    if isinstance(layer, TruncatedLinear):
        return TruncatedLinear(OneDNNLinear.of(layer.first), OneDNNLinear.of(layer.second, relu=True))
    return OneDNNLinear.of(layer, relu=True)


#: Set to 0 to keep fc layers on ``nn.Linear`` (MKL's sgemm) at inference on a CPU.
ENV_ONEDNN_LINEAR = "RCNN_ONEDNN_LINEAR"


def onednn_linear_helps(device: torch.device) -> bool:
    """Whether :func:`for_inference` runs fc layers through oneDNN: on x86-64 CPUs with oneDNN."""
    return (
        device.type == "cpu"
        and os.environ.get(ENV_ONEDNN_LINEAR, "1") != "0"
        and torch.backends.mkldnn.is_available()
        and platform.machine().lower() in ("x86_64", "amd64")
    )


class OneDNNLinear(nn.Module):
    """An inference-only ``nn.Linear``, optionally followed by its ReLU, computed by oneDNN (float32, CPU).

    On a CPU ``nn.Linear`` calls MKL's sgemm, which on AMD processors runs its AVX2 code; oneDNN
    (which already runs the convolutions) uses AVX-512 where the processor has it. On a 2-core
    AMD EPYC (Zen 5) SPP-net's fc6 on the demo (about 540 windows x 4,800 -> 256) took 6.3 ms
    through MKL and 3.3 ms here. On Intel processors both run AVX-512 code at about the same speed.

    With ``relu`` the ReLU is applied by the same oneDNN call, on the output while it is still
    in cache, instead of as another pass over it. Where this torch has oneDNN's fused operator
    (``torch.ops.mkldnn._linear_pointwise``, which torch's own compiler emits for CPUs) plain
    tensors go in and come out; otherwise the input is converted to oneDNN's layout and back,
    about 0.5 ms more on SPP-net's fc6 above. Outputs equal ``nn.Linear``'s (and ReLU's) up to
    float rounding: the sums are taken in another order.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.relu = relu
        # Plain attributes, not parameters: this module is never trained, saved or moved.
        self.weight = weight.detach().float().contiguous()
        self.bias = (bias.detach() if bias is not None else weight.new_zeros(weight.shape[0])).float().contiguous()
        self.fused = _has_fused_linear()
        if not self.fused:  # oneDNN's own blocked layout for the unfused operator
            self.weight, self.bias = self.weight.to_mkldnn(), self.bias.to_mkldnn()

    @classmethod
    def of(cls, layer: nn.Module, relu: bool = False) -> nn.Module:
        """``layer`` (an ``nn.Linear``) as a :class:`OneDNNLinear`; a :class:`OneDNNLinear` is returned as it is."""
        return layer if isinstance(layer, cls) else cls(layer.weight, layer.bias, relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros((0, self.out_features), dtype=torch.float32)
        x = x.float().contiguous()
        if self.fused:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "relu" if self.relu else "none", [], "")
        y = torch.ops.aten.mkldnn_linear(x.to_mkldnn(), self.weight, self.bias).to_dense()
        return torch.relu_(y) if self.relu else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, relu={self.relu}, fused={self.fused}"


def _has_fused_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def inference_autocast(model: nn.Module) -> torch.autocast:
    """Autocast to the precision of ``model``'s weights (see :func:`for_inference`), which then casts only
    the inputs (images, crops, pooled windows); off for float32 weights."""
    weight = next(model.parameters())
    low = weight.dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(weight.device.type, dtype=weight.dtype if low else torch.bfloat16, enabled=low)
