"""DICOM results (issue 18): the TID 1500 SR, the presentation state and the Secondary Capture written
for a real measurement of the SIIM chest DICOM by the shipped model, read back with highdicom and
pydicom; write_results, the call a batch run makes per ok record."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

import highdicom as hd

from heartbatch import results as dr
from heartbatch.api import predict
from heartbatch.overlay import HEART, scale_box
from heartbatch.records import ERROR, SKIPPED, Record

WIDTH = ("103355008", "SCT")   # SNOMED CT "Width" (DICOM CID 7470 Linear Measurement)
HEART_SITE = ("80891009", "SCT")
THORAX_SITE = ("816094009", "SCT")


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


def _code(concept) -> tuple[str, str]:
    return concept.value, concept.scheme_designator


def _site(measurement) -> tuple[str, str]:
    (site,) = measurement.finding_sites
    return _code(site.value)


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
        assert _code(measurement.name) == WIDTH
        widths[_site(measurement)] = measurement.value
        assert _algorithm(group) == ("heartbatch", record.model_id)
    assert widths == {HEART_SITE: pytest.approx(round(record.heart_width_mm, 2), abs=1e-9),
                      THORAX_SITE: pytest.approx(round(record.thoracic_width_mm, 2), abs=1e-9)}

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


def test_codes_standard_where_one_exists(measured, tmp_path: Path) -> None:
    """Widths: SNOMED CT "Width" with a finding site (Heart, Thorax), also on the group's finding;
    the CTR, enlarged and review have no standard code and stay in the private scheme."""
    source, record = measured
    sr = hd.sr.srread(dr.write_sr(source, record, record.model_id, "1.0", tmp_path))
    planar, (group,) = _groups(sr)
    assert [(_code(g.get_measurements()[0].name), _site(g.get_measurements()[0]), _code(g.finding_type))
            for g in planar] == [(WIDTH, HEART_SITE, HEART_SITE), (WIDTH, THORAX_SITE, THORAX_SITE)]
    (ctr,) = group.get_measurements()
    assert _code(ctr.name) == ("ctr", dr.SCHEME) and dr.SCHEME.startswith("99")
    assert {_code(e.name) for e in group.get_qualitative_evaluations()} == {("enlarged", dr.SCHEME),
                                                                          ("review", dr.SCHEME)}
    assert {_code(e.value) for e in group.get_qualitative_evaluations()} <= {("373066001", "SCT"),
                                                                           ("373067005", "SCT")}


def _red(pixels: np.ndarray) -> np.ndarray:
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    return (r > 170) & (g < 100) & (b < 100)


@pytest.mark.parametrize("max_side", [512, 2048])
def test_capture_reads_back(measured, tmp_path: Path, max_side: int) -> None:
    source, record = measured
    path = dr.write_capture(record, record.model_id, tmp_path, max_side=max_side)
    sc = pydicom.dcmread(path)
    assert path.name == f"{sc.SOPInstanceUID}.sc.dcm"
    assert sc.SOPInstanceUID == dr.result_uid(source.SOPInstanceUID, record.model_id, "sc")
    assert sc.SeriesInstanceUID == dr.result_uid(source.SOPInstanceUID, record.model_id, "sc-series")
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.BurnedInAnnotation == "YES" and sc.ImageType[:2] == ["DERIVED", "SECONDARY"]
    assert (sc.PatientID, sc.PatientName, sc.StudyInstanceUID) == (source.PatientID, source.PatientName,
                                                                   source.StudyInstanceUID)
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    (ref,) = sc.SourceImageSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (source.SOPClassUID, source.SOPInstanceUID)
    methods, ratios = (list(v) if isinstance(v, pydicom.multival.MultiValue) else [v]
                       for v in (sc.LossyImageCompressionMethod, sc.LossyImageCompressionRatio))
    assert sc.LossyImageCompression == "01" and methods[-1] == "ISO_10918_1" and len(ratios) == len(methods)
    assert float(ratios[-1]) > 2
    assert sc.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert path.stat().st_size < 0.5 * 3 * sc.Rows * sc.Columns  # compressed

    # the source is 1024 x 1024: shrunk to 512, kept at 1024 (never enlarged)
    side = min(max_side, source.Rows)
    assert (sc.Rows, sc.Columns) == (side, side) and max(sc.Rows, sc.Columns) <= max_side
    scale = source.Rows / side
    np.testing.assert_allclose([float(v) for v in sc.PixelSpacing],
                               [float(v) * scale for v in source.PixelSpacing], rtol=1e-6)
    resampled = [c.CodeValue for c in sc.DerivationCodeSequence if c.CodeValue == "113085"]  # DCM Spatial resampling
    assert bool(resampled) == (side != source.Rows)

    pixels = sc.pixel_array  # pydicom decodes the JPEG and converts it to RGB
    assert pixels.shape == (sc.Rows, sc.Columns, 3) and pixels.dtype == np.uint8
    x0, y0, x1, y1 = scale_box(record.heart, sc.Columns / source.Columns, sc.Rows / source.Rows)
    quarter = y0 + (y1 - y0) // 4   # away from the width line drawn at mid height
    red = _red(pixels[quarter - 2:quarter + 3])
    assert red[:, x0:x0 + 3].any() and red[:, x1 - 2:x1 + 1].any()   # left and right edges
    assert not red[:, x0 + 20:x1 - 20].any()                            # inside the box: the film
    assert HEART == (255, 0, 0)


def test_write_results_both_modes(measured, tmp_path: Path, recwarn) -> None:
    source, record = measured
    with warnings.catch_warnings():   # the source header does make highdicom warn...
        warnings.simplefilter("always")
        with pytest.warns(UserWarning):
            hd.valuerep.check_person_name(source.PatientName)
    recwarn.clear()

    overlay = dr.ResultOptions(tmp_path / "pr")
    capture = dr.ResultOptions(tmp_path / "sc", capture=True)
    uid = lambda tag: dr.result_uid(source.SOPInstanceUID, record.model_id, tag)
    for options, kind in ((overlay, "pr"), (capture, "sc")):
        names = dr.write_results(record, record.model_id, "1.0", options)
        assert names == (f"{uid('sr')}.sr.dcm", f"{uid(kind)}.{kind}.dcm")
        assert all(isinstance(name, str) and (options.out_dir / name).is_file() for name in names)
        assert sorted(p.name for p in options.out_dir.iterdir()) == sorted(names)
        assert dr.write_results(record, record.model_id, "1.0", options) == names   # replaced, same names
        assert sorted(p.name for p in options.out_dir.iterdir()) == sorted(names)
        sr, view = (pydicom.dcmread(options.out_dir / name) for name in names)
        assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
        assert view.SOPClassUID == (pydicom.uid.GrayscaleSoftcopyPresentationStateStorage if kind == "pr"
                                    else pydicom.uid.SecondaryCaptureImageStorage)
    assert not recwarn.list, [str(w.message) for w in recwarn.list]   # ...which the writers keep quiet


def test_results_of_an_anonymised_image_without_patient_and_study_details(measured, tmp_path: Path) -> None:
    """Anonymisation often removes the type 2 patient and study attributes: the results carry them
    empty (the measurement is the same); an image without a Study Instance UID cannot have one."""
    source, record = measured
    bare = tmp_path / "anonymised.dcm"
    full = pydicom.dcmread(record.path)
    for keyword in dr.COPIED_EMPTY_IF_MISSING:
        if keyword in full:
            delattr(full, keyword)
    full.save_as(bare)
    names = dr.write_results(dataclasses.replace(record, path=str(bare)), record.model_id, "1.0",
                             dr.ResultOptions(tmp_path / "out"))
    for name in names:
        result = pydicom.dcmread(tmp_path / "out" / name)
        assert (result.PatientName, result.PatientID, result.StudyDate) == ("", "", "")
        assert result.StudyInstanceUID == source.StudyInstanceUID
    del full.StudyInstanceUID
    full.save_as(bare)
    with pytest.raises(ValueError, match="no StudyInstanceUID"):
        dr.write_results(dataclasses.replace(record, path=str(bare)), record.model_id, "1.0",
                         dr.ResultOptions(tmp_path / "again"))


def test_write_results_refuses(measured, tmp_path: Path) -> None:
    source, record = measured
    options = dr.ResultOptions(tmp_path / "out")
    for bad in (dataclasses.replace(record, status=SKIPPED, reason="not a chest film"),
                dataclasses.replace(record, status=ERROR, reason="unreadable")):
        with pytest.raises(ValueError, match=bad.status):
            dr.write_results(bad, record.model_id, "1.0", options)
        with pytest.raises(ValueError, match=bad.status):
            dr.write_capture(bad, record.model_id, options.out_dir)
    not_dicom = tmp_path / "film.png"
    not_dicom.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ValueError):
        dr.write_results(dataclasses.replace(record, path=str(not_dicom)), record.model_id, "1.0", options)
    assert not options.out_dir.exists() or not list(options.out_dir.iterdir())


def test_result_options_key(tmp_path: Path, monkeypatch) -> None:
    tmp_path = tmp_path.resolve()
    monkeypatch.chdir(tmp_path)
    overlay = dr.ResultOptions("results")
    assert overlay.out_dir == Path("results") and overlay.capture is False
    assert overlay.key() == f"sr+pr:{tmp_path / 'results'}"
    capture = dr.ResultOptions(Path("results"), True)
    assert capture.key() == f"sr+sc{dr.CAPTURE_MAX_SIDE}:{tmp_path / 'results'}"
    assert dr.ResultOptions("results", True, 512).key() != capture.key() != overlay.key()
    assert dr.ResultOptions(tmp_path / "results") == dr.ResultOptions(Path("results").absolute())
    assert os.path.isabs(overlay.key().split(":", 1)[1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        overlay.capture = True  # type: ignore[misc]
    hash(overlay)  # usable as a key, picklable to worker processes
    import pickle
    assert pickle.loads(pickle.dumps(capture)) == capture
