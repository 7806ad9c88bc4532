"""R-CNN region warping: dilate each box by ``context_pad`` pixels of context and resize it to a square crop.

Reproduces the 'warp' mode of the released R-CNN code (``rcnn_im_crop.m``; Girshick et al., CVPR 2014,
section 2.1 and appendix A) in the project's continuous box convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from rcnn.structures.boxes import as_boxes

#: torchvision's ImageNet normalisation mean, RGB on the 0-255 scale: the fill that becomes (close to) zero
#: after the network's input normalisation. Rounded to uint8 it is (124, 116, 104).
IMAGENET_MEAN_RGB: tuple[float, float, float] = (123.675, 116.28, 103.53)

#: Smallest box side, in image pixels, that is warped; smaller (or inverted) boxes are widened to it about
#: their centre so that every proposal yields a crop.
MIN_BOX_SIZE = 1.0


def _geometry(boxes: np.ndarray, image_w: float, image_h: float, crop_size: int, context_pad: int):
    """float64 ``(dilated, src, dst)``, each ``[..., 4]``; see :func:`warp_geometry`."""
    if crop_size <= 2 * context_pad:
        raise ValueError(f"crop_size ({crop_size}) must exceed 2 * context_pad ({context_pad})")
    b = np.asarray(boxes, dtype=np.float64)
    if not np.all(np.isfinite(b)):
        raise ValueError("boxes must be finite")
    centre = (b[..., :2] + b[..., 2:]) / 2
    size = np.maximum(b[..., 2:] - b[..., :2], MIN_BOX_SIZE)
    # Multiplying before dividing keeps the paper's case exact: a 195 px side becomes 227, not 226.99999.
    half = size * crop_size / (crop_size - 2 * context_pad) / 2
    dilated = np.concatenate([centre - half, centre + half], axis=-1)
    limits = np.array([image_w, image_h, image_w, image_h], dtype=np.float64)
    src = np.clip(dilated, 0.0, limits)
    # An affine map from the dilated box onto [0, crop_size]^2; the clipped part maps to a sub-rectangle.
    origin = np.concatenate([dilated[..., :2], dilated[..., :2]], axis=-1)
    extent = np.concatenate([2 * half, 2 * half], axis=-1)
    dst = (src - origin) * (crop_size / extent)
    return dilated, src, dst


def warp_geometry(
    box: np.ndarray, image_w: float, image_h: float, crop_size: int = 227, context_pad: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Where a box's warped crop samples the image, and where those samples land in the crop.

    The box is first widened to at least ``MIN_BOX_SIZE`` per side, then grown about its centre by
    ``crop_size / (crop_size - 2 * context_pad)`` in each dimension, so that after warping to
    ``crop_size x crop_size`` there are exactly ``context_pad`` crop pixels of context on every side of
    the original box (227 and 16 in the paper). Nothing is rounded here.

    Args:
        box: ``[4]`` (or ``[N, 4]``) in ``(x1, y1, x2, y2)``, continuous pixel coordinates.
        image_w, image_h: image size in pixels.
        crop_size: side of the square crop (227 for AlexNet).
        context_pad: context, in crop pixels, around the original box (16 in the paper).

    Returns:
        ``(src, dst)``, float32 with the shape of ``box``: ``src`` is the dilated box clipped to the image
        ``[0, image_w] x [0, image_h]``, in image pixels; ``dst`` is the rectangle of the crop,
        in crop pixels within ``[0, crop_size]``, that ``src`` is resampled onto. Both are ``(x1, y1, x2, y2)``;
        if the dilated box misses the image they are empty (zero width or height).
    """
    _, src, dst = _geometry(box, image_w, image_h, crop_size, context_pad)
    return src.astype(np.float32), dst.astype(np.float32)


def _pixel_span(lo: np.ndarray, hi: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer ``[a, b)`` of the pixels, within ``[0, limit)``, whose centres lie in ``[lo, hi]``; may be empty."""
    a = np.clip(np.ceil(lo - 0.5), 0, limit).astype(np.int64)
    b = np.clip(np.floor(hi - 0.5) + 1, 0, limit).astype(np.int64)
    return a, np.maximum(a, b)


def warp_regions(
    image: np.ndarray,
    boxes: np.ndarray,
    crop_size: int = 227,
    context_pad: int = 16,
    fill: tuple[float, float, float] = IMAGENET_MEAN_RGB,
) -> np.ndarray:
    """Warp every box of ``image`` to a ``crop_size`` square with ``context_pad`` pixels of context.

    Each crop pixel whose centre maps (through :func:`warp_geometry`'s dilated box) into the image is
    one bilinear sample there, without antialiasing, like the released code's
    ``imresize(..., 'bilinear', 'antialiasing', false)``; the other pixels, those of the context that
    falls outside the image, are ``fill``. Samples within half a pixel of the image border repeat the
    border pixel; samples near the box's own edges use the real neighbouring pixels.

    Where this differs from the released ``rcnn_im_crop.m``: nothing is rounded. The released code
    rounds the dilated box to whole pixels and resizes that window, which moves an edge by up to half
    an image pixel, i.e. by several crop pixels for a small box (about 5 for a 20 px box), and its box
    centre, ``x1 + (x2 - x1 + 1) / 2`` in 1-based pixels, lies half a pixel right of and below the true
    one. To place samples at sub-pixel positions this uses ``cv2.warpAffine`` (the same bilinear
    kernel as ``cv2.resize``, which can only map whole-pixel windows) writing into the crop's
    in-image sub-rectangle; OpenCV quantises sample positions to 1/32 px.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        boxes: ``[N, 4]`` in ``(x1, y1, x2, y2)``, continuous pixel coordinates; sides under
            ``MIN_BOX_SIZE`` are widened about the centre.
        crop_size: side of the square crop (227 for AlexNet).
        context_pad: context, in crop pixels, around each box (16 in the paper).
        fill: the network's mean pixel, RGB on the 0-255 scale; rounded to uint8. The default is
            :data:`IMAGENET_MEAN_RGB`.

    Returns:
        uint8 ``[N, crop_size, crop_size, 3]``; a box whose dilated box misses the image gives a crop
        of ``fill`` only.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"image is empty: {image.shape}")
    # cv2 rejects some views (negative strides, e.g. a BGR->RGB flip); one copy per image, if any.
    image = np.ascontiguousarray(image)
    boxes = as_boxes(boxes)
    fill_px = np.clip(np.floor(np.asarray(fill, dtype=np.float64) + 0.5), 0, 255).astype(np.uint8)
    if fill_px.shape != (3,):
        raise ValueError(f"fill must have 3 values, got {fill!r}")

    out = np.empty((len(boxes), crop_size, crop_size, 3), dtype=np.uint8)
    if len(boxes) == 0:
        return out
    dilated, _, dst = _geometry(boxes, width, height, crop_size, context_pad)
    dx1, dx2 = _pixel_span(dst[:, 0], dst[:, 2], crop_size)
    dy1, dy2 = _pixel_span(dst[:, 1], dst[:, 3], crop_size)
    # Only crops that reach outside the image need fill. Copying a whole filled crop is ~40x faster
    # than numpy broadcasting a 3-byte pixel over the output.
    full = (dx1 == 0) & (dy1 == 0) & (dx2 == crop_size) & (dy2 == crop_size)
    if not full.all():
        filled = np.empty((crop_size, crop_size, 3), dtype=np.uint8)
        filled[...] = fill_px
        out[~full] = filled
    # Inverse map, crop pixel index -> image pixel index (pixel centres at integers), of the target's
    # top-left pixel and per pixel step.
    step = (dilated[:, 2:] - dilated[:, :2]) / crop_size
    origin = dilated[:, :2] + (np.stack([dx1, dy1], axis=1) + 0.5) * step - 0.5
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for i in np.flatnonzero((dx2 > dx1) & (dy2 > dy1)):
        target = out[i, dy1[i] : dy2[i], dx1[i] : dx2[i]]
        affine = np.array([[step[i, 0], 0.0, origin[i, 0]], [0.0, step[i, 1], origin[i, 1]]])
        # cv2 writes straight into the view of the crop: no temporary crop, no copy.
        cv2.warpAffine(
            image, affine, (target.shape[1], target.shape[0]), dst=target, flags=flags, borderMode=cv2.BORDER_REPLICATE
        )
    return out


def warp_regions_torch(
    image,
    boxes,
    crop_size: int = 227,
    context_pad: int = 16,
    fill: tuple[float, float, float] = IMAGENET_MEAN_RGB,
):
    """Batched :func:`warp_regions` with :func:`torchvision.ops.roi_align`, for images already on a GPU.

    Each crop pixel is one bilinear sample at its centre mapped into the dilated box (``roi_align`` with
    ``aligned=True, sampling_ratio=1``, which also repeats border pixels), so it samples where
    :func:`warp_regions` does, up to OpenCV's 1/32 px position quantisation; crop pixels whose centre
    maps outside the image get ``fill``. Memory is ``N * 3 * crop_size**2`` floats: pass boxes in chunks.

    Args:
        image: float Tensor ``[3, H, W]`` (RGB, any scale; ``fill`` must be on the same scale).
        boxes: Tensor or array ``[N, 4]`` in ``(x1, y1, x2, y2)``, continuous pixel coordinates.
        crop_size: side of the square crop (227 for AlexNet).
        context_pad: context, in crop pixels, around each box (16 in the paper).
        fill: mean pixel, one value per channel, on the image's scale.

    Returns:
        Tensor ``[N, 3, crop_size, crop_size]`` of ``image``'s dtype and device.
    """
    if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float [3, H, W] tensor, got {image.dtype} {tuple(image.shape)}")
    b = np.asarray(boxes.cpu() if hasattr(boxes, "cpu") else boxes, dtype=np.float64).reshape(-1, 4)
    sizes = np.array([image.shape[1:]], np.int64)
    return warp_many_torch(image[None], sizes, np.zeros(len(b), np.int64), b, crop_size, context_pad, fill)


def warp_many_torch(
    images,
    sizes: np.ndarray,
    image_index: np.ndarray,
    boxes: np.ndarray,
    crop_size: int = 227,
    context_pad: int = 16,
    fill: tuple[float, float, float] = IMAGENET_MEAN_RGB,
):
    """:func:`warp_regions_torch` of boxes from several images at once: one ``roi_align`` call for all.

    Args:
        images: float Tensor ``[K, 3, H, W]``; image ``k`` (``sizes[k] = (h, w)``) is ``images[k, :, :h, :w]``.
            Where ``h < H``, row ``h`` must repeat row ``h - 1``, and where ``w < W`` column ``w`` must repeat
            column ``w - 1`` (rows ``:h + 1``): samples in an image's last half pixel then read its border
            as ``roi_align`` does at the edge of a tensor, and the crops equal a lone image's up to float
            rounding. Whatever lies further out is never read into a crop.
        sizes: int ``[K, 2]``, each image's ``(height, width)``.
        image_index: int ``[N]``, the image of each box.
        boxes: ``[N, 4]`` in ``(x1, y1, x2, y2)``, continuous pixel coordinates of its image.

    Returns:
        Tensor ``[N, 3, crop_size, crop_size]`` of ``images``' dtype and device, in the order of ``boxes``.
    """
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be a float [K, 3, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
    plan = warp_plan(sizes, image_index, boxes, crop_size, context_pad, fill, images.device)
    return warp_planned(images, plan)


@dataclass(frozen=True)
class WarpPlan:
    """Where the crops of a set of boxes sample their images, on the images' device (:func:`warp_plan`)."""

    rois: object  # Tensor [N, 5] float32: image index and dilated box, for roi_align
    xs: object  # Tensor [N, S] float64: the x of each crop column's centre in its image
    ys: object  # Tensor [N, S] float64: the y of each crop row's centre
    limits: object  # Tensor [N, 2] float64: height and width of each box's image
    fill: object  # Tensor [1, 3, 1, 1] float32: the mean pixel, where a crop pixel's centre leaves its image
    crop_size: int


def warp_plan(
    sizes: np.ndarray,
    image_index: np.ndarray,
    boxes: np.ndarray,
    crop_size: int,
    context_pad: int,
    fill: tuple[float, float, float],
    device,
) -> WarpPlan:
    """The geometry of :func:`warp_many_torch` for every box, sent to ``device`` once.

    Warping a long list of boxes in chunks with one plan copies nothing from the host per chunk, and the
    plan's own copy does not wait for the device (:mod:`rcnn.modeling.transfer`). The RoIs are float32
    whatever the images' dtype: in bfloat16 a box corner would round to 2 px above 256 and 4 px above 512.
    """
    import torch

    from rcnn.modeling.transfer import to_device

    image_index = np.asarray(image_index, np.int64).reshape(-1)
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(image_index) != len(b):
        raise ValueError(f"{len(b)} boxes but {len(image_index)} image indices")
    # The dilated box does not depend on the image; where it leaves the image does (the mask in warp_planned).
    dilated, _, _ = _geometry(b, 1.0, 1.0, crop_size, context_pad)
    host = np.concatenate([dilated, sizes[image_index], image_index[:, None].astype(np.float64)], axis=1)
    geometry = to_device(host, torch.device(device))  # [N, 7]: one copy
    dilated_d, limits, index_d = geometry[:, :4], geometry[:, 4:6], geometry[:, 6:]
    rois = torch.cat([index_d, dilated_d], dim=1).float()
    # Centres of the crop's pixels in image coordinates, per box: [N, S] for x and for y.
    steps = (torch.arange(crop_size, device=device, dtype=torch.float64) + 0.5) / crop_size
    xs = dilated_d[:, 0:1] + steps * (dilated_d[:, 2:3] - dilated_d[:, 0:1])
    ys = dilated_d[:, 1:2] + steps * (dilated_d[:, 3:4] - dilated_d[:, 1:2])
    fill_t = to_device(np.asarray(fill, np.float32), torch.device(device)).reshape(1, 3, 1, 1)
    return WarpPlan(rois, xs, ys, limits, fill_t, crop_size)


def warp_planned(images, plan: WarpPlan, rows: slice = slice(None)):
    """The crops ``[n, 3, S, S]`` of the boxes ``rows`` of ``plan`` from ``images [K, 3, H, W]`` (laid out as
    :func:`warp_many_torch` says), with no copy from the host, in ``images``' dtype.

    ``roi_align`` samples in float32 (a copy of ``images`` when they are not float32, as torchvision's
    autocast runs it on a GPU), so the sample positions are those of float32 images whatever the dtype.
    """
    import torch
    import torchvision

    size = plan.crop_size
    crops = torchvision.ops.roi_align(images.float(), plan.rois[rows], size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    xs, ys, limits = plan.xs[rows], plan.ys[rows], plan.limits[rows]
    inside = ((ys >= 0) & (ys <= limits[:, 0:1]))[:, :, None] & ((xs >= 0) & (xs <= limits[:, 1:2]))[:, None, :]
    crops = torch.where(inside[:, None], crops, plan.fill, out=crops)  # in place: one pass over the crops, not two
    return crops.to(images.dtype)
