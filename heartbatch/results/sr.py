"""The Structured Report of a measured image: a TID 1500 Measurement Report (Comprehensive 3D SR)
with the heart and thorax widths, their boxes on the source image, and the CTR with its enlarged
and review flags, so a PACS or a reader gets the numbers as coded, queryable content rather than
as text in a picture."""

from __future__ import annotations

import functools
from pathlib import Path

import pydicom

from ..records import Record
from .output import MANUFACTURER, save
from .source import box_corners, source_sop_uid, source_warnings_silenced
from .uids import result_uid
from .vocabulary import vocabulary

#: Decimal places written (and so the precision a reader gets back).
CTR_DECIMALS = 4
WIDTH_DECIMALS = 2

SR_SERIES_NUMBER = 9901


def write_sr(source: pydicom.Dataset, record: Record, model_id: str, model_version: str,
             out_dir: Path, segmentation: pydicom.Dataset | None = None) -> Path:
    """Write ``<sop>.sr.dcm`` (sop: the SR's SOP Instance UID) in ``out_dir``: a TID 1500
    Measurement Report with one planar ROI group per box (its width, SCT "Width" at finding site
    Heart or Thorax, and its polygon on the source image), and one group with the CTR, enlarged
    yes/no and the review flag. With ``segmentation`` (the image's DICOM Segmentation of a model with
    masks), one planar ROI group more per segment (heart, right lung, left lung) that references it
    (TID 1410 Referenced Segmentation Frame, with its source image), and the Segmentation in the evidence.
    Returns the path."""
    import highdicom as hd

    sop = source_sop_uid(source, record)
    model_id = str(model_id)
    algorithm = _algorithm(model_id, str(model_version or ""))
    with source_warnings_silenced():
        groups = _box_groups(source, record, sop, model_id, algorithm)
        ratio = _ratio_group(source, record, sop, model_id, algorithm)
        if ratio is not None:
            groups.append(ratio)
        if segmentation is not None:
            groups.extend(_segment_groups(segmentation, sop, model_id, algorithm))
        report = hd.sr.MeasurementReport(observation_context=_observation_context(model_id),
                                         procedure_reported=vocabulary().procedure, imaging_measurements=groups)
        sr_uid = result_uid(sop, model_id, "sr")
        sr = hd.sr.Comprehensive3DSR(
            evidence=[source] if segmentation is None else [source, segmentation], content=report[0], series_instance_uid=result_uid(sop, model_id, "sr-series"),
            series_number=SR_SERIES_NUMBER, sop_instance_uid=sr_uid, instance_number=1, manufacturer=MANUFACTURER,
            series_description=f"heartbatch CTR ({model_id})"[:64], is_complete=True)
        return save(sr, Path(out_dir) / f"{sr_uid}.sr.dcm")


def _box_groups(source: pydicom.Dataset, record: Record, sop: str, model_id: str, algorithm) -> list:
    """One planar ROI group per box: its width (mm when the heart's is known, else pixels) at
    finding site Heart or Thorax, and its outline on the source image."""
    import highdicom as hd

    v = vocabulary()
    mm = record.heart_width_mm is not None
    image_ref = hd.sr.SourceImageForRegion.from_source_image(source)
    boxes = [("heart", record.heart, record.heart_width_mm, v.heart)]
    if record.thorax is not None:
        boxes.append(("thorax", record.thorax, record.thoracic_width_mm, v.thorax))
    groups = []
    for name, box, width_mm, site in boxes:
        value = width_mm if mm else float(box[2]) - float(box[0])
        if value is None:  # mm known for the heart but not the thorax: cannot happen, but be exact
            continue
        region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=box_corners(box),
                                   source_image=image_ref)
        # The algorithm is identified once per group (TID 1501/1410), which covers its measurements.
        measurement = hd.sr.Measurement(name=v.width, value=round(float(value), WIDTH_DECIMALS),
                                        unit=v.mm if mm else v.pixels, finding_sites=_finding_sites(name))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(sop, model_id, f"{name} box"), referenced_region=region,
            finding_type=site, algorithm_id=algorithm, measurements=[measurement]))
    return groups


def _segment_groups(segmentation: pydicom.Dataset, sop: str, model_id: str, algorithm) -> list:
    """One planar ROI group per segment of the image's Segmentation, referencing it: where the
    boxes were measured from."""
    import highdicom as hd

    from .segmentation import SEGMENTS

    v = vocabulary()
    sites = {"Heart": v.heart}
    groups = []
    for item in segmentation.SegmentSequence:
        label = str(item.SegmentLabel)
        segment = hd.sr.ReferencedSegmentationFrame.from_segmentation(segmentation, segment_number=int(item.SegmentNumber))
        finding = sites.get(label) or hd.sr.CodedConcept.from_dataset(item.SegmentedPropertyTypeCodeSequence[0])
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(sop, model_id, f"{label.lower()} mask"), referenced_segment=segment,
            finding_type=finding, algorithm_id=algorithm)
        _segment_not_frame(group[0])
        groups.append(group)
    assert len(groups) == len(SEGMENTS)
    return groups


def _segment_not_frame(item) -> None:
    """highdicom's Referenced Segmentation Frame names both the frame and the segment of the
    Segmentation, and gives the single-frame source image that frame's number; the Image SOP
    Instance Reference Macro wants one of the two (dsrdump warns otherwise), and a single-frame
    image none: the segment alone is referenced (it is the structure the group is about), and the
    source image without a frame number."""
    for child in item.ContentSequence:
        if child.get("ValueType") == "IMAGE":
            for ref in child.ReferencedSOPSequence:
                if "ReferencedFrameNumber" in ref:
                    del ref.ReferencedFrameNumber


def _ratio_group(source: pydicom.Dataset, record: Record, sop: str, model_id: str, algorithm):
    """The group of the whole image: the CTR, enlarged and review yes/no (and the review reason as
    text); None when the record has none of them."""
    import highdicom as hd

    v = vocabulary()
    yes_no = {True: v.yes, False: v.no}
    measurements, evaluations = [], []
    if record.ctr is not None:
        measurements.append(hd.sr.Measurement(name=v.ctr, value=round(float(record.ctr), CTR_DECIMALS),
                                              unit=v.no_units))
    if record.enlarged is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(name=v.enlarged, value=yes_no[bool(record.enlarged)]))
    if record.review is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(name=v.review, value=yes_no[bool(record.review)]))
    if not (measurements or evaluations):
        return None
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sop, model_id, "cardiothoracic ratio"), finding_type=v.heart,
        algorithm_id=algorithm, measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])
    if record.review and record.review_reason:
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=v.review_reason, value=record.review_reason[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _tracking(sop: str, model_id: str, name: str):
    """A group's tracking identifier, its UID derived so that a result written again tracks the
    same finding."""
    import highdicom as hd

    return hd.sr.TrackingIdentifier(uid=result_uid(sop, model_id, f"track-{name}"), identifier=name)


# --- what depends only on the model, built once per process -------------------------------------

@functools.lru_cache(maxsize=4)
def _finding_sites(site: str):
    """A one-item TID 300 finding-site list for "heart" or "thorax" (shared, never changed)."""
    import highdicom as hd

    return [hd.sr.FindingSite(anatomic_location=getattr(vocabulary(), site))]


@functools.lru_cache(maxsize=16)
def _algorithm(model_id: str, model_version: str):
    """TID 4019 Algorithm Identification of a model: heartbatch, the model id as its version."""
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(name=MANUFACTURER, version=str(model_id),
                                         parameters=[f"model version {model_version}"] if model_version else None)


@functools.lru_cache(maxsize=16)
def _observation_context(model_id: str):
    """The observer: a device (heartbatch running the model), its UID derived from the model id."""
    import highdicom as hd

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid("device", model_id, "device"), name=MANUFACTURER, model_name=str(model_id)[:64])
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=vocabulary().device, observer_identifying_attributes=device))
