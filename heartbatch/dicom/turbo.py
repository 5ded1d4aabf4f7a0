"""A pydicom decoding plugin: lossless JPEG (process 14) by libjpeg-turbo 3, through imagecodecs.

pydicom's only installed plugin for these transfer syntaxes is pylibjpeg's
libjpeg, which took 200 ms for a 2048 x 2048 12-bit film here; libjpeg-turbo
3 decodes the same stream in 36 ms, bit for bit (benchmarks/throughput.py
--syntaxes; tests/test_reduced_decode.py compares the two).  Registered by
:mod:`heartbatch.dicom.decode` and preferred where imagecodecs is installed.
"""

from __future__ import annotations

from pydicom import uid
from pydicom.pixels.decoders.base import DecodeRunner

LABEL = "libjpeg-turbo"
SYNTAXES = (uid.JPEGLossless, uid.JPEGLosslessSV1)
DECODER_DEPENDENCIES = {syntax: ("numpy", "imagecodecs>=2024.1") for syntax in SYNTAXES}


def is_available(syntax: str) -> bool:
    """imagecodecs built with libjpeg-turbo 3 (lossless support), for the lossless JPEG syntaxes."""
    if syntax not in SYNTAXES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    try:
        major = int(str(imagecodecs.jpeg8_version()).split("libjpeg_turbo ")[-1].split(".")[0])
    except (AttributeError, ValueError):
        return False
    return imagecodecs.JPEG8.available and major >= 3


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One frame's samples, little endian, in a container of 8 or 16 bits as its precision needs."""
    import imagecodecs
    import numpy as np

    frame = imagecodecs.jpeg8_decode(src)
    if frame.ndim != 2:
        raise ValueError(f"libjpeg-turbo gave a {frame.ndim}-D frame; greyscale expected")
    runner.set_option("bits_allocated", 8 * frame.dtype.itemsize)
    return np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<")).tobytes()
