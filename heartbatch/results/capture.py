"""The Secondary Capture of a measured image: the film with the boxes and numbers burned in, for
viewers that show neither an SR nor a presentation state. It is a new, derived image, so it says
so: burned-in annotation, how it was derived (resampled, JPEG baseline), its lossy history and the
image it came from."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.multival import MultiValue

from ..dicom.header import pixel_spacing
from ..records import Record
from .output import MANUFACTURER, save, software_version
from .source import check_record, read_source_header, source_sop_uid, source_warnings_silenced
from .uids import result_uid
from .vocabulary import plain_code, vocabulary

#: Longer side of a Secondary Capture image, in pixels (smaller images keep their size).
CAPTURE_MAX_SIDE = 2048

SC_SERIES_NUMBER = 9903


def write_capture(record: Record, model_id: str, out_dir: Path, max_side: int = CAPTURE_MAX_SIDE) -> Path:
    """Write ``<sop>.sc.dcm`` in ``out_dir``: a Secondary Capture image (RGB, 8 bits, JPEG
    baseline) of the source image at ``record.path`` with the boxes and numbers burned in, as
    :func:`heartbatch.overlay.render` draws them, the longer side at most ``max_side`` pixels (a
    smaller image keeps its size). Returns the path."""
    check_record(record)
    return write_capture_from_source(read_source_header(record.path), record, model_id, Path(out_dir), max_side)


def write_capture_from_source(source: pydicom.Dataset, record: Record, model_id: str, out_dir: Path,
                              max_side: int) -> Path:
    """:func:`write_capture` with the source header already read (a batch run reads it once for
    the SR too)."""
    import numpy as np

    from ..overlay import Marks, render

    sop = source_sop_uid(source, record)
    model_id = str(model_id)
    pixels = np.asarray(render(record.path, Marks.from_record(record), int(max_side)).convert("RGB"), dtype=np.uint8)
    out_rows, out_columns = pixels.shape[:2]
    rows, columns = record.header.rows, record.header.columns  # what the boxes are in
    sc_uid = result_uid(sop, model_id, "sc")
    sc = _sc_image(source, pixels, sop, model_id, _scaled_spacing(source, (rows, columns), (out_rows, out_columns)))
    _copy_source_labels(sc, source)
    _lossy_history(sc, source, 3 * out_rows * out_columns / max(1, len(sc.PixelData)))
    _derivation(sc, (rows, columns), (out_rows, out_columns))
    sc.SourceImageSequence = [_source_reference(source, sop)]
    return save(sc, Path(out_dir) / f"{sc_uid}.sc.dcm")


def _scaled_spacing(source: pydicom.Dataset, size: tuple[int, int], out_size: tuple[int, int]):
    """The source's Pixel Spacing scaled to the capture's size, or None. Pixel Spacing only:
    Imager Pixel Spacing is at the detector, and the SC IOD has no such attribute; calling it Pixel
    Spacing would claim a calibration in the patient plane."""
    spacing = pixel_spacing(source, ("PixelSpacing",))
    if spacing is None:
        return None
    (rows, columns), (out_rows, out_columns) = size, out_size
    return round(spacing[0] * rows / out_rows, 6), round(spacing[1] * columns / out_columns, 6)


def _sc_image(source: pydicom.Dataset, pixels, sop: str, model_id: str, spacing):
    """highdicom's SC image of ``pixels``, JPEG baseline, with the source's patient and study."""
    from pydicom.uid import JPEGBaseline8Bit

    import highdicom as hd

    with source_warnings_silenced():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=pixels,
            # JPEG baseline: highdicom converts RGB to YCbCr and labels it YBR_FULL_422. (Pillow
            # subsamples the chroma 4:2:0; DICOM CP 1653 allows other subsamplings under that
            # label, per DCMTK feature #995, https://support.dcmtk.org/redmine/issues/995.)
            photometric_interpretation=hd.PhotometricInterpretationValues.YBR_FULL_422,
            bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=result_uid(sop, model_id, "sc-series"), series_number=SC_SERIES_NUMBER,
            sop_instance_uid=result_uid(sop, model_id, "sc"), instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER, software_versions=software_version(),
            device_serial_number=model_id[:64],
            pixel_spacing=spacing,
            # placeholder that highdicom requires for a PATIENT image; replaced by the source's below
            patient_orientation=("L", "F"),
            transfer_syntax_uid=JPEGBaseline8Bit,
            series_description=f"heartbatch overlay ({model_id})"[:64])
        sc.copy_patient_and_study_information(source)
    return sc


def _copy_source_labels(sc: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """Orientation and what a viewer files or hides an image by, from the source (resampling and
    drawing keep the orientation: the source's value, or empty, type 2, if unknown); and the burned-in
    annotation flag, which is ours."""
    orientation = source.get("PatientOrientation")
    orientation = [str(x) for x in orientation] if isinstance(orientation, (list, tuple, MultiValue)) else []
    sc.PatientOrientation = orientation if len(orientation) == 2 and all(orientation) else None
    sc.BurnedInAnnotation = "YES"
    for keyword in ("BodyPartExamined", "RecognizableVisualFeatures"):
        if source.get(keyword):
            setattr(sc, keyword, source.get(keyword))


def _derivation(sc: pydicom.Dataset, size: tuple[int, int], out_size: tuple[int, int]) -> None:
    """Derivation Description and Code Sequence: the overlay, the resampling when the size
    changed, and the lossy JPEG."""
    v = vocabulary()
    (rows, columns), (out_rows, out_columns) = size, out_size
    derivation = ["heartbatch overlay burned in (heart box red, thorax box blue, CTR)"]
    codes = []
    if out_size != size:
        derivation.append(f"resampled from {columns}x{rows} to {out_columns}x{out_rows}")
        codes.append(v.spatial_resampling)
    derivation.append("JPEG baseline")
    codes.append(v.lossy_compression)
    sc.DerivationDescription = "; ".join(derivation)[:1024]
    sc.DerivationCodeSequence = [plain_code(c) for c in codes]


def _source_reference(source: pydicom.Dataset, sop: str) -> pydicom.Dataset:
    """The Source Image Sequence item: the source image, as the one the capture was processed from."""
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = sop
    reference.PurposeOfReferenceCodeSequence = [plain_code(vocabulary().source_image_for_processing)]
    return reference


def _lossy_history(sc: pydicom.Dataset, source: pydicom.Dataset, ratio: float) -> None:
    """Lossy Image Compression: always "01" (JPEG baseline is lossy). Method and ratio list each
    lossy step in order: the source's steps, when it records methods and ratios alike, then ours."""
    def values(keyword: str) -> list[str]:
        value = source.get(keyword)
        if value is None or value == "":
            return []
        return [str(value)] if isinstance(value, (str, float, int)) else [str(x) for x in value]

    methods, ratios = values("LossyImageCompressionMethod"), values("LossyImageCompressionRatio")
    if len(methods) != len(ratios):
        methods, ratios = [], []
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionMethod = [*methods, "ISO_10918_1"]
    sc.LossyImageCompressionRatio = [*ratios, f"{ratio:.2f}"]
