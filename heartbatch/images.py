"""Load any supported image file as a display-oriented float array.

Used by training and `heartbatch evaluate`: DICOM files go through the same
pixel pipeline as `heartbatch run`; PNG/JPEG/TIFF files are read with Pillow
as greyscale (they are already display-oriented).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def is_dicom(path: str | Path) -> bool:
    """True when the file has the DICOM preamble or a DICOM suffix, or is a dataset written
    without them (as `heartbatch run` reads it: a report may list such files by any name)."""
    path = Path(path)
    if path.suffix.lower() in {".dcm", ".dicom"}:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    from .dicom import looks_like_raw_dataset

    return looks_like_raw_dataset(path)


def load_image(path: str | Path) -> np.ndarray:
    """Return the image at ``path`` as a 2-D float32 array, bright = dense."""
    if is_dicom(path):
        from .dicom import read_dicom  # pydicom only when needed

        return read_dicom(path).image
    with Image.open(path) as im:
        mode = "I" if im.mode.startswith("I;16") or im.mode == "I" else "L"
        return np.asarray(im.convert(mode), dtype=np.float32)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(rows, columns)`` without decoding pixels where the format allows."""
    if is_dicom(path):
        from .dicom import read_any_header  # the runtime's reading of a header

        header = read_any_header(path)[1]
        return header.rows, header.columns
    with Image.open(path) as im:
        return im.height, im.width
