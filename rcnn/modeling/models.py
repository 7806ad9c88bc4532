"""Backbones: a conv trunk, the pool5 layer, an fc6/fc7 head and an N+1-way classifier, built from torchvision or small.

Every backbone exposes the same parts, so stages never special-case one:
``trunk`` (image -> conv5 feature map), ``pool5`` (conv5 map -> fixed grid),
``head`` (pool5 -> fc7, fc6 inside) and ``classifier`` (fc7 -> C+1 logits, class 0
is background), plus the input size, the trunk's stride and its input normalisation.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
from torch import nn

from rcnn.errors import UserError
from rcnn.modeling.spp import bins_order

#: How SPP-net's pyramid vectors are laid out for fc6 (:data:`rcnn.modeling.spp.LAYOUTS`): bin-major, each bin's
#: channels side by side, as the sparse tables pool them. Checkpoints record it; those written before
#: it existed hold fc6 weights for the channel-major layout and are rearranged when loaded.
PYRAMID_LAYOUT = "bins"

# torchvision's ImageNet normalisation (RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = ("alexnet", "vgg16", "squeezenet1_0", "tiny")
#: The layers whose outputs a model gives as region features (:meth:`DetectorNet.extract`).
FEATURE_LAYERS = ("pool5", "fc6", "fc7")


@dataclass(frozen=True)
class BackboneSpec:
    """What stages need to know about a backbone."""

    name: str
    input_size: int  # side of the warped region fed to the network
    stride: int  # total stride of the trunk (conv5), for SPP window mapping
    trunk_channels: int
    pool5_grid: int  # pool5 is trunk_channels x grid x grid at input_size
    fc_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # SPP-net: fc6 reads a spatial pyramid of these levels instead of pool5.
    spp_levels: tuple[int, ...] | None = None
    # Where conv5 cell j's receptive field is centred: image pixel index ``stride * j + offset``
    # (:func:`trunk_offset`; 0 with the SPP-net paper's padding of floor(p/2) in every layer).
    offset: float = 0.0

    @property
    def pool5_dim(self) -> int:
        """Width of the vector fc6 reads: pool5 flattened, or the pyramid-pooled window for SPP-net."""
        if self.spp_levels:
            return self.trunk_channels * sum(n * n for n in self.spp_levels)
        return self.trunk_channels * self.pool5_grid * self.pool5_grid

    @property
    def mean_pixel(self) -> tuple[float, float, float]:
        """The mean as RGB 0-255 values: the fill of warped regions outside the image."""
        return tuple(255.0 * m for m in self.mean)


class DetectorNet(nn.Module):
    """trunk -> pool5 -> head (fc6, fc7) -> classifier, with access to each layer's output."""

    def __init__(
        self,
        spec: BackboneSpec,
        trunk: nn.Module,
        pool5: nn.Module,
        fc6: nn.Linear,
        fc7: nn.Linear,
        num_classes: int,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.pool5 = pool5
        self.fc6 = fc6
        self.fc7 = fc7
        # R-CNN's features are fc6 and fc7 after their ReLUs. Modules rather than calls, so inference can
        # fuse each into its fc layer (rcnn.modeling.inference.for_inference); they hold no weights.
        self.relu6 = nn.ReLU(inplace=True)
        self.relu7 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(fc7.out_features, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        # A fixed factor on fc6's input, saved with the weights: 1 except where fc6 starts afresh on
        # features of arbitrary magnitude (SPP-net's pyramid over a trunk trained without it).
        self.register_buffer("fc6_input_scale", torch.ones(()))
        self.input_scale_folded = False  # set by rcnn.modeling.inference.for_inference, which folds it into fc6

    def head(self, pool5: torch.Tensor, layers: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """fc6 and fc7 (after ReLU, as R-CNN's cached features) from pool5 ``[B, C, g, g]``.

        ``pool5`` may be float16 (SPP-net's pyramids pooled from the cached maps): fc6 reads it as float32.
        """
        out = {}
        # Dropout after fc6 and fc7, where R-CNN's (Caffe's) AlexNet has drop6 and drop7.
        # In the fc layers' precision: float32, or for inference on a GPU bfloat16 straight from SPP-net's float16.
        # Read from the classifier, an nn.Linear always: fc6 may be oneDNN's or a truncated SVD's two factors.
        x = torch.flatten(pool5, 1).to(self.classifier.weight.dtype)
        if not self.input_scale_folded:
            # Multiplied, never read: reading the factor on a GPU would wait for the device at every call,
            # and times 1 is exact.
            x = x * self.fc6_input_scale
        fc6 = self.relu6(self.fc6(x))
        if "fc6" in layers:
            out["fc6"] = fc6
        fc7 = self.relu7(self.fc7(self.dropout(fc6)))
        out["fc7"] = fc7
        return out

    def extract(self, images: torch.Tensor, layers: tuple[str, ...] = ("pool5", "fc7")) -> dict[str, torch.Tensor]:
        """Named layer outputs for normalised images ``[B, 3, S, S]``: pool5 flattened, fc6, fc7."""
        pool5 = self.pool5(self.trunk(images))
        out = self.head(pool5, layers)
        out["pool5"] = torch.flatten(pool5, 1)
        return {k: out[k] for k in layers}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C+1]`` for normalised images ``[B, 3, S, S]``."""
        fc7 = self.head(self.pool5(self.trunk(images)))["fc7"]
        return self.classifier(self.dropout(fc7))


def _tiny(num_classes: int, input_size: int, fc_dim: int) -> DetectorNet:
    """A small CNN that trains from scratch on a laptop CPU in a minute (for the demo and tests)."""

    def block(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
        # Batch norm lets this net train from scratch in a few hundred SGD steps.
        return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    trunk = nn.Sequential(
        *block(3, 32, 5, 2),
        nn.MaxPool2d(2),
        *block(32, 64, 3),
        nn.MaxPool2d(2),
        *block(64, 96, 3),
        *block(96, 96, 3),
    )
    grid = input_size // 16
    spec = BackboneSpec("tiny", input_size, 8, 96, grid, fc_dim, IMAGENET_MEAN, IMAGENET_STD)
    pool5 = nn.MaxPool2d(2)
    return DetectorNet(spec, trunk, pool5, nn.Linear(spec.pool5_dim, fc_dim), nn.Linear(fc_dim, fc_dim), num_classes)


def trunk_offset(trunk: nn.Module, stride: int) -> float:
    """The image pixel index ``o`` on which the receptive field of conv5 cell ``j`` is centred, less ``stride * j``.

    SPP-net's window mapping (He et al., appendix A) assumes each layer with a ``p x p`` filter is
    padded by floor(p/2), which centres cell ``j`` on pixel ``S j``; "if the padding is not floor(p/2),
    we need to add a proper offset". A layer with kernel ``k``, stride ``s``, padding ``p`` and
    dilation ``d`` centres its output ``j`` on input position ``s j - p + d (k - 1) / 2``; composing
    the trunk's convolutions and poolings in order gives ``S j + o``. Layers side by side (SqueezeNet's
    fire modules) must agree, which holds for every backbone here: each of their filters keeps centres.
    """
    scale, offset = 1.0, 0.0
    for layer in trunk.modules():
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p, d = (_pair(getattr(layer, a, 1)) for a in ("kernel_size", "stride", "padding", "dilation"))
            if k[0] != k[1] or s[0] != s[1] or p[0] != p[1] or d[0] != d[1]:
                raise ValueError(f"{layer} is not the same along both axes: one offset cannot place its cells")
            k, s, p, d = k[0], s[0], p[0], d[0]
            offset += scale * (d * (k - 1) / 2 - p)
            scale *= s
    if scale != stride:
        raise ValueError(f"the trunk's layers compose to stride {scale:g}, not {stride}")
    return offset


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _grid(trunk: nn.Module, pool5: nn.Module, size: int) -> int:
    with torch.no_grad():
        return int(pool5(trunk(torch.zeros(1, 3, size, size))).shape[-1])


def _torchvision(name: str, num_classes: int, input_size: int | None, fc_dim: int | None) -> DetectorNet:
    import torchvision

    net = torchvision.models.get_model(name, weights=None)
    if name == "alexnet":
        # conv5 + ReLU is the trunk (stride 16); its max-pool is pool5 (6 x 6 at 227 px, as in R-CNN).
        size = input_size or 227
        trunk, pool5 = net.features[:-1], net.features[-1]
        fc6, fc7 = net.classifier[1], net.classifier[4]
        spec = BackboneSpec(name, size, 16, 256, _grid(trunk, pool5, size), 4096, IMAGENET_MEAN, IMAGENET_STD)
    elif name == "vgg16":
        size = input_size or 224
        trunk, pool5 = net.features[:-1], net.features[-1]
        fc6, fc7 = net.classifier[0], net.classifier[3]
        spec = BackboneSpec(name, size, 16, 512, _grid(trunk, pool5, size), 4096, IMAGENET_MEAN, IMAGENET_STD)
    elif name == "squeezenet1_0":
        # The conv trunk up to fire9; a new fc6/fc7 head is learned during fine-tuning.
        size = input_size or 227
        trunk = net.features
        pool5 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        dim = fc_dim or 1024
        spec = BackboneSpec(name, size, 16, 512, _grid(trunk, pool5, size), dim, IMAGENET_MEAN, IMAGENET_STD)
        fc6, fc7 = nn.Linear(spec.pool5_dim, dim), nn.Linear(dim, dim)
        for layer in (fc6, fc7):
            nn.init.normal_(layer.weight, std=0.005)
            nn.init.constant_(layer.bias, 0.1)
        return DetectorNet(spec, trunk, pool5, fc6, fc7, num_classes)
    else:
        raise ValueError(name)
    if fc_dim not in (None, 4096):
        raise UserError(f"backbone {name} has pretrained 4096-d fc6/fc7; model.fc_dim must be 4096 or null")
    return DetectorNet(spec, trunk, pool5, fc6, fc7, num_classes)


def build_model(
    backbone: str,
    num_classes: int,
    input_size: int | None = None,
    fc_dim: int | None = None,
    seed: int = 0,
    spp_levels: tuple[int, ...] | None = None,
) -> DetectorNet:
    """An untrained ``backbone`` with a ``num_classes``-way classifier (C objects + background).

    With ``spp_levels`` fc6 reads SPP-net's pyramid-pooled window vector instead of pool5,
    so it is a new layer even for backbones whose fc6 is pretrained.
    """
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone '{backbone}' (choose from {', '.join(BACKBONES)})")
    torch.manual_seed(seed)
    if backbone == "tiny":
        model = _tiny(num_classes, input_size or 64, fc_dim or 256)
    else:
        model = _torchvision(backbone, num_classes, input_size, fc_dim)
    model.spec = replace(model.spec, offset=trunk_offset(model.trunk, model.spec.stride))
    if spp_levels:
        model.spec = replace(model.spec, spp_levels=tuple(spp_levels))
        model.fc6 = nn.Linear(model.spec.pool5_dim, model.fc7.in_features)
        nn.init.normal_(model.fc6.weight, std=0.005)
        nn.init.constant_(model.fc6.bias, 0.1)
        # Drawn for SPP-net's channel-major pyramid, rearranged for the bin-major one the pipeline pools:
        # a seed gives the same network in either layout.
        with torch.no_grad():
            model.fc6.weight.copy_(fc6_for_bins(model.fc6.weight, model.spec))
    return model


def add_box_head(model: DetectorNet) -> DetectorNet:
    """``model`` with Fast R-CNN's ``bbox_pred`` layer, ``4 (C + 1)`` deltas from fc7 (initialised as in the
    paper: zero-mean Gaussian, standard deviation 0.001, biases 0), and buffers holding the targets' per-output
    mean and standard deviation (0 and 1 until :meth:`rcnn.methods.fast_regions.FastRegions.normalise_targets` sets them)."""
    outputs = 4 * model.classifier.out_features
    model.bbox_pred = nn.Linear(model.classifier.in_features, outputs)
    nn.init.normal_(model.bbox_pred.weight, std=0.001)
    nn.init.zeros_(model.bbox_pred.bias)
    model.register_buffer("bbox_mean", torch.zeros(outputs))
    model.register_buffer("bbox_std", torch.ones(outputs))
    return model


def fc6_for_bins(weight: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """SPP-net fc6 weights for channel-major pyramids, rearranged for :data:`PYRAMID_LAYOUT` (``W x`` unchanged)."""
    return weight[:, bins_order(spec.trunk_channels, spec.spp_levels)].contiguous()


# ----------------------------------------------------------------------------- weights


# ----------------------------------------------------------------------------- checkpoints


def normalise_crops(crops, spec: BackboneSpec, device: torch.device) -> torch.Tensor:
    """uint8 RGB crops ``[B, S, S, 3]`` (numpy) -> normalised float ``[B, 3, S, S]`` on ``device``."""
    x = torch.from_numpy(crops).to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    scale, shift = pixel_affine(spec, device)
    return x.mul_(scale).sub_(shift)


def pixel_affine(spec: BackboneSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 / (255 std), mean / std)`` per channel ``[3, 1, 1]``: ``x * scale - shift`` takes 0-255 RGB
    to the backbone's input, ``(x / 255 - mean) / std``, in two in-place passes. Made once per device and
    kept (read-only): on a GPU each making is a copy from the host, which waits for the device's queue."""
    return _pixel_affine(tuple(spec.std), tuple(spec.mean), torch.device(device))


def normalised_fill(spec: BackboneSpec) -> tuple[float, float, float]:
    """The warp's fill (:attr:`BackboneSpec.mean_pixel`) as the network sees it after normalisation: the
    fill of crops warped from an image normalised beforehand (zero for the mean pixel itself)."""
    return tuple(float((p / 255.0 - m) / s) for p, m, s in zip(spec.mean_pixel, spec.mean, spec.std))


@functools.lru_cache(maxsize=32)
def _pixel_affine(std: tuple, mean: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.tensor(std, device=device).view(3, 1, 1)
    return 1.0 / (255.0 * s), torch.tensor(mean, device=device).view(3, 1, 1) / s


#: ``1`` or ``0`` forces :func:`channels_last` on or off, to measure one layout against the other.
ENV_CHANNELS_LAST = "RCNN_CHANNELS_LAST"


def channels_last(device: torch.device, whole_images: bool = False) -> bool:
    """Whether a network on ``device`` keeps its conv weights, and so its activations, channels-last (NHWC).

    On a GPU, yes: cuDNN's tensor-core kernels for half-precision convolutions work in NHWC, which is why
    PyTorch's performance guide recommends this layout with autocast, and how the benchmarks' stock baseline
    runs. On a CPU, only for whole images (SPP-net's trunk: about 2x faster with oneDNN on one large image);
    batches of R-CNN's small crops gained nothing (1407 against 1431 ms per 256 SqueezeNet crops of 227 px).
    The layout changes no value beyond float rounding.
    """
    forced = os.environ.get(ENV_CHANNELS_LAST)
    if forced in ("0", "1"):
        return forced == "1"
    return whole_images or device.type == "cuda"


def to_training_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` moved to ``device`` for fine-tuning, in the layout :func:`channels_last` picks there for
    R-CNN's crops (checkpoints hold the same values either way)."""
    return model.to(device, memory_format=torch.channels_last if channels_last(device) else torch.preserve_format)


def device_for(preference: str = "auto") -> torch.device:
    """The current CUDA GPU when available (or asked for), else the CPU."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' was asked for but no CUDA GPU is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(preference)


def device_label(device: torch.device) -> str:
    """``device`` as stage summaries and reports name it: ``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
