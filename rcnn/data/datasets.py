"""PASCAL VOC-layout datasets: a root folder plus a split name.

This is the one place where VOC's 1-based inclusive pixel boxes become the
project's float32 ``(x1, y1, x2, y2)`` continuous boxes (see :mod:`rcnn.structures.boxes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from rcnn.data.filenames import close_class, name_problem
from rcnn.data.imagefile import TURNED, exif_orientation
from rcnn.data.splitfile import missing_split_file, not_utf8, read_split_file
from rcnn.errors import UserError
from rcnn.structures.boxes import from_voc_pixels

# What a dataset root holds, for the commands' advice when one is missing.
ROOT_LAYOUT = "the folder holding JPEGImages/, Annotations/ and ImageSets/Main/"
# Image files looked for as JPEGImages/<id><suffix>, in this order and in either case: VOC's .jpg first.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageAnnotation:
    """Ground truth of one image.

    ``boxes`` is float32 ``[N, 4]`` in (x1, y1, x2, y2) continuous pixels;
    ``labels`` holds the N class names and ``difficult`` is bool ``[N]``.
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: tuple[str, ...]
    difficult: np.ndarray

    def label_indices(self, classes: tuple[str, ...]) -> np.ndarray:
        """Class indices ``[N]`` (int64) into ``classes``."""
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[c] for c in self.labels], dtype=np.int64)


def _text(node: ET.Element, tag: str, xml_path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise UserError(f"{xml_path}: missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, xml_path: Path) -> float:
    text = _text(node, tag, xml_path)
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{xml_path}: <{tag}> is not a number: {text!r}") from None


def parse_voc_xml(xml_path: Path, image_path: Path, image_id: str, clip: bool = False) -> ImageAnnotation:
    """Read one VOC annotation file; raise :class:`UserError` naming the file on any defect.

    With ``clip``, a box reaching past the image is clipped to it (1-based: x in [1, width]); one lying wholly
    outside is refused still."""
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        stem, suffix = os.path.splitext(image_id)
        hint = f"; split files list ids without an extension ('{stem}')" if suffix.lower() in IMAGE_SUFFIXES + (".xml",) else ""
        hint += "; a split file holds no comments: if this line is one, remove it" if image_id.startswith("#") else ""
        raise UserError(f"annotation '{xml_path}' is missing (listed in the split file){hint}") from None
    except ET.ParseError as e:
        data = xml_path.read_bytes()
        bad = None if b"encoding=" in data[:200] or b"\x00" in data[:4] else not_utf8(data)  # declared, or UTF-16/32
        hint = (
            f"; {bad} is not UTF-8, and the file declares no other encoding: save it as UTF-8, or declare its "
            'encoding in a first line <?xml version="1.0" encoding="ISO-8859-1"?>'
            if bad
            else ""
        )
        raise UserError(f"{xml_path}: malformed XML ({e}){hint}") from None
    size = root.find("size")
    if size is None:
        raise UserError(f"{xml_path}: missing <size>")
    width, height = int(_number(size, "width", xml_path)), int(_number(size, "height", xml_path))
    if width <= 0 or height <= 0:
        raise UserError(f"{xml_path}: image size {width}x{height} is not positive")
    voc, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name", xml_path)
        problem = name_problem(name)
        if problem is not None:
            # Class names become file names (devkit results, plots): one that is not a plain name could write anywhere.
            raise UserError(f"{xml_path}: object {k} has class name {name!r}, which cannot be a file name ({problem}); rename it")
        bb = obj.find("bndbox")
        if bb is None:
            raise UserError(f"{xml_path}: object {k} ({name}) has no <bndbox>")
        box = [_number(bb, t, xml_path) for t in ("xmin", "ymin", "xmax", "ymax")]
        if box[2] < box[0] or box[3] < box[1]:
            raise UserError(f"{xml_path}: object {k} ({name}) has an inverted box {box} (xmax < xmin or ymax < ymin)")
        wholly = box[0] > width or box[1] > height or box[2] < 1 or box[3] < 1
        if clip and not wholly:
            box = [max(box[0], 1), max(box[1], 1), min(box[2], width), min(box[3], height)]
        if box[0] < 1 or box[1] < 1 or box[2] > width or box[3] > height:
            advice = "" if clip else ", or set data.clip_boxes: true in the pipeline to clip boxes to the image"
            raise UserError(
                f"{xml_path}: object {k} ({name}) box {box} lies {'wholly ' if wholly else ''}outside the {width}x{height} "
                f"image (VOC boxes are 1-based pixels inside the image); fix the box or the <size>{advice}"
            )
        diff = obj.find("difficult")
        voc.append(box)
        labels.append(name)
        difficult.append(diff is not None and (diff.text or "0").strip() == "1")
    return ImageAnnotation(
        image_id=image_id,
        path=image_path,
        width=width,
        height=height,
        boxes=from_voc_pixels(np.array(voc, dtype=np.float64).reshape(-1, 4)),
        labels=tuple(labels),
        difficult=np.array(difficult, dtype=bool),
    )


class VOCDataset:
    """Images and annotations of one split of a VOC-layout folder.

    ``root/ImageSets/Main/<split>.txt`` lists the ids; ``root/Annotations/<id>.xml``
    and ``root/JPEGImages/<id>.jpg`` hold the data (or ``<id>`` with another of
    :data:`IMAGE_SUFFIXES`, when there is no ``.jpg``). Annotations are parsed lazily
    and cached.

    ``only`` (a class list) leaves objects of other classes out of every annotation, for a detector of a
    subset of the dataset's classes.

    ``skip`` maps ids listed in the split to why they are left out (as
    :func:`find_bad_images` returns it): they are not in ``ids`` and not read by
    :attr:`fingerprint`, and stay named in ``skipped``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        skip: Mapping[str, str] | None = None,
        only: tuple[str, ...] | None = None,
        clip: bool = False,
    ):
        self.root = Path(root)
        self.split = split
        self.clip = clip  # boxes reaching past the image are clipped to it (data.clip_boxes)
        self.only = only  # with a class list, objects of other classes are left out of every annotation
        self.left_out: Counter[str] = Counter()  # per class, the objects left out so far (of annotations parsed)
        if not self.root.is_dir():  # each caller says how to name another (ROOT_LAYOUT)
            raise UserError(f"dataset root '{self.root}' does not exist")
        problem = name_problem(split)
        if problem is not None:
            folder = self.root / "ImageSets" / "Main"
            raise UserError(f"split name {split!r} cannot be a file name ({problem}); name a file in {folder}")
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise UserError(missing_split_file(split_file.parent, split))
        self.split_file = split_file
        ids = read_split_file(split_file)
        seen: set[str] = set()
        for image_id in ids:
            problem = name_problem(image_id) or ("it starts with '.'" if image_id.startswith(".") else None)
            if problem is not None:
                raise UserError(f"{split_file}: image id {image_id!r} is not a plain file name ({problem})")
            if image_id in seen:
                raise UserError(f"{split_file}: image id {image_id!r} is listed twice; remove the duplicate line")
            seen.add(image_id)
        skip = skip or {}
        self.skipped: dict[str, str] = {i: skip[i] for i in ids if i in skip}
        self.ids: list[str] = [i for i in ids if i not in self.skipped]
        self._cache: dict[str, ImageAnnotation] = {}
        self._paths: dict[str, Path] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: str) -> Path:
        """``JPEGImages/<id>.jpg``, else the first ``<id>`` with another image suffix; the ``.jpg`` when none is there."""
        if image_id not in self._paths:
            folder, found = self.root / "JPEGImages", None
            for suffix in IMAGE_SUFFIXES:
                found = next((p for s in (suffix, suffix.upper()) if (p := folder / f"{image_id}{s}").is_file()), None)
                if found is not None:
                    break
            self._paths[image_id] = found or folder / f"{image_id}.jpg"
        return self._paths[image_id]

    def annotation(self, image_id: str) -> ImageAnnotation:
        if image_id not in self._cache:
            xml_path = self.root / "Annotations" / f"{image_id}.xml"
            ann = parse_voc_xml(xml_path, self.image_path(image_id), image_id, self.clip)
            if self.only is not None:
                keep = np.array([name in self.only for name in ann.labels], bool)
                self.left_out.update(name for name, k in zip(ann.labels, keep) if not k)
                labels = tuple(name for name, k in zip(ann.labels, keep) if k)
                ann = dataclasses.replace(ann, boxes=ann.boxes[keep], labels=labels, difficult=ann.difficult[keep])
            self._cache[image_id] = ann
        return self._cache[image_id]

    def annotations(self) -> list[ImageAnnotation]:
        return [self.annotation(i) for i in self.ids]

    def classes(self) -> tuple[str, ...]:
        """Sorted object class names found in this split."""
        return tuple(sorted({name for a in self.annotations() for name in a.labels}))

    def problem(self, image_id: str, classes: tuple[str, ...] | None = None) -> str | None:
        """What makes one image unusable short of decoding it, as one line naming the file; None if nothing.

        The annotation must parse, the image file must exist and, given ``classes``,
        every object's class must be one of them. :meth:`decode_problem` does the rest.
        """
        try:
            ann = self.annotation(image_id)
        except UserError as e:
            return str(e)
        if not ann.path.is_file():
            others = ", ".join(s for s in IMAGE_SUFFIXES if s != ".jpg")
            return f"image '{ann.path}' is listed in {self.split_file} but missing (nor is there {image_id} with {others})"
        unknown = [name for name in ann.labels if classes is not None and name not in classes]
        if unknown:
            close = close_class(unknown[0], classes)
            advice = (
                f"did you mean '{close}'?"
                if close
                else "add it to data.classes (a class needs objects in trainval to be learnt), or rename or remove the "
                "object, or set data.other_classes: ignore to leave such objects out"
            )
            return (
                f"{self.root / 'Annotations' / (image_id + '.xml')}: class '{unknown[0]}' is not in the "
                f"pipeline's class list ({', '.join(classes)}); {advice}"
            )
        return None

    def decode_problem(self, image_id: str) -> str | None:
        """Why the image does not decode, or decodes to another size than its annotation says; None if it is fine."""
        try:
            load_image(self.annotation(image_id))
        except UserError as e:
            return str(e)
        return None

    def content_digest(self, image_id: str) -> str:
        """Hash of one image's annotation and image bytes (the key under which its decoding is remembered)."""
        h = hashlib.blake2b(digest_size=16)
        for path in (self.root / "Annotations" / f"{image_id}.xml", self.image_path(image_id)):
            data = path.read_bytes()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()

    def require_images(self) -> None:
        """Refuse a split file that lists no image: a stage would train on nothing, or score nothing as mAP nan."""
        if not self.ids and not self.skipped:
            raise UserError(f"split '{self.split}' is empty: '{self.split_file}' lists no image ids; add one id per line")

    def check(self, classes: tuple[str, ...] | None = None) -> None:
        """Refuse an empty split, parse every annotation and confirm every image exists, before long work starts."""
        self.require_images()
        for image_id in self.ids:
            reason = self.problem(image_id, classes)
            if reason is not None:
                raise UserError(reason)

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of the split file, every annotation and every image of the split.

        Skipped images are not read; their ids are hashed instead, so the fingerprint
        changes when one is repaired (and equals an unskipped split's when none is skipped).
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(self.split_file.read_bytes())
        for image_id in self.ids:
            for path in (self.root / "Annotations" / f"{image_id}.xml", self.image_path(image_id)):
                try:
                    h.update(path.read_bytes())
                except FileNotFoundError:
                    raise UserError(f"'{path}' is listed in {self.split_file} but missing") from None
        if self.skipped:
            h.update(("skipped:" + "\n".join(self.skipped)).encode())
        return h.hexdigest()


def find_bad_images(
    dataset: VOCDataset, classes: tuple[str, ...] | None = None, known_good: set[str] | None = None
) -> dict[str, str]:
    """Every unusable image of ``dataset``: id -> the one-line reason, in split order.

    An image is unusable when :meth:`VOCDataset.problem` (annotation, file, class) or
    :meth:`VOCDataset.decode_problem` (decoding, size) says so: exactly the checks a
    stage would fail on. Decoding is the slow part, so ``known_good`` may hold the
    :meth:`VOCDataset.content_digest` of images already found to decode to their
    annotated size; those are not decoded again, and the ones that decode now are added.
    """
    bad = {}
    for image_id in dataset.ids:
        reason = dataset.problem(image_id, classes)
        if reason is None:
            try:
                digest = dataset.content_digest(image_id) if known_good is not None else None
            except OSError:  # unreadable: decoding below says so in its words
                digest = None
            if digest is None or digest not in known_good:
                reason = dataset.decode_problem(image_id)
                if reason is None and digest is not None:
                    known_good.add(digest)
        if reason is not None:
            bad[image_id] = reason
    return bad


def check_pipeline_data(trainval: VOCDataset, test: VOCDataset, classes: tuple[str, ...], use_difficult: bool = True) -> None:
    """Everything about a pipeline's data that its annotations tell, checked before the first long stage.

    Every annotation of both splits parses, every image file exists and every object's
    class is one of ``classes`` (:meth:`VOCDataset.check`); every class name can be a
    file name; and every class has an object to train on in ``trainval`` (one not
    marked difficult, unless ``use_difficult``), which the class SVMs need (R-CNN trains
    one per class); and ``test`` has an object to score. Decoding every image is left to the stages (or ``--skip-bad``).

    Raises:
        UserError: the first defect, in one line naming the file or the classes.
    """
    for name in classes:
        problem = name_problem(name)
        if problem is not None:
            raise UserError(f"class name {name!r} of the pipeline's class list cannot be a file name ({problem})")
    alike = [c for c in classes if [d.casefold() for d in classes].count(c.casefold()) > 1]
    if alike:  # their devkit files and plots would be one file on a case-insensitive filesystem (macOS, Windows)
        raise UserError(f"classes {', '.join(map(repr, alike))} differ only in case; give them one spelling or other names")
    trainval.check(classes)
    test.check(classes)
    usable: set[str] = set()
    difficult_only: set[str] = set()
    for ann in trainval.annotations():
        for name, hard in zip(ann.labels, ann.difficult.tolist()):
            (difficult_only if hard and not use_difficult else usable).add(name)
    missing = [name for name in classes if name not in usable]
    if missing:
        hard = [name for name in missing if name in difficult_only]
        why = f" ({', '.join(hard)}: only objects marked difficult; data.use_difficult: true trains on them)" if hard else ""
        which = f"class {missing[0]} has" if len(missing) == 1 else f"classes {', '.join(missing)} have"
        raise UserError(
            f"{which} no object to train on in split '{trainval.split}' of {trainval.root}{why}; "
            "annotate some, or leave them out of data.classes"
        )
    if not any((~ann.difficult).any() for ann in test.annotations()):
        raise UserError(
            f"split '{test.split}' of {test.root} has no object to score (none, or only objects marked difficult, which "
            "the devkit ignores), so its mAP would be undefined; annotate some, or set data.test to another split"
        )


def decode_image(path: Path) -> np.ndarray:
    """Decode an image file as BGR uint8 ``[H, W, 3]``, in its stored pixel order.

    EXIF orientation is ignored on purpose: VOC annotations, like the VOC tools,
    refer to the stored pixels. Grayscale, CMYK and alpha images become 3-channel
    BGR. A JPEG cut short (no end-of-image marker) is refused rather than silently
    decoded with a grey lower part.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"image '{path}' is missing") from None
    except OSError as e:
        raise UserError(f"image '{path}' cannot be read ({e.strerror})") from None
    if not data:  # OpenCV asserts (cv2.error) on an empty buffer rather than returning None
        raise UserError(f"image '{path}' cannot be decoded (an empty file); replace the file")
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-64:]:
        raise UserError(f"image '{path}' is a truncated JPEG (no end-of-image marker); replace the file")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:
        image = None
    if image is None:
        raise UserError(f"image '{path}' cannot be decoded (corrupt or not an image)")
    return image


def load_image(ann: ImageAnnotation) -> np.ndarray:
    """Decode the image of ``ann`` as a BGR uint8 ``[H, W, 3]`` array, checking its size against the XML."""
    image = decode_image(ann.path)
    h, w = image.shape[:2]
    if (w, h) != (ann.width, ann.height):
        orientation = exif_orientation(ann.path)
        turned = TURNED[orientation] if orientation >= 5 else ""  # 5 to 8 swap width and height
        hint = (
            f" (its EXIF orientation tag shows it {turned} in viewers; boxes refer to the stored pixels, as in VOC: "
            "save the image upright, or annotate the stored frame)"
            if turned
            else ""
        )
        raise UserError(f"image '{ann.path}' is {w}x{h} but its annotation says {ann.width}x{ann.height}{hint}")
    return image
