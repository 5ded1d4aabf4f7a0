"""DICOM results for one measured image: a TID 1500 Measurement Report (Comprehensive 3D SR) and a
Grayscale Softcopy Presentation State that draws the boxes, both written with highdicom.

Both objects reference the source image and copy its patient and study modules, so they file next
to it in the same PACS study. Their UIDs are derived from the source SOP Instance UID and the model
id alone: measuring the same image with the same model again replaces the result (same UIDs, same
file name) rather than adding a second one; a different model gives a new result.

highdicom is an optional dependency (``pip install 'heartbatch[dicom]'``), imported only here, when
a result is written.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pydicom

from .files import replacing
from .records import Record

#: Coding scheme for the concepts no standard scheme names exactly (heart and thoracic width as
#: measured on a frontal film, the CTR, the review flag). Private schemes start with "99".
SCHEME = "99HEARTBATCH"
MANUFACTURER = "heartbatch"

#: Decimal places written (and so the precision a reader gets back).
CTR_DECIMALS = 4
WIDTH_DECIMALS = 2


#: Namespace of the name-based (version 5) UUIDs behind every result UID.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/heartbatch/dicom-results")


def result_uid(source_sop_uid: str, model_id: str, tag: str) -> str:
    """A UID that depends only on the source image, the model and what it names ("sr", "pr"...):
    a "2.25." UID (ISO/IEC 9834-8) of a name-based UUID. (pydicom's ``generate_uid(prefix=None,
    entropy_srcs=...)`` would not do: with no prefix it ignores the entropy and is random.)"""
    name = "\x1f".join((str(source_sop_uid), str(model_id), str(tag)))
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def _check(source: pydicom.Dataset, record: Record) -> str:
    if not record.ok:
        raise ValueError(f"no DICOM result for a {record.status!r} record ({record.path}): {record.reason}")
    if record.heart is None:
        raise ValueError(f"record for {record.path} has no heart box")
    sop = str(getattr(source, "SOPInstanceUID", "") or "")
    if not sop:
        raise ValueError("source dataset has no SOP Instance UID")
    return sop


def _corners(box):
    """Closed polyline of a box's corners, (column, row) pixel coordinates. Box edges are the
    sub-pixel coordinates DICOM uses (0,0 is the top left corner of the top left pixel), so an
    exclusive x1/y1 is exactly the right/bottom edge."""
    import numpy as np

    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def _code(value: str, meaning: str):
    from pydicom.sr.coding import Code

    return Code(value, SCHEME, meaning)


def write_sr(source: pydicom.Dataset, record: Record, model_id: str, model_version: str,
             out_dir: Path) -> Path:
    """Write ``<sop>.sr.dcm`` (sop: the SR's SOP Instance UID) in ``out_dir``: a TID 1500
    Measurement Report with one planar ROI group per box (its width, its polygon on the source
    image), and one group with the CTR, enlarged yes/no and the review flag. Returns the path."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    sop = _check(source, record)
    algorithm = hd.sr.AlgorithmIdentification(name=MANUFACTURER, version=str(model_id),
                                              parameters=[f"model version {model_version}"] if model_version else None)
    mm = record.heart_width_mm is not None
    width_unit = codes.UCUM.Millimeter if mm else Code("{pixels}", "UCUM", "pixels")
    yes_no = {True: codes.SCT.Yes, False: codes.SCT.No}
    image_ref = hd.sr.SourceImageForRegion.from_source_image(source)

    def tracking(name: str):
        return hd.sr.TrackingIdentifier(uid=result_uid(sop, model_id, f"track-{name}"), identifier=name)

    def width_px(box) -> float:
        return float(box[2]) - float(box[0])

    groups = []
    boxes = [("heart", record.heart, record.heart_width_mm, _code("heart-width", "Heart width"),
              codes.SCT.Heart)]
    if record.thorax is not None:
        boxes.append(("thorax", record.thorax, record.thoracic_width_mm,
                      _code("thoracic-width", "Thoracic width"), codes.SCT.Thorax))
    for name, box, width_mm, concept, site in boxes:
        value = width_mm if mm else width_px(box)
        if value is None:  # mm known for the heart but not the thorax: cannot happen, but be exact
            continue
        region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=_corners(box),
                                   source_image=image_ref)
        measurement = hd.sr.Measurement(name=concept, value=round(float(value), WIDTH_DECIMALS), unit=width_unit,
                                        algorithm_id=algorithm)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(f"{name} box"), referenced_region=region,
            finding_type=site, algorithm_id=algorithm, measurements=[measurement]))

    measurements, evaluations = [], []
    if record.ctr is not None:
        measurements.append(hd.sr.Measurement(
            name=_code("ctr", "Cardiothoracic ratio"), value=round(float(record.ctr), CTR_DECIMALS),
            unit=codes.UCUM.NoUnits, algorithm_id=algorithm))
    if record.enlarged is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=_code("enlarged", "Heart enlarged (CTR above threshold)"), value=yes_no[bool(record.enlarged)]))
    if record.review is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=_code("review", "Measurement needs review"), value=yes_no[bool(record.review)]))
    if measurements or evaluations:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking("cardiothoracic ratio"), finding_type=codes.SCT.Heart,
            algorithm_id=algorithm, measurements=measurements or None,
            qualitative_evaluations=evaluations or None,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])
        if record.review and record.review_reason:
            group[0].ContentSequence.append(hd.sr.TextContentItem(
                name=_code("review-reason", "Review reason"), value=record.review_reason[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        groups.append(group)

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid("device", model_id, "device"), name=MANUFACTURER, model_name=str(model_id)[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=context,
                                     procedure_reported=codes.cid100.XRUnspecifiedBodyRegion,
                                     imaging_measurements=groups)
    sr_uid = result_uid(sop, model_id, "sr")
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source], content=report[0], series_instance_uid=result_uid(sop, model_id, "sr-series"),
        series_number=9901, sop_instance_uid=sr_uid, instance_number=1, manufacturer=MANUFACTURER,
        series_description=f"heartbatch CTR ({model_id})"[:64], is_complete=True)
    return _save(sr, Path(out_dir) / f"{sr_uid}.sr.dcm")


def write_presentation_state(source: pydicom.Dataset, record: Record, model_id: str, out_dir: Path) -> Path:
    """Write ``<sop>.pr.dcm`` in ``out_dir``: a Grayscale Softcopy Presentation State of the source
    image that draws the heart and thorax boxes and a line of text with the CTR. Returns the path."""
    import highdicom as hd

    sop = _check(source, record)
    units = hd.pr.AnnotationUnitsValues.PIXEL
    objects = [hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=_corners(box),
                                   units=units, tracking_id=name,
                                   tracking_uid=result_uid(sop, model_id, f"pr-{name}"))
               for name, box in (("heart", record.heart), ("thorax", record.thorax)) if box is not None]
    texts = [hd.pr.TextObject(text_value=line, units=units, anchor_point=anchor, anchor_point_visible=False)
             for line, anchor in _text_lines(record)]
    layer = hd.pr.GraphicLayer(layer_name="HEARTBATCH", order=1, description=f"heartbatch {model_id}"[:64])
    annotation = hd.pr.GraphicAnnotation(referenced_images=[source], graphic_layer=layer,
                                         graphic_objects=objects, text_objects=texts or None)
    pr_uid = result_uid(sop, model_id, "pr")
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source], series_instance_uid=result_uid(sop, model_id, "pr-series"),
        series_number=9902, sop_instance_uid=pr_uid, instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER, software_versions=_software_version(),
        device_serial_number=str(model_id)[:64], content_label="HEARTBATCH",
        content_description=f"heartbatch boxes ({model_id})"[:64], graphic_annotations=[annotation],
        graphic_layers=[layer])
    return _save(pr, Path(out_dir) / f"{pr_uid}.pr.dcm")


def _text_lines(record: Record) -> list[tuple[str, tuple[float, float]]]:
    """The CTR line (and the review line) anchored just inside the top left of the thorax box (else
    the heart box)."""
    box = record.thorax if record.thorax is not None else record.heart
    x, y = float(box[0]) + 4.0, float(box[1]) + 4.0
    lines = []
    if record.ctr is not None:
        text = f"CTR {record.ctr:.2f}"
        if record.enlarged is not None:
            text += " (enlarged)" if record.enlarged else " (normal)"
        lines.append(text)
    elif record.heart_width_mm is not None:
        lines.append(f"heart width {record.heart_width_mm:.1f} mm")
    if record.review:
        lines.append(f"review: {record.review_reason or 'flagged'}")
    return [(line[:1024], (x, y + 24.0 * i)) for i, line in enumerate(lines)]


def _software_version() -> str:
    from . import __version__

    return str(__version__)[:64]


def _save(dataset: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path
