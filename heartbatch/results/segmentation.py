"""The DICOM Segmentation of a measured image, for a model with ``masks``: the heart, the right lung
and the left lung (the patient's) on the source image's pixel grid, referencing it, so a viewer or
PACS shows what the boxes and the CTR were measured from.

**Binary**, not fractional: every viewer and PACS that reads Segmentations shows binary ones, a
fractional one is not shown by several, and the structures the row measured are the mask cells at
half probability (:data:`heartbatch.masks.PRESENT`), the same cut the outlines use; the soft edge
the boxes come from is below a film pixel once resampled.  Bit-packed, three frames of a film's
size are about 3 x rows x columns / 8 bytes.

The masks are on the model input's grid (the whole film resized to S x S, or coarser); they are
resampled to the film's ``rows x columns`` with the mapping the boxes use
(:func:`heartbatch.masks.to_grid`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pydicom

from ..records import Record
from .output import MANUFACTURER, save, software_version
from .source import source_sop_uid, source_warnings_silenced
from .uids import result_uid

SEG_SERIES_NUMBER = 9904
SEG = "seg"

#: SNOMED CT codes of the three segments (segmented property type) and their category.
#: Heart 80891009 and "Anatomical Structure" 91723000 (CID 7150 "Segmentation Property Categories")
#: as in pydicom's concept dictionary (``codes.SCT.Heart``, ``codes.SCT.AnatomicalStructure``);
#: right lung structure 3341006 and left lung structure 44029006 are SNOMED CT body structures that
#: pydicom's dictionary does not name (it has "Lung" 39607008, used with a laterality modifier):
#: the laterality is in the concept itself, as the segment needs.
SEGMENTS = (
    ("Heart", ("80891009", "SCT", "Heart")),
    ("Right lung", ("3341006", "SCT", "Right lung")),
    ("Left lung", ("44029006", "SCT", "Left lung")),
)
CATEGORY = ("91723000", "SCT", "Anatomical Structure")


def seg_uid(sop: str, model_id: str) -> str:
    return result_uid(sop, model_id, SEG)


def write_segmentation(source: pydicom.Dataset, record: Record, model_id: str, model_version: str,
                       out_dir: Path) -> Path:
    """Write ``<sop>.seg.dcm`` in ``out_dir`` (:func:`build_segmentation`); returns the path."""
    seg = build_segmentation(source, record, model_id, model_version)
    return save(seg, Path(out_dir) / segmentation_name(seg))


def segmentation_name(seg: pydicom.Dataset) -> str:
    return f"{seg.SOPInstanceUID}.seg.dcm"


def build_segmentation(source: pydicom.Dataset, record: Record, model_id: str, model_version: str):
    """A binary Segmentation of the record's masks (heart, right lung, left lung) on the source
    image, its UIDs derived from the source's and the model id. Raises ValueError for a record
    without masks."""
    import highdicom as hd

    sop = source_sop_uid(source, record)
    if record.masks is None:
        raise ValueError(f"record for {record.path} has no masks (the model has no 'masks' output)")
    from ..masks import solid_on_grid

    rows, columns = int(source.Rows), int(source.Columns)
    solid = solid_on_grid(record.masks, rows, columns)          # [3, rows, columns]
    pixels = np.moveaxis(solid, 0, -1)[None].astype(np.uint8)   # [1, rows, columns, 3]: one frame, 3 segments
    uid = seg_uid(sop, model_id)
    with source_warnings_silenced():
        seg = hd.seg.Segmentation(
            source_images=[source], pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_descriptions(sop, str(model_id), str(model_version or "")),
            series_instance_uid=result_uid(sop, model_id, "seg-series"), series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=uid, instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=str(model_id)[:64], software_versions=software_version(),
            device_serial_number=str(model_id)[:64], omit_empty_frames=False,
            series_description=f"heartbatch masks ({model_id})"[:64],
            content_label="HEARTBATCH", content_description="heart and lungs")
    _drop_flat_pixel_measures(seg)
    return seg


def _drop_flat_pixel_measures(seg: pydicom.Dataset) -> None:
    """For a projection radiograph (no slice), highdicom copies the source's Pixel Spacing into a
    Pixel Measures functional group without a Slice Thickness, which its own reader (``segread``)
    then refuses. The segmentation is on the source image's own pixel grid (same rows and columns,
    referenced by SOP Instance UID), so the group says nothing the source does not: it is dropped."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures is not None and not any("SliceThickness" in item for item in measures):
        del shared.PixelMeasuresSequence


@functools.lru_cache(maxsize=16)
def _algorithm(model_id: str, model_version: str):
    """The segments' algorithm identification: heartbatch, the model id as its version (once per process)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=MANUFACTURER, family=codes.cid7162.ArtificialIntelligence, version=model_id,
        parameters={"model version": model_version} if model_version else None)


def _descriptions(sop: str, model_id: str, model_version: str) -> list:
    """The three segment descriptions, each tracking its structure on this image with a derived UID."""
    import highdicom as hd
    from highdicom.sr import CodedConcept

    algorithm = _algorithm(model_id, model_version)
    return list(hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=CodedConcept(*CATEGORY),
        segmented_property_type=CodedConcept(*code), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_id=label,
        tracking_uid=result_uid(sop, model_id, f"segment-{label}"))
        for number, (label, code) in enumerate(SEGMENTS, start=1))
