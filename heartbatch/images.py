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
    """True when the file has the DICOM preamble or a DICOM suffix."""
    path = Path(path)
    if path.suffix.lower() in {".dcm", ".dicom"}:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


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
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return int(ds.Rows), int(ds.Columns)
    with Image.open(path) as im:
        return im.height, im.width
