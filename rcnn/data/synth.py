"""Synthetic shapes dataset in PASCAL VOC layout, for the ``demo`` pipeline and tests.

Five classes told apart only by shape (each object gets a random colour) on textured,
cluttered backgrounds. Image ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from rcnn.errors import ConfigError, UserError
from rcnn.structures.boxes import to_voc_pixels

SYNTH_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

OBJECT_DIAMETER = (0.08, 0.6)  # fraction of the image side, sampled log-uniformly
MAX_OBJECTS = 6
MIN_VISIBLE = 0.6  # share of an object that must stay visible after border cuts and occlusion
DIFFICULT_SIDE = 10  # px; a visible box with both sides below this is marked difficult
PLACEMENT_TRIES = 25
MIN_COLOUR_CONTRAST = 80.0  # BGR distance from the background under the object
JPEG_QUALITY = 95
_SUPERSAMPLE = 4  # samples per pixel side when rasterising coverage
_SHIFT = 4  # cv2 fixed-point bits, so vertices keep 1/16 px precision


@dataclass(frozen=True, eq=False)
class SynthObject:
    """One rendered object.

    box: float32 ``[4]`` ``(x1, y1, x2, y2)`` in continuous pixel coordinates (pixel
    ``c`` spans ``[c, c + 1]``), tight around ``mask``.
    mask: bool ``[size, size]``, pixels at least half covered by the shape, clipped to
    the image; occlusion by later objects is ignored, as VOC annotates the extent.
    """

    name: str
    box: np.ndarray
    truncated: bool
    difficult: bool
    mask: np.ndarray


def _ring(n: int, start: float, radii=1.0) -> np.ndarray:
    t = start + np.arange(n) * (2 * np.pi / n)
    return np.stack([np.cos(t), np.sin(t)], axis=1) * np.reshape(radii, (-1, 1))


def shape_polygon(name: str, radius: float, angle: float = 0.0, aspect: float = 1.0) -> np.ndarray:
    """Vertices ``[K, 2]`` (x, y) of class ``name`` centred on the origin.

    The unit shape fits the circle of ``radius``; it is then stretched (x by
    ``sqrt(aspect)``, y by ``1 / sqrt(aspect)``) and rotated by ``angle`` radians.
    """
    if name == "circle":
        pts = _ring(64, 0.0)
    elif name == "square":
        pts = _ring(4, np.pi / 4)
    elif name == "triangle":
        pts = _ring(3, -np.pi / 2)
    elif name == "star":
        pts = _ring(10, -np.pi / 2, np.tile([1.0, 0.42], 5))
    elif name == "cross":
        a, w = 1.0, 0.3
        pts = np.array(
            [(w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w), (-w, -a)]
        )
        pts /= np.hypot(a, w)
    else:
        raise ValueError(f"unknown shape {name!r}; expected one of {SYNTH_CLASSES}")
    pts = pts * [np.sqrt(aspect), 1 / np.sqrt(aspect)] * radius
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _erode_half_sample(points: np.ndarray) -> np.ndarray:
    """Move each edge of polygon ``[K, 2]`` (sample units) half a sample inwards along its major axis.

    cv2's non-AA fill rounds vertex rows and span ends to the nearest sample, growing
    the polygon by about half a sample all round; with this offset the area matches
    brute-force point sampling to within about 1 %.
    """
    edge = np.roll(points, -1, axis=0) - points
    normal = np.stack([-edge[:, 1], edge[:, 0]], axis=1) / np.linalg.norm(edge, axis=1)[:, None]
    if np.sum(points[:, 0] * np.roll(points[:, 1], -1) - np.roll(points[:, 0], -1) * points[:, 1]) < 0:
        normal = -normal  # make normals point inwards whatever the winding
    rhs = np.sum(normal * points, axis=1) + 0.5 * np.abs(normal).max(axis=1)
    # Vertex i is where the shifted edges i - 1 and i meet.
    lines = np.stack([np.roll(normal, 1, axis=0), normal], axis=1)
    return np.linalg.solve(lines, np.stack([np.roll(rhs, 1), rhs], axis=1)[:, :, None])[:, :, 0]


def polygon_coverage(points: np.ndarray, size: int) -> np.ndarray:
    """Share of each pixel inside the polygon, float32 ``[size, size]`` in ``[0, 1]``.

    ``points [K, 2]`` are (x, y) vertices in continuous pixel coordinates. Counted on
    a 4 x 4 sample grid per pixel rather than with cv2's LINE_AA, whose fill bleeds
    about half a pixel outwards.
    """
    s = _SUPERSAMPLE
    cover = np.zeros((size, size), np.float32)
    x0, y0 = np.clip(np.floor(points.min(axis=0)).astype(int), 0, size)
    x1, y1 = np.clip(np.ceil(points.max(axis=0)).astype(int), 0, size)
    if x1 <= x0 or y1 <= y0:
        return cover
    canvas = np.zeros(((y1 - y0) * s, (x1 - x0) * s), np.uint8)
    # cv2 puts pixel centres on integers; ours sit at c + 0.5.
    samples = _erode_half_sample((points - [x0, y0]) * s) - 0.5
    fixed = np.round(samples * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(canvas, [fixed], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    counts = canvas.reshape(y1 - y0, s, x1 - x0, s).sum(axis=(1, 3))
    cover[y0:y1, x0:x1] = counts / float(s * s)
    return cover


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Tight float32 ``(x1, y1, x2, y2)`` around the True pixels of ``mask [H, W]``, or None."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def _random_bgr(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` vivid-to-dull colours, float32 ``[n, 3]`` BGR in 0..255."""
    hsv = np.stack([rng.uniform(0, 360, n), rng.uniform(0.25, 1, n), rng.uniform(0.3, 1, n)], 1)
    bgr = cv2.cvtColor(hsv.astype(np.float32)[:, None], cv2.COLOR_HSV2BGR)[:, 0]
    return bgr * 255


def render_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient, blotches and non-class clutter (lines, irregular blobs): uint8 ``[size, size, 3]`` BGR."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(theta) * xx + np.sin(theta) * yy
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    c0, c1 = rng.uniform(30, 225, (2, 3)).astype(np.float32)
    image = c0 + (c1 - c0) * ramp[..., None]
    blotches = rng.normal(0, 22, (5, 5, 3)).astype(np.float32)
    image += cv2.resize(blotches, (size, size), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image, 0, 255).astype(np.uint8)
    scale = 1 << _SHIFT
    for colour in _random_bgr(rng, int(rng.integers(4, 12))):
        p, q = (rng.uniform(-0.1, 1.1, (2, 2)) * size * scale).astype(int)
        cv2.line(image, p.tolist(), q.tolist(), colour.tolist(), int(rng.integers(1, 4)), cv2.LINE_AA, _SHIFT)
    # Lumpy 5-9-gons: spread, jittered angles keep them from reading as triangles or stars.
    for colour in _random_bgr(rng, int(rng.integers(3, 10))):
        k = int(rng.integers(5, 10))
        t = (np.arange(k) + rng.uniform(-0.3, 0.3, k)) * (2 * np.pi / k) + rng.uniform(0, 2 * np.pi)
        r = rng.uniform(0.45, 1, k) * rng.uniform(0.03, 0.12) * size
        pts = rng.uniform(0, size, 2) + np.stack([np.cos(t), np.sin(t)], 1) * r[:, None]
        cv2.fillPoly(image, [np.round(pts * scale).astype(np.int32)], colour.tolist(), cv2.LINE_AA, _SHIFT)
    return image


def _place(rng, name, size, owner, areas, centred=False):
    """Sample one pose of ``name``; return (coverage, SynthObject) or None if it breaks a visibility rule."""
    radius = size * np.exp(rng.uniform(*np.log(OBJECT_DIAMETER))) / 2
    angle, aspect = rng.uniform(0, 2 * np.pi), np.exp(rng.uniform(-0.25, 0.25))
    # Most objects stay inside; about a quarter may be cut by the border.
    margin = radius * (0.3 if rng.random() < 0.25 else 1.0)
    centre = np.full(2, size / 2) if centred else rng.uniform(margin, size - margin, 2)
    points = shape_polygon(name, radius, angle, aspect) + centre
    coverage = polygon_coverage(points, size)
    mask = coverage >= 0.5
    box = mask_box(mask)
    if box is None or coverage.sum() < MIN_VISIBLE * cv2.contourArea(points.astype(np.float32)):
        return None
    # Earlier objects must each keep MIN_VISIBLE of their in-image pixels uncovered.
    behind = owner[~mask]
    still_visible = np.bincount(behind[behind >= 0], minlength=len(areas))
    if np.any(still_visible < MIN_VISIBLE * np.asarray(areas)):
        return None
    truncated = bool(points.min() < -0.5 or points.max() > size + 0.5)
    difficult = bool(box[2] - box[0] < DIFFICULT_SIDE and box[3] - box[1] < DIFFICULT_SIDE)
    return coverage, SynthObject(name, box, truncated, difficult, mask)


def render_image(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, list[SynthObject]]:
    """One image, uint8 ``[size, size, 3]`` BGR, and its 1..MAX_OBJECTS objects in drawing order."""
    image = render_background(rng, size).astype(np.float32)
    owner = np.full((size, size), -1, np.int16)  # index of the topmost object per pixel
    objects: list[SynthObject] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        name = SYNTH_CLASSES[int(rng.integers(len(SYNTH_CLASSES)))]
        areas = [int(o.mask.sum()) for o in objects]
        placed = None
        # The first object gets one extra, centred try that always fits: no image is empty.
        for attempt in range(PLACEMENT_TRIES + (not objects)):
            placed = _place(rng, name, size, owner, areas, centred=attempt == PLACEMENT_TRIES)
            if placed is not None:
                break
        if placed is None:
            continue
        coverage, obj = placed
        # Colour is independent of class; only contrast with what lies beneath is enforced.
        candidates = _random_bgr(rng, 8)
        contrast = np.linalg.norm(candidates - image[obj.mask].mean(axis=0), axis=1)
        good = np.flatnonzero(contrast >= MIN_COLOUR_CONTRAST)
        colour = candidates[good[0] if good.size else int(np.argmax(contrast))]
        alpha = coverage[..., None]
        image = image * (1 - alpha) + colour * alpha
        owner[obj.mask] = len(objects)
        objects.append(obj)
    # Per-image photometric jitter, sensor noise and optional slight blur.
    image = (image - 128) * rng.uniform(0.8, 1.2) + 128 + rng.uniform(-20, 20)
    image += rng.normal(0, rng.uniform(2, 7), image.shape).astype(np.float32)
    if rng.random() < 0.5:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 0.9))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def voc_annotation(image_id: str, size: int, objects: list[SynthObject]) -> bytes:
    """VOC XML for one square image; boxes become 1-based inclusive integer pixel indices."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "synth"  # constant so output does not depend on ROOT
    ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
    ET.SubElement(ET.SubElement(ann, "source"), "database").text = "rcnn synthetic shapes"
    dims = ET.SubElement(ann, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(dims, tag).text = str(value)
    ET.SubElement(ann, "segmented").text = "0"
    voc = np.rint(to_voc_pixels(np.stack([o.box for o in objects]))).astype(int) if objects else []
    for obj, pix in zip(objects, voc):
        node = ET.SubElement(ann, "object")
        ET.SubElement(node, "name").text = obj.name
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(obj.truncated))
        ET.SubElement(node, "difficult").text = str(int(obj.difficult))
        bnd = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), pix):
            ET.SubElement(bnd, tag).text = str(value)
    ET.indent(ann)
    return (ET.tostring(ann, encoding="unicode") + "\n").encode("utf-8")


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _check_args(n_images, seed, size, test_fraction) -> None:
    if not isinstance(n_images, (int, np.integer)) or n_images < 2:
        raise ConfigError(f"--images must be an integer of at least 2, got {n_images!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
    if not isinstance(size, (int, np.integer)) or size < 64:
        raise ConfigError(f"--size must be an integer of at least 64 (pixels), got {size!r}")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"--test-fraction must be strictly between 0 and 1, got {test_fraction!r}")


def generate_dataset(
    root, n_images: int = 60, seed: int = 0, size: int = 256, test_fraction: float = 1 / 3, progress: bool = True
) -> dict:
    """Write ``n_images`` synthetic images in VOC layout under ``root`` and return a summary.

    ``root`` must be absent or empty; the dataset is built in ``ROOT.tmp-<pid>`` and
    moved into place only when complete.
    """
    _check_args(n_images, seed, size, test_fraction)
    root = Path(os.path.abspath(root))
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(
            f"dataset folder {root} already exists and is not an empty folder; pick a new folder or delete this one to regenerate"
        )
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = _write_dataset(tmp, n_images, seed, size, test_fraction, progress)
        os.replace(tmp, root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write dataset folder {root}: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"root": str(root), **summary}


def _write_dataset(out: Path, n_images, seed, size, test_fraction, progress) -> dict:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True)
    ids = [f"{i + 1:06d}" for i in range(n_images)]
    counts = dict.fromkeys(SYNTH_CLASSES, 0)
    truncated = difficult = 0
    for i in tqdm(range(n_images), desc="synth", unit="img", disable=None if progress else True):
        image, objects = render_image(_rng(seed, 0, i), size)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for image {ids[i]}")
        (out / "JPEGImages" / f"{ids[i]}.jpg").write_bytes(jpeg.tobytes())
        (out / "Annotations" / f"{ids[i]}.xml").write_bytes(voc_annotation(ids[i], size, objects))
        for obj in objects:
            counts[obj.name] += 1
            truncated += obj.truncated
            difficult += obj.difficult
    n_test = min(max(round(n_images * test_fraction), 1), n_images - 1)
    is_test = np.zeros(n_images, bool)
    is_test[_rng(seed, 1).permutation(n_images)[:n_test]] = True
    splits = {"trainval": [d for d, t in zip(ids, is_test) if not t], "test": [d for d, t in zip(ids, is_test) if t]}
    for split, members in splits.items():
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{d}\n" for d in members))
    return {
        "images": n_images,
        "size": size,
        "seed": seed,
        "objects": counts,
        "truncated": truncated,
        "difficult": difficult,
        "splits": {k: len(v) for k, v in splits.items()},
    }
