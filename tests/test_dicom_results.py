"""DICOM results (issue 18, first step): the TID 1500 SR and the presentation state written for a real
measurement of the SIIM chest DICOM by the shipped model, read back with highdicom and pydicom."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

import highdicom as hd

from heartbatch import dicom_results as dr
from heartbatch.api import predict
from heartbatch.records import ERROR, SKIPPED, Record


@pytest.fixture(scope="module")
def measured(siim_dicom: Path) -> tuple[pydicom.Dataset, Record]:
    record = predict(siim_dicom)
    assert record.ok, record.reason
    assert record.thorax is not None and record.ctr is not None and record.heart_width_mm is not None
    return pydicom.dcmread(siim_dicom), record


def _corners(box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def _groups(sr):
    planar = sr.content.get_planar_roi_measurement_groups()
    image = sr.content.get_image_measurement_groups()
    return planar, image


def _algorithm(group) -> tuple[str, str]:
    """(name, version) of the TID 4019 Algorithm Identification items in a measurement group."""
    text = {item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
            for item in group[0].ContentSequence if item.ValueType == "TEXT"}
    return text["111001"], text["111003"]  # DCM Algorithm Name, Algorithm Version


def _by_meaning(items) -> dict:
    return {item.name.meaning: item for item in items}


def test_sr_reads_back_with_the_measurement(measured, tmp_path: Path) -> None:
    source, record = measured
    path = dr.write_sr(source, record, record.model_id, "1.0", tmp_path)
    assert path.parent == tmp_path and path.name.endswith(".sr.dcm")
    assert not list(tmp_path.glob("*.tmp"))
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert path.name == f"{sr.SOPInstanceUID}.sr.dcm"
    # patient and study copied from the source, so the result files into the same study
    assert sr.PatientID == source.PatientID
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    planar, image = _groups(sr)
    assert len(planar) == 2 and len(image) == 1
    widths = {}
    for group, box in zip(planar, (record.heart, record.thorax)):
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        np.testing.assert_array_equal(np.asarray(region.value, dtype=np.float32), _corners(box))
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == source.SOPClassUID
        (measurement,) = group.get_measurements()
        assert measurement.unit.value == "mm"
        widths[measurement.name.meaning] = measurement.value
        assert _algorithm(group) == ("heartbatch", record.model_id)
    assert widths == {"Heart width": pytest.approx(round(record.heart_width_mm, 2), abs=1e-9),
                      "Thoracic width": pytest.approx(round(record.thoracic_width_mm, 2), abs=1e-9)}

    (group,) = image
    assert _algorithm(group) == ("heartbatch", record.model_id)
    (ctr,) = group.get_measurements()
    assert ctr.name.meaning == "Cardiothoracic ratio"
    assert ctr.value == pytest.approx(round(record.ctr, 4), abs=1e-12)
    assert ctr.unit.value == "1"
    evaluations = _by_meaning(group.get_qualitative_evaluations())
    yes_no = {True: "Yes", False: "No"}
    assert evaluations["Heart enlarged (CTR above threshold)"].value.meaning == yes_no[record.enlarged]
    assert evaluations["Measurement needs review"].value.meaning == yes_no[record.review]


def test_sr_widths_in_pixels_without_spacing_and_review_reason(measured, tmp_path: Path) -> None:
    source, record = measured
    flagged = dataclasses.replace(record, heart_width_mm=None, thoracic_width_mm=None, review=True,
                                  review_reason="CTR uncertainty above limit")
    sr = hd.sr.srread(dr.write_sr(source, flagged, record.model_id, "1.0", tmp_path))
    planar, image = _groups(sr)
    for group, box in zip(planar, (record.heart, record.thorax)):
        (measurement,) = group.get_measurements()
        assert measurement.unit.value == "{pixels}"
        assert measurement.value == pytest.approx(round(box[2] - box[0], 2), abs=1e-9)
    (group,) = image
    assert _by_meaning(group.get_qualitative_evaluations())["Measurement needs review"].value.meaning == "Yes"
    texts = [item for item in group[0].ContentSequence
             if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "review-reason"]
    assert [t.TextValue for t in texts] == ["CTR uncertainty above limit"]


def test_presentation_state_draws_boxes_and_ctr(measured, tmp_path: Path) -> None:
    source, record = measured
    path = dr.write_presentation_state(source, record, record.model_id, tmp_path)
    pr = pydicom.dcmread(path)
    assert path.name == f"{pr.SOPInstanceUID}.pr.dcm"
    assert pr.SOPClassUID == pydicom.uid.GrayscaleSoftcopyPresentationStateStorage
    assert pr.PatientID == source.PatientID and pr.StudyInstanceUID == source.StudyInstanceUID
    ref_series = pr.ReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref_series.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (annotation,) = pr.GraphicAnnotationSequence
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    graphics = annotation.GraphicObjectSequence
    assert len(graphics) == 2
    for graphic, box in zip(graphics, (record.heart, record.thorax)):
        assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
        np.testing.assert_array_equal(np.asarray(graphic.GraphicData, dtype=np.float32).reshape(-1, 2),
                                      _corners(box))
    texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
    expected = f"CTR {record.ctr:.2f} ({'enlarged' if record.enlarged else 'normal'})"
    assert texts[0] == expected
    assert any(line.startswith("review: ") for line in texts) == bool(record.review)

    flagged = dataclasses.replace(record, enlarged=True, review=True, review_reason="low content score")
    pr = pydicom.dcmread(dr.write_presentation_state(source, flagged, record.model_id, tmp_path / "flagged"))
    texts = [t.UnformattedTextValue for t in pr.GraphicAnnotationSequence[0].TextObjectSequence]
    assert texts == [f"CTR {record.ctr:.2f} (enlarged)", "review: low content score"]


def test_uids_deterministic_per_image_and_model(measured, tmp_path: Path) -> None:
    source, record = measured
    first = (dr.write_sr(source, record, record.model_id, "1.0", tmp_path),
             dr.write_presentation_state(source, record, record.model_id, tmp_path))
    again = (dr.write_sr(source, record, record.model_id, "1.0", tmp_path),
             dr.write_presentation_state(source, record, record.model_id, tmp_path))
    assert first == again
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in first)  # replaced, not added
    uids = lambda paths: [(d.SOPInstanceUID, d.SeriesInstanceUID) for d in map(pydicom.dcmread, paths)]
    assert uids(first) == uids(again)
    (sr_uid, sr_series), (pr_uid, pr_series) = uids(first)
    assert len({sr_uid, sr_series, pr_uid, pr_series, source.SOPInstanceUID}) == 5
    assert all(pydicom.uid.UID(u).is_valid for u in (sr_uid, sr_series, pr_uid, pr_series))
    assert dr.result_uid(source.SOPInstanceUID, record.model_id, "sr") == sr_uid

    other = (dr.write_sr(source, record, record.model_id + "-other", "1.0", tmp_path),
             dr.write_presentation_state(source, record, record.model_id + "-other", tmp_path))
    assert not set(other) & set(first)
    assert not {u for pair in uids(other) for u in pair} & {u for pair in uids(first) for u in pair}


@pytest.mark.parametrize("status", [SKIPPED, ERROR])
def test_non_ok_record_raises(measured, tmp_path: Path, status: str) -> None:
    source, record = measured
    bad = dataclasses.replace(record, status=status, reason="not a chest film")
    with pytest.raises(ValueError, match=status):
        dr.write_sr(source, bad, record.model_id, "1.0", tmp_path)
    with pytest.raises(ValueError, match=status):
        dr.write_presentation_state(source, bad, record.model_id, tmp_path)
    assert not list(tmp_path.iterdir())
