"""The Grayscale Softcopy Presentation State of a measured image: the heart and thorax boxes and a
line with the CTR drawn over the source image by the viewer, so the original pixels stay untouched
and a reader can switch the marks off."""

from __future__ import annotations

from pathlib import Path

import pydicom

from ..records import Record
from .output import MANUFACTURER, save, software_version
from .source import box_corners, source_sop_uid, source_warnings_silenced
from .uids import result_uid

PR_SERIES_NUMBER = 9902


def write_presentation_state(source: pydicom.Dataset, record: Record, model_id: str, out_dir: Path) -> Path:
    """Write ``<sop>.pr.dcm`` in ``out_dir``: a Grayscale Softcopy Presentation State of the source
    image that draws the heart and thorax boxes and a line of text with the CTR. Returns the path."""
    import highdicom as hd

    sop = source_sop_uid(source, record)
    model_id = str(model_id)
    with source_warnings_silenced():
        layer = hd.pr.GraphicLayer(layer_name="HEARTBATCH", order=1, description=f"heartbatch {model_id}"[:64])
        texts = _text_objects(record)
        annotation = hd.pr.GraphicAnnotation(referenced_images=[source], graphic_layer=layer,
                                             graphic_objects=_box_objects(record, sop, model_id),
                                             text_objects=texts or None)
        pr_uid = result_uid(sop, model_id, "pr")
        pr = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[source], series_instance_uid=result_uid(sop, model_id, "pr-series"),
            series_number=PR_SERIES_NUMBER, sop_instance_uid=pr_uid, instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER, software_versions=software_version(),
            device_serial_number=model_id[:64], content_label="HEARTBATCH",
            content_description=f"heartbatch boxes ({model_id})"[:64], graphic_annotations=[annotation],
            graphic_layers=[layer])
        return save(pr, Path(out_dir) / f"{pr_uid}.pr.dcm")


def _box_objects(record: Record, sop: str, model_id: str) -> list:
    """The heart and thorax boxes as polylines in image pixels, their tracking UIDs derived."""
    import highdicom as hd

    return [hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=box_corners(box),
                                units=hd.pr.AnnotationUnitsValues.PIXEL, tracking_id=name,
                                tracking_uid=result_uid(sop, model_id, f"pr-{name}"))
            for name, box in (("heart", record.heart), ("thorax", record.thorax)) if box is not None]


def _text_objects(record: Record) -> list:
    """The lines of :func:`_text_lines` as text objects, anchored in image pixels."""
    import highdicom as hd

    return [hd.pr.TextObject(text_value=line, units=hd.pr.AnnotationUnitsValues.PIXEL, anchor_point=anchor,
                             anchor_point_visible=False)
            for line, anchor in _text_lines(record)]


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
