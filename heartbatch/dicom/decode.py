"""Stored pixel values of a candidate: which pydicom decoding plugin, and the reduced-scale JPEG path.

Plugin choice asks pydicom's decoder for the transfer syntax what is installed
(``available_plugins``, ``is_available``, ``missing_dependencies``) rather than
reading exception texts.  What the values then become (modality LUT, VOI LUT,
MONOCHROME1) is :mod:`heartbatch.pixels`' concern, under its pipeline version.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import Decoder

from .. import sanitize
from ..errors import ReadError, Skipped
from ..pixels import display_image
from .values import integer, transfer_syntax, uid_name

# Fastest first, measured per transfer syntax (Pillow decodes JPEG Baseline
# several times faster than pylibjpeg); then pydicom tries every installed plugin.
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
DECODER_PREFERENCE = {
    JPEG_BASELINE: ("pillow", "pylibjpeg"),                # JPEG Baseline
    "1.2.840.10008.1.2.4.51": ("pylibjpeg", "pillow"),     # JPEG Extended
    "1.2.840.10008.1.2.4.90": ("pylibjpeg", "pillow"),     # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": ("pylibjpeg", "pillow"),     # JPEG 2000
    "1.2.840.10008.1.2.5": ("pylibjpeg", "pydicom"),       # RLE Lossless
}

DCT_SCALES = (8, 4, 2)  # libjpeg decodes baseline JPEG at 1/8, 1/4, 1/2 by scaling the DCT


def decoder_for(syntax: str) -> Decoder | None:
    """pydicom's decoder for a transfer syntax; None where pydicom has none (decoding then says so)."""
    try:
        return get_decoder(syntax)
    except NotImplementedError:
        return None


def plugin_order(syntax: str, decoder: Decoder | None) -> tuple[str, ...]:
    """The plugins to try in turn: the installed ones of DECODER_PREFERENCE, then "" (pydicom's
    own order over every installed plugin, which also says what is missing when none is)."""
    installed = decoder.available_plugins if decoder is not None else ()
    return tuple(p for p in DECODER_PREFERENCE.get(syntax, ()) if p in installed) + ("",)


def stored_pixels(ds: Dataset) -> np.ndarray:
    """The stored values of the single frame (raises ReadError when they cannot be decoded)."""
    syntax = transfer_syntax(ds)
    decoder = decoder_for(syntax)
    for plugin in plugin_order(syntax, decoder):
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return ds.pixel_array
        except RuntimeError as exc:
            # pydicom's RuntimeError: the chosen plugins all failed on these data (or none is
            # installed); another plugin may still decode them
            error = exc
        except (ValueError, NotImplementedError) as exc:
            error = exc  # the dataset itself (lengths, attributes, syntax): every plugin fails alike
            break
    if decoder is not None and not decoder.is_available and isinstance(error, RuntimeError):
        name = uid_name("TransferSyntaxUID", syntax, "this transfer syntax")
        missing = sanitize.redact("\n".join(decoder.missing_dependencies))
        options = "; ".join(line.strip() for line in missing.splitlines() if line.strip())
        raise ReadError(f"no decoder installed for {name}; install pylibjpeg-libjpeg, "
                        f"pylibjpeg-openjpeg and pylibjpeg-rle (or python-gdcm)"
                        + (f" [{sanitize.printable(options, 200)}]" if options else ""), code="no_decoder") from None
    raise ReadError(f"pixel data could not be decoded: {sanitize.message(error)}", code="decode_failed") from None


def reduced_jpeg(ds: Dataset, min_side: int) -> np.ndarray | None:
    """An 8-bit greyscale JPEG Baseline frame decoded at 1/k scale, or None when
    that is not possible exactly.

    Decoding at 1/4 costs about a quarter of a full decode, and a box average
    over k x k pixels is what an anti-aliased resize does anyway.  Only scales
    that divide both sides are used, so the reduced image covers exactly the
    same extent; anything unusual returns None and takes the full path, which
    also reports errors properly.
    """
    rows, columns = integer(ds, "Rows"), integer(ds, "Columns")
    if (transfer_syntax(ds) != JPEG_BASELINE or integer(ds, "SamplesPerPixel", 1) != 1
            or integer(ds, "BitsAllocated") != 8 or integer(ds, "PixelRepresentation") != 0
            or integer(ds, "NumberOfFrames", 1) > 1):
        return None
    scale = next((k for k in DCT_SCALES if rows % k == 0 and columns % k == 0
                  and min(rows, columns) // k >= min_side), None)
    if scale is None:
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        with Image.open(io.BytesIO(frame)) as jpeg:
            if jpeg.format != "JPEG" or jpeg.mode != "L" or jpeg.size != (columns, rows):
                return None
            jpeg.draft("L", (columns // scale, rows // scale))
            if jpeg.size != (columns // scale, rows // scale):
                return None
            return np.asarray(jpeg)
    except Exception:  # noqa: BLE001 - whatever went wrong, the full decoder will say it better
        return None


def decode(ds: Dataset, min_side: int | None = None) -> np.ndarray:
    """Display pixels of a candidate dataset.  With ``min_side``, the result may be
    reduced by an exact integer factor, to no less than ``min_side`` a side."""
    stored = reduced_jpeg(ds, min_side) if min_side else None
    if stored is None:
        stored = stored_pixels(ds)
    if stored.ndim != 2:
        raise Skipped(f"pixel array has shape {stored.shape}; a single 2-D greyscale frame expected",
                      code="not_2d")
    image = display_image(stored, ds)
    del stored
    if not np.isfinite(image).all():
        raise ReadError("pixel values are not finite after the modality/VOI LUT", code="not_finite")
    return image
