"""SPP-net features of many windows from one pass of the conv trunk per image and scale."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from rcnn.models import DetectorNet
from rcnn.spp import map_windows, select_scale, spp_pool


@torch.no_grad()
def image_maps(model: DetectorNet, image_bgr: np.ndarray, factors: Sequence[float]) -> list[np.ndarray]:
    """float16 ``[C, H_k, W_k]`` conv maps of one BGR image resized by each factor in ``factors``."""
    spec = model.spec
    device = next(model.parameters()).device
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    mean = torch.tensor(spec.mean, device=device).view(3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(3, 1, 1)
    h, w = rgb.shape[:2]
    maps = []
    for f in factors:
        size = (max(1, round(w * f)), max(1, round(h * f)))
        resized = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR) if size != (w, h) else rgb
        x = torch.from_numpy(np.ascontiguousarray(resized)).to(device).permute(2, 0, 1).float().div_(255.0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            fmap = model.trunk(((x - mean) / std)[None])[0]
        maps.append(fmap.float().cpu().numpy().astype(np.float16))
    return maps


def pooled_windows(
    maps: Sequence[np.ndarray],
    factors: Sequence[float],
    boxes: np.ndarray,
    stride: int,
    levels: Sequence[int],
    target: float = 224.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Pyramid-pooled vectors ``[N, C * sum(n^2)]`` (float32) of ``boxes [N, 4]`` (x1, y1, x2, y2, original pixels).

    Each window is pooled from the map of the scale where its area is closest to
    ``target``² (SPP-net's multi-scale rule; with one scale, that scale).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    chosen = select_scale(boxes, list(factors), target)
    channels = maps[0].shape[0]
    out = torch.empty((len(boxes), channels * sum(n * n for n in levels)), dtype=torch.float32, device=device)
    for k in np.unique(chosen):
        sel = np.flatnonzero(chosen == k)
        fmap = torch.from_numpy(np.asarray(maps[k], np.float32)).to(device)
        rects = map_windows(boxes[sel] * np.float32(factors[k]), stride, fmap.shape[1], fmap.shape[2])
        out[torch.from_numpy(sel).to(device)] = spp_pool(fmap, rects, levels)
    return out


@torch.no_grad()
def spp_region_features(
    model: DetectorNet,
    maps: Sequence[np.ndarray],
    factors: Sequence[float],
    boxes: np.ndarray,
    layers: tuple[str, ...],
    target: float = 224.0,
) -> dict[str, np.ndarray]:
    """SPP-net's counterpart of :func:`rcnn.detector.region_features`: float16 ``[N, D]`` per layer.

    ``pool5`` here is the pyramid-pooled window vector that fc6 reads.
    """
    device = next(model.parameters()).device
    pooled = pooled_windows(maps, factors, boxes, model.spec.stride, model.spec.spp_levels, target, device)
    out = model.head(pooled, layers)
    out["pool5"] = pooled
    return {k: out[k].float().cpu().numpy().astype(np.float16) for k in layers}
