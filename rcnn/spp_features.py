"""SPP-net features of many windows from one pass of the conv trunk per image and scale."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from rcnn.models import DetectorNet
from rcnn.spp import map_windows, select_scale, spp_pool

#: From this many windows on one map, pooling them alone (with the sparse-table method) beats batching.
MANY_WINDOWS = 16


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
        maps.append(fmap.float().contiguous().cpu().numpy().astype(np.float16))
    return maps


def as_map_tensors(maps: Sequence[np.ndarray], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Cached float16 maps as float32 tensors on ``device``, ready for pooling."""
    return [torch.from_numpy(np.asarray(m, np.float32)).to(device) for m in maps]


def pool_images(
    items: Sequence[tuple[Sequence[torch.Tensor], Sequence[float], np.ndarray]],
    stride: int,
    levels: Sequence[int],
    target: float = 224.0,
) -> torch.Tensor:
    """Pyramid-pooled vectors of the windows of several images, in one pooling call.

    Each item is ``(maps, factors, boxes)``: one float32 ``[C, H_k, W_k]`` map per scale, the
    resize factor of each, and the image's windows ``[N, 4]`` (x1, y1, x2, y2, original pixels).
    Each window is pooled from the map of the scale where its area is closest to ``target``²
    (SPP-net's multi-scale rule; with one scale, that scale). Returns ``[sum N, C * sum(n^2)]``
    in item order.
    """
    channels = items[0][0][0].shape[0]
    device = items[0][0][0].device
    dim = channels * sum(n * n for n in levels)
    out = torch.empty((sum(len(np.asarray(b).reshape(-1, 4)) for _, _, b in items), dim), device=device)
    # Maps with many windows (test time: every proposal of an image) are pooled one at a time, each
    # with its own sparse table; the rest (fine-tuning batches: a window or two from each of many
    # images) in one batched call over the cells their windows touch.
    batched_maps: list[torch.Tensor] = []
    rects, owner, order = [], [], []
    offset = 0
    for maps, factors, boxes in items:
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scale = select_scale(boxes, list(factors), target)
        for k in np.unique(scale):
            sel = np.flatnonzero(scale == k)
            fmap = maps[k]
            r = map_windows(boxes[sel] * np.float32(factors[k]), stride, fmap.shape[1], fmap.shape[2])
            if len(sel) >= MANY_WINDOWS:
                out[torch.from_numpy(offset + sel).to(device)] = spp_pool(fmap, r, levels)
                continue
            x0, y0 = r[:, 0].min(), r[:, 1].min()
            rects.append(r - np.array([x0, y0, x0, y0]))
            owner.append(np.full(len(sel), len(batched_maps)))
            order.append(offset + sel)
            batched_maps.append(fmap[:, y0 : r[:, 3].max() + 1, x0 : r[:, 2].max() + 1])
        offset += len(boxes)
    if not batched_maps:
        return out
    height = max(m.shape[1] for m in batched_maps)
    width = max(m.shape[2] for m in batched_maps)
    batch = torch.zeros((len(batched_maps), channels, height, width), device=device)
    for i, m in enumerate(batched_maps):  # zero padding to a common size: no window reaches it
        batch[i, :, : m.shape[1], : m.shape[2]] = m
    pooled = spp_pool(batch, np.concatenate(rects), levels, np.concatenate(owner))
    out[torch.from_numpy(np.concatenate(order)).to(device)] = pooled
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
    pooled = pool_images([(as_map_tensors(maps, device), factors, boxes)], model.spec.stride, model.spec.spp_levels, target)
    out = model.head(pooled, layers)
    out["pool5"] = pooled
    return {k: out[k].float().cpu().numpy().astype(np.float16) for k in layers}
