"""COCO-format box annotations (one JSON file per split, as COCO itself, CVAT, Label Studio and Roboflow export them)
written out as a VOC-layout folder, which every pipeline reads.

COCO boxes are ``[x, y, width, height]`` in continuous pixels from the image's top-left corner (the COCO data format,
cocodataset.org/#format-data); VOC's are 1-based inclusive pixel indices, so ``xmin = x + 1`` and ``xmax = x + width``
(:func:`rcnn.structures.boxes.to_voc_pixels`), and a box read back is the COCO box exactly. Crowd regions
(``iscrowd: 1``) become objects marked difficult: COCO's evaluation ignores crowd regions, VOC's difficult objects.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rcnn.data.datasets import IMAGE_SUFFIXES
from rcnn.data.filenames import name_problem
from rcnn.data.folders import new_folder, refuse_used
from rcnn.errors import UserError
from rcnn.structures.boxes import to_voc_pixels


@dataclass
class CocoImage:
    image_id: str  # the file name without its extension: the VOC id
    source: Path
    width: int
    height: int
    names: list[str] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # continuous (x1, y1, x2, y2)
    crowd: list[bool] = field(default_factory=list)


@dataclass
class CocoSplit:
    split: str
    annotation_file: Path
    images: list[CocoImage]
    categories: list[str]  # every category the file names, in its order, used or not
    clipped: int = 0  # boxes reaching past the image, clipped to it
    dropped: int = 0  # boxes under 1 pixel wide or tall once clipped (VOC cannot hold them), left out

    @property
    def objects(self) -> int:
        return sum(len(image.names) for image in self.images)

    @property
    def crowd(self) -> int:
        return sum(sum(image.crowd) for image in self.images)

    @property
    def empty(self) -> int:
        return sum(not image.names for image in self.images)


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"annotation file '{path}' does not exist") from None
    except IsADirectoryError:
        raise UserError(f"'{path}' is a folder; give the COCO annotation file (a .json) of the split") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 JSON file ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data, dict) or key not in data]
    if missing:
        raise UserError(f"{path}: not a COCO detection file: it has no {', '.join(repr(k) for k in missing)} list")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise UserError(f"{path}: '{key}' is not a list")
    return data


def _entry(path: Path, kind: str, k: int, entry, key: str, types: type | tuple[type, ...]):
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, types) or isinstance(value, bool):
        raise UserError(f"{path}: {kind} {k} has no valid '{key}' (got {value!r})")
    return value


def _categories(path: Path, data: dict) -> dict:
    by_id: dict = {}
    for k, cat in enumerate(data["categories"]):
        cat_id, name = _entry(path, "category", k, cat, "id", (int, str)), _entry(path, "category", k, cat, "name", str)
        problem = name_problem(name)
        if problem is not None:  # class names become file names (devkit results, plots)
            raise UserError(f"{path}: category {cat_id} has name {name!r}, which cannot be a class name ({problem}); rename it")
        if cat_id in by_id:
            raise UserError(f"{path}: category id {cat_id} is given twice ({by_id[cat_id]!r} and {name!r})")
        if name in by_id.values():
            raise UserError(f"{path}: two categories are named {name!r}; give each its own name, or merge them")
        by_id[cat_id] = name
    return by_id


def _image(path: Path, k: int, entry, folder: Path) -> CocoImage:
    file_name = _entry(path, "image", k, entry, "file_name", str)
    width, height = (_entry(path, "image", k, entry, key, (int, float)) for key in ("width", "height"))
    if not (float(width).is_integer() and float(height).is_integer() and width > 0 and height > 0):
        raise UserError(f"{path}: image {file_name!r} has size {width}x{height}, which is not a positive whole number of pixels")
    width, height = int(width), int(height)
    name = Path(file_name.replace("\\", "/")).name
    image_id, suffix = os.path.splitext(name)
    if suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{path}: image {file_name!r} is not one of the image types read ({', '.join(IMAGE_SUFFIXES)})")
    problem = (
        name_problem(image_id)
        or ("it starts with '.'" if image_id.startswith(".") else None)
        or (
            "it contains whitespace, which split and devkit files separate fields by"
            if any(c.isspace() for c in image_id)
            else None
        )
    )
    if problem is not None:
        raise UserError(f"{path}: image {file_name!r} has a name that cannot be an image id ({problem}); rename the file")
    source = folder / file_name.replace("\\", "/")  # exported on Windows: images\x.jpg
    if not source.is_file() and (folder / name).is_file():  # a file_name with the export's own folder in it
        source = folder / name
    return CocoImage(image_id, source, width, height)


def read_coco_split(split: str, annotation_file: str | Path, images: str | Path | None = None) -> CocoSplit:
    """Read one COCO annotation file as split ``split``; its ``file_name`` entries are relative to ``images``
    (the file's own folder by default). Every image must exist; any defect raises :class:`UserError` in one line."""
    path = Path(annotation_file)
    data = _load(path)
    folder = Path(images) if images is not None else path.parent
    if not folder.is_dir():
        raise UserError(f"image folder '{folder}' of split '{split}' does not exist")
    names = _categories(path, data)
    by_id: dict = {}
    for k, entry in enumerate(data["images"]):
        image = _image(path, k, entry, folder)
        key = _entry(path, "image", k, entry, "id", (int, str))
        if key in by_id:
            raise UserError(f"{path}: image id {key} is given twice")
        by_id[key] = image
    out = CocoSplit(split, path, list(by_id.values()), list(names.values()))
    for k, ann in enumerate(data["annotations"]):
        key = _entry(path, "annotation", k, ann, "image_id", (int, str))
        cat = _entry(path, "annotation", k, ann, "category_id", (int, str))
        if key not in by_id:
            raise UserError(f"{path}: annotation {ann.get('id', k)} is of image {key}, which 'images' does not list")
        if cat not in names:
            raise UserError(f"{path}: annotation {ann.get('id', k)} has category {cat}, which 'categories' does not list")
        bbox = ann.get("bbox")
        ok = (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
        )
        if not ok or not all(math.isfinite(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0:
            raise UserError(f"{path}: annotation {ann.get('id', k)} has no valid 'bbox' [x, y, width, height] (got {bbox!r})")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):  # True and False are 1 and 0; "0" is not
            raise UserError(f"{path}: annotation {ann.get('id', k)} has 'iscrowd' {crowd!r}; COCO's is 0 or 1")
        image = by_id[key]
        x, y, w, h = (float(v) for v in bbox)
        box = (max(x, 0.0), max(y, 0.0), min(x + w, image.width), min(y + h, image.height))
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            out.dropped += 1
            continue
        out.clipped += box != (x, y, x + w, y + h)
        image.names.append(names[cat])
        image.boxes.append(box)
        image.crowd.append(bool(crowd))
    return out


def _number(value: float) -> str:
    return format(value, ".10g")  # integral coordinates stay integers; others keep their digits


def voc_xml(image: CocoImage, suffix: str) -> bytes:
    """The VOC annotation of one image."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "filename").text = image.image_id + suffix
    size = ET.SubElement(ann, "size")
    for tag, value in (("width", image.width), ("height", image.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    pixels = to_voc_pixels(np.array(image.boxes, dtype=np.float64).reshape(-1, 4))
    for name, box, crowd in zip(image.names, pixels, image.crowd):
        node = ET.SubElement(ann, "object")
        ET.SubElement(node, "name").text = name
        ET.SubElement(node, "difficult").text = str(int(crowd))
        bnd = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box.tolist()):
            ET.SubElement(bnd, tag).text = _number(value)
    ET.indent(ann)
    return (ET.tostring(ann, encoding="unicode") + "\n").encode("utf-8")


def _unique_ids(splits: list[CocoSplit]) -> None:
    seen: dict[str, tuple[str, Path]] = {}
    for split in splits:
        for image in split.images:
            if image.image_id in seen:
                other, source = seen[image.image_id]
                where = f"split '{other}' ('{source}')" if other != split.split else f"'{source}'"
                raise UserError(
                    f"image id '{image.image_id}' of split '{split.split}' ('{image.source}') is also that of {where}: ids are "
                    "file names without extension and must be unique across the dataset; rename one; nothing was written"
                )
            seen[image.image_id] = (split.split, image.source)


def write_coco_as_voc(destination: str | Path, splits: list[CocoSplit], progress: bool = True) -> dict[str, int]:
    """Write ``splits`` as a VOC-layout folder ``destination``: ``JPEGImages/`` (each image hard-linked where the
    filesystem allows, else copied), ``Annotations/<id>.xml`` and ``ImageSets/Main/<split>.txt`` in the files'
    image order. Every image is checked to exist before anything is written; the folder is written under a temporary
    name and renamed when complete. Returns how many images were linked and copied."""
    destination = Path(destination)
    refuse_used(destination)
    _unique_ids(splits)
    for split in splits:
        missing = [image.source for image in split.images if not image.source.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(
                f"image '{missing[0]}'{more} of {split.annotation_file} is missing; give the folder its file_name entries "
                f"are relative to with --images {split.split}=DIR; nothing was written"
            )
    counts = {"linked": 0, "copied": 0}
    with new_folder(destination) as work:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (work / sub).mkdir(parents=True)
        todo = [image for split in splits for image in split.images]
        for image in tqdm(todo, desc="from-coco", unit="img", disable=None if progress else True):
            suffix = image.source.suffix
            target = work / "JPEGImages" / f"{image.image_id}{suffix}"
            try:
                os.link(image.source, target)
                counts["linked"] += 1
            except OSError:  # another filesystem, or one without hard links
                shutil.copyfile(image.source, target)
                counts["copied"] += 1
            (work / "Annotations" / f"{image.image_id}.xml").write_bytes(voc_xml(image, suffix))
        for split in splits:
            (work / "ImageSets" / "Main" / f"{split.split}.txt").write_text("".join(f"{i.image_id}\n" for i in split.images))
    return counts
