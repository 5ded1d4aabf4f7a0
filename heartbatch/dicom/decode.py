"""Stored pixel values of a candidate: which pydicom decoding plugin, and decoding at a reduced scale.

Plugin choice asks pydicom's decoder for the transfer syntax what is installed
(``available_plugins``, ``is_available``, ``missing_dependencies``) rather than
reading exception texts.  What the values then become (modality LUT, VOI LUT,
MONOCHROME1) is :mod:`heartbatch.pixels`' concern, under its pipeline version.

The model needs ``S`` pixels a side; a chest film has 1000-4000.  Where the
caller says so (``min_side``), the stored values are reduced by an integer
factor ``k`` that divides both sides (so the reduced image covers exactly the
same extent, and boxes map back exactly) and leaves at least ``min_side``:
JPEG Baseline by libjpeg's DCT scaling, JPEG 2000 by decoding only the
coarser wavelet resolution levels, every other encoding by a k x k block mean
of the decoded values.  All three are local means, which is what the
anti-aliased resize that follows would compute anyway.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from .. import sanitize
from ..errors import ReadError, Skipped
from ..pixels import display_image
from . import turbo
from .values import integer, transfer_syntax, uid_name

# Fastest first, measured per transfer syntax on 2048 x 2048 12-bit films (ms per decode): Pillow decodes
# JPEG Baseline several times faster than pylibjpeg; lossless JPEG libjpeg-turbo 36, pylibjpeg 200;
# JPEG-LS CharLS (pyjpegls) 55, pylibjpeg 190; RLE pylibjpeg-rle 30, pydicom 380; JPEG 2000 lossless
# pylibjpeg 300, Pillow 370.  Then pydicom tries every installed plugin.
JPEG_2000 = (JPEG2000Lossless, JPEG2000)
DECODER_PREFERENCE = {
    JPEGBaseline8Bit: ("pillow", "pylibjpeg"),
    JPEGExtended12Bit: ("pylibjpeg", "pillow"),
    JPEGLossless: (turbo.LABEL, "pylibjpeg"),
    JPEGLosslessSV1: (turbo.LABEL, "pylibjpeg"),
    JPEGLSLossless: ("pyjpegls", "pylibjpeg"),
    JPEGLSNearLossless: ("pyjpegls", "pylibjpeg"),
    JPEG2000Lossless: ("pylibjpeg", "pillow"),
    JPEG2000: ("pylibjpeg", "pillow"),
    RLELossless: ("pylibjpeg", "pydicom"),
}

DCT_SCALES = (8, 4, 2)  # libjpeg decodes baseline JPEG at 1/8, 1/4, 1/2 by scaling the DCT
BLOCK_FACTORS = (16, 8, 4, 2)  # block means of other encodings' decoded values
MAX_J2K_LEVELS = 5  # 1/32: a 7000-pixel film at 219; OpenJPEG's default has 5 levels


def _register_turbo() -> None:
    """Offer libjpeg-turbo to pydicom's lossless JPEG decoders (once per process)."""
    for syntax in turbo.SYNTAXES:
        try:
            get_decoder(syntax).add_plugin(turbo.LABEL, (turbo.__name__, "_decode_frame"))
        except ValueError:  # already registered (available or not)
            pass


_register_turbo()


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


def reduction(rows: int, columns: int, min_side: int, factors) -> int | None:
    """The largest of ``factors`` that divides both sides and leaves at least ``min_side``, or None."""
    return next((k for k in factors if rows % k == 0 and columns % k == 0 and min(rows, columns) // k >= min_side),
                None)


def _single_frame(ds: Dataset) -> bytes | None:
    """The one encapsulated frame of a single-frame greyscale dataset, or None."""
    if integer(ds, "SamplesPerPixel", 1) != 1 or integer(ds, "NumberOfFrames", 1) > 1:
        return None
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def reduced_jpeg(ds: Dataset, min_side: int) -> np.ndarray | None:
    """An 8-bit greyscale JPEG Baseline frame decoded at 1/k scale, or None when
    that is not possible exactly.

    Decoding at 1/4 costs about a quarter of a full decode.  Anything unusual
    returns None and takes the full path, which also reports errors properly.
    """
    rows, columns = integer(ds, "Rows"), integer(ds, "Columns")
    if (transfer_syntax(ds) != JPEGBaseline8Bit or integer(ds, "BitsAllocated") != 8
            or integer(ds, "PixelRepresentation") != 0):
        return None
    scale = reduction(rows, columns, min_side, DCT_SCALES)
    if scale is None:
        return None
    try:
        frame = _single_frame(ds)
        if frame is None:
            return None
        with Image.open(io.BytesIO(frame)) as jpeg:
            if jpeg.format != "JPEG" or jpeg.mode != "L" or jpeg.size != (columns, rows):
                return None
            jpeg.draft("L", (columns // scale, rows // scale))
            if jpeg.size != (columns // scale, rows // scale):
                return None
            return np.asarray(jpeg)
    except Exception:  # noqa: BLE001 - whatever went wrong, the full decoder will say it better
        return None


@dataclass(frozen=True)
class Codestream:
    """What a JPEG 2000 main header says about the image (ISO/IEC 15444-1 Annex A)."""
    columns: int
    rows: int
    offset: tuple[int, int]   # image offset on the reference grid; DICOM streams use (0, 0)
    components: int
    precision: int            # bits per sample
    signed: bool
    levels: int               # fewest wavelet decomposition levels of any COD/COC in the main header


def codestream(frame: bytes) -> Codestream | None:
    """Parse the SIZ and COD/COC markers of a raw J2K codestream (as DICOM stores it); None when it is not one."""
    if frame[:4] != b"\xff\x4f\xff\x51":  # SOC then SIZ
        return None
    try:
        pos, siz, levels = 2, None, []
        while pos + 4 <= len(frame):
            marker, length = struct.unpack_from(">HH", frame, pos)
            body = frame[pos + 4:pos + 2 + length]
            if marker == 0xFF51:      # SIZ: Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz, Ssiz...
                xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", body, 2)
                components = struct.unpack_from(">H", body, 34)[0]
                ssiz = body[36]
                siz = (xsiz - xo, ysiz - yo, (xo, yo), components, (ssiz & 0x7F) + 1, bool(ssiz & 0x80))
            elif marker == 0xFF52:    # COD: Scod, progression, layers(2), MCT, then decomposition levels
                levels.append(body[5])
            elif marker == 0xFF53:    # COC: Ccoc (1 or 2 bytes), Scoc, then decomposition levels
                levels.append(body[(2 if siz and siz[3] >= 257 else 1) + 1])
            elif marker == 0xFF90:    # SOT: the main header ends
                break
            pos += 2 + length
    except (struct.error, IndexError):
        return None
    if siz is None or not levels:
        return None
    return Codestream(*siz, levels=min(levels))


def reduced_j2k(ds: Dataset, min_side: int) -> np.ndarray | None:
    """The stored values of a greyscale JPEG 2000 frame decoded at a coarser resolution
    level (1/2^r a side), or None when that is not possible exactly.

    A wavelet code holds each lower resolution without the higher ones, so
    decoding at 1/4 a side skips most of the work (Pillow's OpenJPEG ``reduce``).
    The level is the coarsest that divides both sides, leaves at least
    ``min_side`` pixels and the stream has.  Its samples sit at the first pixel
    of each 2^r block, not at the block's centre: :func:`j2k_offset`.
    """
    if transfer_syntax(ds) not in JPEG_2000:
        return None
    try:
        frame = _single_frame(ds)
        header = codestream(frame) if frame is not None else None
        rows, columns = integer(ds, "Rows"), integer(ds, "Columns")
        signed = integer(ds, "PixelRepresentation") == 1
        if (header is None or header.components != 1 or header.offset != (0, 0)
                or (header.rows, header.columns) != (rows, columns) or header.signed != signed
                or header.precision != integer(ds, "BitsStored") or header.precision > 16):
            return None  # pydicom's decoder knows how to reconcile such streams with the dataset
        factor = reduction(rows, columns, min_side, [1 << r for r in range(min(header.levels, MAX_J2K_LEVELS), 0, -1)])
        if factor is None:
            return None
        with Image.open(io.BytesIO(frame)) as j2k:
            if j2k.format != "JPEG2000" or j2k.mode not in ("L", "I;16") or j2k.size != (columns, rows):
                return None
            j2k.reduce = factor.bit_length() - 1
            j2k.load()
            values = np.asarray(j2k)
    except Exception:  # noqa: BLE001 - whatever went wrong, the full decoder will say it better
        return None
    if values.shape != (rows // factor, columns // factor):
        return None
    return _pillow_to_stored(values, header.precision, signed)


def j2k_offset(full_side: int, reduced_side: int) -> float:
    """How far (in reduced pixels) a JPEG 2000 resolution level's samples sit before the centres of
    the blocks they stand for.

    The low-pass sample i of level r is centred on full-resolution pixel 2^r i (the
    wavelet filters are centred on even samples), the block it stands for on
    2^r i + (2^r - 1) / 2.  Left alone, the image is shifted by 3.5 full pixels at
    r = 3 and every box with it (0.34 px at 224 on the validation split, heart IoU
    -0.002); :func:`recentre` moves the samples back.
    """
    factor = full_side // reduced_side
    return (factor - 1) / (2 * factor) if factor > 1 else 0.0


def recentre(image: np.ndarray, offset: float) -> np.ndarray:
    """Resample ``image`` ``offset`` pixels further along both axes (linear interpolation,
    the last row and column repeated): sample i becomes the value at i + offset."""
    if not offset:
        return image
    image = np.asarray(image, dtype=np.float32)
    keep, take = np.float32(1.0 - offset), np.float32(offset)
    rows = image * keep
    rows[:-1] += image[1:] * take
    rows[-1] += image[-1] * take
    out = rows * keep
    out[:, :-1] += rows[:, 1:] * take
    out[:, -1] += rows[:, -1] * take
    return out


def _pillow_to_stored(values: np.ndarray, precision: int, signed: bool) -> np.ndarray:
    """Undo Pillow's mapping of J2K samples to L / I;16: shifted up to the mode's full range,
    signed samples offset to unsigned.  Exact: only shifts and an integer offset."""
    if values.dtype == np.uint16 and precision < 16:
        values = values >> (16 - precision)
    if not signed:
        return values
    wide = values.astype(np.int32) - (1 << (precision - 1))
    return wide.astype(np.int8 if precision <= 8 else np.int16)


def block_mean(stored: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor x factor`` block, rounded to the stored type (as the JPEG and
    JPEG 2000 reductions give it), computed in integers: no full-size float copy.

    Rows are summed first (contiguous memory, several times faster than a 4-D reduce);
    16 x 16 values of 16 bits fit a 32-bit sum.
    """
    rows, columns = stored.shape
    if stored.dtype.kind == "f":
        blocks = stored.reshape(rows // factor, factor, columns).sum(axis=1, dtype=np.float64)
        return (blocks.reshape(rows // factor, columns // factor, factor).sum(axis=2) / factor ** 2
                ).astype(np.float32)
    small = stored.dtype.itemsize <= 2
    accumulator = (np.int32 if small else np.int64) if stored.dtype.kind == "i" else (np.uint32 if small else np.uint64)
    down = stored.reshape(rows // factor, factor, columns).sum(axis=1, dtype=accumulator)
    blocks = down.reshape(rows // factor, columns // factor, factor).sum(axis=2)
    area = accumulator(factor * factor)
    return ((blocks + area // 2) // area).astype(stored.dtype)  # round half up, exactly


def decode(ds: Dataset, min_side: int | None = None) -> np.ndarray:
    """Display pixels of a candidate dataset.  With ``min_side``, the result may be
    reduced by an exact integer factor, to no less than ``min_side`` a side."""
    stored, offset = None, 0.0
    if min_side:
        stored = reduced_jpeg(ds, min_side)  # DCT scaling: samples at block centres already
        if stored is None and (stored := reduced_j2k(ds, min_side)) is not None:
            offset = j2k_offset(integer(ds, "Columns"), stored.shape[1])
    if stored is None:
        stored = stored_pixels(ds)
        if stored.ndim != 2:
            raise Skipped(f"pixel array has shape {stored.shape}; a single 2-D greyscale frame expected",
                          code="not_2d")
        factor = reduction(*stored.shape, min_side, BLOCK_FACTORS) if min_side else None
        if factor is not None:
            stored = block_mean(stored, factor)
    image = recentre(display_image(stored, ds), offset)
    del stored
    if not np.isfinite(image).all():
        raise ReadError("pixel values are not finite after the modality/VOI LUT", code="not_finite")
    return image
