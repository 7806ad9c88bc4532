"""What an image file's header says beyond its pixels, for advice on own data: the EXIF orientation viewers apply,
and 16-bit images that use little of their range."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# EXIF orientations that viewers show turned or mirrored (1 is as stored); 5 to 8 swap width and height.
TURNED = {
    2: "mirrored",
    3: "turned 180°",
    4: "upside down and mirrored",
    5: "turned and mirrored",
    6: "turned 90° clockwise",
    7: "turned and mirrored",
    8: "turned 90° anticlockwise",
}


def dim_16bit_peak(path: Path) -> int | None:
    """The largest value of a 16-bit PNG or TIFF that uses under a sixteenth of its range (12-bit camera data, for
    one), which decodes to 8 bits nearly black; None for any other image."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in (b"\x89PNG", b"II*\x00", b"MM\x00*"):
        return None
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.dtype != np.uint16:
        return None
    peak = int(image.max())
    return peak if peak < 4096 else None


def exif_orientation(path: Path) -> int:
    """A JPEG's EXIF orientation (1 to 8; 1 when it has none, cannot be read, or the file is not a JPEG, where
    cameras write the tag). Pillow reads a JPEG's header here, not its pixels."""
    from PIL import Image  # Pillow: a dependency of matplotlib; imported only here

    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                return 1
        with Image.open(path) as im:
            value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 -- any unreadable header means no orientation to report
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1
