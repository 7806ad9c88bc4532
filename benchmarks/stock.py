"""The stock baselines: R-CNN, SPP-net, their fine-tuning and the class SVMs as a careful user writes them
in plain PyTorch, torchvision and scikit-learn, without this library.

Careful means: the image uploaded once and normalised once, boxes warped on the device by
``torchvision.ops.roi_align`` (one bilinear sample per crop pixel, R-CNN's 16 px of context at 227 px),
``torchvision.ops.roi_pool`` per pyramid level, networks in channels-last layout under autocast
(bfloat16 on a CPU, float16 with a gradient scaler on a GPU), inference mode, large batches.
Weights are torchvision's random initialisation unless a state-dict file is given; timing does not
depend on them. Boxes are float32 ``(x1, y1, x2, y2)`` in continuous pixel coordinates throughout.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from sklearn.svm import LinearSVC
from torch import nn
from torchvision.ops import roi_align, roi_pool

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
STRIDE = 16  # AlexNet's conv5 (and SqueezeNet's fire9) stride


def autocast(device: torch.device) -> torch.autocast:
    """Mixed precision as a user turns it on: bfloat16 on a CPU, float16 on a GPU."""
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def image_tensor(image_bgr: np.ndarray, device: torch.device) -> torch.Tensor:
    """A decoded BGR uint8 ``[H, W, 3]`` image as a normalised RGB float ``[3, H, W]`` on ``device``."""
    x = torch.from_numpy(image_bgr).to(device).flip(-1).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(STD, device=device).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def with_context(boxes: np.ndarray, crop: int, context_pad: int) -> np.ndarray:
    """Boxes ``[N, 4]`` grown about their centres so that warped to ``crop`` px they keep ``context_pad`` px
    of context on each side (R-CNN appendix A)."""
    b = np.asarray(boxes, np.float64)
    centre, half = (b[:, :2] + b[:, 2:]) / 2, np.maximum(b[:, 2:] - b[:, :2], 1) * crop / (crop - 2 * context_pad) / 2
    return np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)


def rois(boxes: np.ndarray, device: torch.device, image: np.ndarray | int = 0) -> torch.Tensor:
    """``[N, 5]`` rows ``(image index, x1, y1, x2, y2)``, as torchvision's RoI ops take them."""
    index = np.broadcast_to(np.asarray(image, np.float32), (len(boxes),))[:, None]
    return torch.from_numpy(np.concatenate([index, np.asarray(boxes, np.float32)], axis=1)).to(device)


def _squeezenet_parts(weights: str | None) -> tuple[nn.Module, int]:
    net = torchvision.models.squeezenet1_0()
    if weights:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return nn.Sequential(net.features, nn.MaxPool2d(3, stride=2, ceil_mode=True)), 512


def _grid(trunk: nn.Module, crop: int) -> int:
    with torch.no_grad():
        return int(trunk(torch.zeros(1, 3, crop, crop)).shape[-1])


class RCNNFeatures:
    """R-CNN's features (pool5, fc7) of every box: crops by ``roi_align``, the whole network on each crop.

    AlexNet is torchvision's (pool5 is its ``features`` output, fc6 and fc7 its classifier's);
    SqueezeNet is torchvision's ``features`` with a 3x3 max-pool as pool5 and a new 1024-d fc6/fc7
    head, the shape this library gives it. Call with a BGR image and its boxes; returns float16
    CPU tensors ``[N, D]``, as a feature cache would keep them.
    """

    def __init__(self, backbone: str, crop: int, context_pad: int, device: torch.device, weights: str | None = None,
                 batch_size: int = 256):  # fmt: skip
        if backbone == "alexnet":
            net = torchvision.models.alexnet()
            self.trunk, self.head = net.features, net.classifier[:6]  # dropout, fc6, relu, dropout, fc7, relu
        else:
            self.trunk, channels = _squeezenet_parts(weights)
            dim = channels * _grid(self.trunk, crop) ** 2
            self.head = nn.Sequential(nn.Linear(dim, 1024), nn.ReLU(inplace=True), nn.Linear(1024, 1024), nn.ReLU(inplace=True))
        self.trunk = self.trunk.eval().to(device, memory_format=torch.channels_last)
        self.head = self.head.eval().to(device)
        self.crop, self.context_pad, self.device, self.batch_size = crop, context_pad, device, batch_size

    @torch.inference_mode()
    def __call__(self, image_bgr: np.ndarray, boxes: np.ndarray, pool5: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """pool5 (None unless ``pool5``) and fc7, each float16 ``[N, D]`` on the host."""
        image = image_tensor(image_bgr, self.device)[None]
        regions = rois(with_context(boxes, self.crop, self.context_pad), self.device)
        kept, fc7 = [], []
        for start in range(0, len(regions), self.batch_size):
            crops = roi_align(image, regions[start : start + self.batch_size], self.crop, 1.0, 1, aligned=True)
            with autocast(self.device):
                p5 = torch.flatten(self.trunk(crops.contiguous(memory_format=torch.channels_last)), 1)
                f7 = self.head(p5)
            if pool5:
                kept.append(p5.half().cpu())
            fc7.append(f7.half().cpu())
        return torch.cat(kept) if pool5 else None, torch.cat(fc7)


def factors_of(height: int, width: int, scales, max_side: float | None) -> list[float]:
    """Resize factor of each scale (shorter side ``s``), the longer side capped at ``max_side``."""
    cap = max_side / max(height, width) if max_side else float("inf")
    return [min(s / min(height, width), cap) for s in scales]


def closest_scale(boxes: np.ndarray, factors: list[float], target: float) -> np.ndarray:
    """Index of the scale at which each box's area is closest to ``target ** 2`` (SPP-net's rule)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.argmin(np.abs(area[:, None] * np.square(factors) - target**2), axis=1)


def spp_levels(fmap: torch.Tensor, regions: torch.Tensor, levels, scale: float) -> torch.Tensor:
    """Each region's pyramid ``[N, C * sum(n^2)]``: ``roi_pool`` once per level, the levels side by side."""
    return torch.cat([torch.flatten(roi_pool(fmap, regions, n, scale), 1) for n in levels], dim=1)


class SPPFeatures:
    """SPP-net's features: AlexNet's conv layers once per image and scale, ``roi_pool`` per pyramid level
    from the scale closest to 224 px for each box, then fc6 and fc7 (new, 4096-d) on the pyramids."""

    def __init__(self, max_side, levels, target: float, device: torch.device):
        self.trunk = torchvision.models.alexnet().features[:-1].eval().to(device, memory_format=torch.channels_last)
        dim = 256 * sum(n * n for n in levels)
        self.head = nn.Sequential(nn.Linear(dim, 4096), nn.ReLU(inplace=True), nn.Linear(4096, 4096), nn.ReLU(inplace=True))
        self.head = self.head.eval().to(device)
        self.max_side, self.levels, self.target, self.device = max_side, levels, target, device

    @torch.inference_mode()
    def __call__(
        self, image_bgr: np.ndarray, boxes: np.ndarray, scales, pool5: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Pyramids (None unless ``pool5``) and fc7 of ``boxes`` of one BGR image whose shorter side is resized to
        each of ``scales``, float16 on the host."""
        h, w = image_bgr.shape[:2]
        image = image_tensor(image_bgr, self.device)[None]
        factors = factors_of(h, w, scales, self.max_side)
        scale = closest_scale(boxes, factors, self.target)
        pooled = torch.empty((len(boxes), self.head[0].in_features), device=self.device)
        for k, f in enumerate(factors):
            sel = np.flatnonzero(scale == k)
            if len(sel) == 0:
                continue
            size = (max(1, round(h * f)), max(1, round(w * f)))
            x = nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)
            with autocast(self.device):
                fmap = self.trunk(x.contiguous(memory_format=torch.channels_last)).float()
            index = torch.from_numpy(sel).to(self.device)
            pooled[index] = spp_levels(fmap, rois(boxes[sel] * f, self.device), self.levels, 1 / STRIDE)
        with autocast(self.device):
            fc7 = self.head(pooled)
        return pooled.half().cpu() if pool5 else None, fc7.half().cpu()


class _Trainer:
    """A training step as a user writes it: autocast forward, cross-entropy, scaled backward, SGD step."""

    def __init__(self, params, device: torch.device, lr: float = 0.001):
        # R-CNN's solver: SGD, momentum 0.9, weight decay 0.0005.
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0005)
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
        self.device = device

    def _step(self, forward, target: torch.Tensor) -> float:
        with autocast(self.device):
            loss = nn.functional.cross_entropy(forward().float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())


class RCNNFinetune(_Trainer):
    """R-CNN fine-tuning of all of AlexNet on warped regions: the training images live on the device
    (zero-padded to one batch), each step warps its regions there with one ``roi_align`` call.

    ``regions`` lists every region once: ``image [R]`` and ``boxes [R, 4]``; a step takes indices into them.
    """

    def __init__(self, images_bgr: list[np.ndarray], image: np.ndarray, boxes: np.ndarray, num_classes: int, crop: int,
                 context_pad: int, device: torch.device):  # fmt: skip
        height, width = max(i.shape[0] for i in images_bgr), max(i.shape[1] for i in images_bgr)
        self.images = torch.zeros((len(images_bgr), 3, height, width), device=device)
        for k, im in enumerate(images_bgr):
            self.images[k, :, : im.shape[0], : im.shape[1]] = image_tensor(im, device)
        self.regions = rois(with_context(boxes, crop, context_pad), device, image)
        self.net = torchvision.models.alexnet(num_classes=num_classes).to(device, memory_format=torch.channels_last)
        self.crop = crop
        super().__init__(self.net.parameters(), device)

    def step(self, batch: np.ndarray, target: torch.Tensor) -> float:
        self.net.train()
        regions = self.regions[torch.from_numpy(batch).to(self.device)]
        crops = roi_align(self.images, regions, self.crop, 1.0, 1, aligned=True)
        return self._step(lambda: self.net(crops.contiguous(memory_format=torch.channels_last)), target)


class SPPFinetune(_Trainer):
    """SPP-net fine-tuning of fc6, fc7 and the classifier only: the conv maps of the training images
    computed once (at one scale) and kept on the device, zero-padded to one batch; each step pools
    its regions' pyramids with one ``roi_pool`` call per level."""

    def __init__(self, images_bgr: list[np.ndarray], image: np.ndarray, boxes: np.ndarray, num_classes: int, scale: int,
                 max_side, levels, device: torch.device):  # fmt: skip
        trunk = torchvision.models.alexnet().features[:-1].eval().to(device, memory_format=torch.channels_last)
        maps, factors = [], []
        with torch.inference_mode(), autocast(device):
            for im in images_bgr:
                f = factors_of(im.shape[0], im.shape[1], (scale,), max_side)[0]
                x = image_tensor(im, device)[None]
                x = nn.functional.interpolate(x, size=(round(im.shape[0] * f), round(im.shape[1] * f)), mode="bilinear")
                maps.append(trunk(x.contiguous(memory_format=torch.channels_last))[0].float())
                factors.append(f)
        height, width = max(m.shape[1] for m in maps), max(m.shape[2] for m in maps)
        self.maps = torch.zeros((len(maps), maps[0].shape[0], height, width), device=device)
        for k, m in enumerate(maps):
            self.maps[k, :, : m.shape[1], : m.shape[2]] = m
        self.regions = rois(boxes * np.asarray(factors, np.float32)[image][:, None], device, image)
        dim = 256 * sum(n * n for n in levels)
        self.head = nn.Sequential(
            nn.Linear(dim, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(4096, num_classes),
        ).to(device)  # fmt: skip
        self.levels = levels
        super().__init__(self.head.parameters(), device)

    def step(self, batch: np.ndarray, target: torch.Tensor) -> float:
        self.head.train()
        regions = self.regions[torch.from_numpy(batch).to(self.device)]
        return self._step(lambda: self.head(spp_levels(self.maps, regions, self.levels, 1 / STRIDE)), target)


def train_svms(features: list[np.ndarray], gt_classes: list[np.ndarray], overlaps: list[np.ndarray], num_classes: int,
               neg_overlap: float = 0.3) -> list[tuple[np.ndarray, float]]:  # fmt: skip
    """One linear SVM per class on all its positives (ground truth) and every negative (IoU below
    ``neg_overlap``), without mining: scikit-learn's liblinear with R-CNN's settings, features scaled to
    a mean norm of 20. Returns ``(w, b)`` per class."""
    x = np.concatenate(features).astype(np.float32)
    x *= np.float32(20.0 / np.linalg.norm(x, axis=1).mean())
    gt, ov = np.concatenate(gt_classes), np.concatenate(overlaps)
    out = []
    for c in range(num_classes):
        pos, neg = gt == c, (ov[:, c] < neg_overlap) & (gt != c)
        y = np.concatenate([np.ones(pos.sum()), -np.ones(neg.sum())])
        svc = LinearSVC(C=0.001, loss="hinge", dual=True, intercept_scaling=10.0, class_weight={1: 2.0, -1: 1.0},
                        tol=0.1, max_iter=1000, random_state=0)  # fmt: skip
        svc.fit(np.concatenate([x[pos], x[neg]]).astype(np.float64), y)
        out.append((svc.coef_[0].astype(np.float32), float(svc.intercept_[0])))
    return out
