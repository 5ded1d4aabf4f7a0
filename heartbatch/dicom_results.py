"""DICOM results for one measured image, written with highdicom: a TID 1500 Measurement Report
(Comprehensive 3D SR) and either a Grayscale Softcopy Presentation State that draws the boxes on
the source image, or a Secondary Capture image with the boxes and numbers burned in.

Every object references the source image and copies its patient and study modules, so it files
next to it in the same PACS study. Their UIDs are derived from the source SOP Instance UID and the
model id alone: measuring the same image with the same model again replaces the result (same UIDs,
same file name) rather than adding a second one; a different model gives a new result.

:func:`write_results` is what a batch run calls, once per ok record, in its worker processes: it
reads the source header itself and returns the names of the files it wrote. What does not depend
on the record (coded concepts, the algorithm and observer context items of a model) is built once
per process.

highdicom's warnings about the *source* header (a patient name with a single component, a
non-standard value it copies) are silenced inside the writers: they are not about our output, and
a batch run would print them once per file.

highdicom is an optional dependency (``pip install 'heartbatch[dicom]'``), imported only here, when
a result is written.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pydicom
from pydicom.multival import MultiValue

from .dicom.read import pixel_spacing
from .files import replacing
from .records import Record

#: Coding scheme for the concepts no standard scheme names (see :func:`_vocabulary`): the
#: cardiothoracic ratio, the enlarged flag (CTR above heartbatch's threshold), the review flag and
#: its reason. Private schemes start with "99".
SCHEME = "99HEARTBATCH"
MANUFACTURER = "heartbatch"

#: Decimal places written (and so the precision a reader gets back).
CTR_DECIMALS = 4
WIDTH_DECIMALS = 2

#: Longer side of a Secondary Capture image, in pixels (smaller images keep their size).
CAPTURE_MAX_SIDE = 2048

SR_SERIES_NUMBER, PR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902, 9903

#: Namespace of the name-based (version 5) UUIDs behind every result UID.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/heartbatch/dicom-results")


def result_uid(source_sop_uid: str, model_id: str, tag: str) -> str:
    """A UID that depends only on the source image, the model and what it names ("sr", "pr"...):
    a "2.25." UID (ISO/IEC 9834-8) of a name-based UUID. (pydicom's ``generate_uid(prefix=None,
    entropy_srcs=...)`` would not do: with no prefix it ignores the entropy and is random.)"""
    name = "\x1f".join((str(source_sop_uid), str(model_id), str(tag)))
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


# --- options and the one call a batch run makes ---------------------------------------------------

@dataclass(frozen=True)
class ResultOptions:
    """Where and what :func:`write_results` writes: the SR plus a presentation state (default) or,
    with ``capture``, the SR plus a Secondary Capture image of at most ``capture_max_side`` pixels a
    side."""
    out_dir: Path
    capture: bool = False
    capture_max_side: int = CAPTURE_MAX_SIDE

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.capture_max_side < 1:
            raise ValueError(f"capture_max_side must be positive, not {self.capture_max_side}")

    @property
    def mode(self) -> str:
        return f"sr+sc{self.capture_max_side}" if self.capture else "sr+pr"

    def key(self) -> str:
        """What the ledger stores to tell whether a row's results were written with these options:
        the mode and the absolute folder (symlinks resolved), e.g. ``sr+pr:/data/results`` or
        ``sr+sc2048:/data/results``."""
        return f"{self.mode}:{Path(self.out_dir).expanduser().resolve()}"


def write_results(record: Record, model_id: str, model_version: str, options: ResultOptions) -> tuple[str, ...]:
    """Write the SR and the presentation state (or, with ``options.capture``, the Secondary
    Capture) of an ok record into ``options.out_dir``; returns the file names written (relative to
    ``out_dir``), the SR's first. Raises ValueError for a record that is not ok or whose file has
    no readable DICOM header."""
    _check_record(record)
    source = read_header(record.path)
    out_dir = Path(options.out_dir)
    sr = write_sr(source, record, model_id, model_version, out_dir)
    if options.capture:
        view = _write_capture(source, record, model_id, out_dir, options.capture_max_side)
    else:
        view = write_presentation_state(source, record, model_id, out_dir)
    return sr.name, view.name


#: Type 2 attributes of the Patient and General Study modules the results copy from the source.
#: Anonymised and hand-made films often leave them out; type 2 lets them be empty, so they are
#: copied empty rather than refused (highdicom expects them present).
COPIED_EMPTY_IF_MISSING = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                           "ReferringPhysicianName", "StudyID", "AccessionNumber")
#: What a result cannot be filed without: its study, the referenced image's series and class.
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def read_header(path: str | Path) -> pydicom.Dataset:
    """The source image's header (no pixel data), its missing type 2 patient and study attributes
    empty. ``force``: heartbatch also measures DICOM datasets written without the preamble; a file
    that is not DICOM at all, or an image without the UIDs a result refers to, is a ValueError."""
    try:
        source = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a damaged header
        raise ValueError(f"cannot read the DICOM header of {path}: {exc}") from exc
    missing = [keyword for keyword in REQUIRED if not str(source.get(keyword, "") or "")]
    if missing:
        raise ValueError(f"the image has no {', '.join(missing)}: a DICOM result cannot refer to it")
    for keyword in COPIED_EMPTY_IF_MISSING:
        if keyword not in source:
            setattr(source, keyword, None)
    return source


# --- checks and small helpers ---------------------------------------------------------------------

def _check_record(record: Record) -> None:
    if not record.ok:
        raise ValueError(f"no DICOM result for a {record.status!r} record ({record.path}): {record.reason}")
    if record.heart is None:
        raise ValueError(f"record for {record.path} has no heart box")
    if record.header is None or not (record.header.rows and record.header.columns):
        raise ValueError(f"record for {record.path} has no image size")


def _check(source: pydicom.Dataset, record: Record) -> str:
    _check_record(record)
    sop = str(getattr(source, "SOPInstanceUID", "") or "")
    if not sop:
        raise ValueError(f"source dataset has no SOP Instance UID ({record.path})")
    return sop


def _corners(box):
    """Closed polyline of a box's corners, (column, row) pixel coordinates. Box edges are the
    sub-pixel coordinates DICOM uses (0,0 is the top left corner of the top left pixel), so an
    exclusive x1/y1 is exactly the right/bottom edge."""
    import numpy as np

    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


@contextlib.contextmanager
def _quiet():
    """Silence highdicom's and pydicom's UserWarnings while an object is built from the source
    header: they are about that header (e.g. a patient name with one component), which is copied
    as it is, not about what we write."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _save(dataset: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


def _software_version() -> str:
    from . import __version__

    return str(__version__)[:64]


# --- highdicom, once per process ------------------------------------------------------------------

# --- coded concepts (built once per process) ------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _vocabulary() -> SimpleNamespace:
    """Every coded concept the SR uses, as highdicom CodedConcepts built once (each item then
    shares them instead of converting a pydicom Code again).

    Standard codes, and where they were checked:

    * SCT 103355008 "Width": DICOM PS3.16 CID 7470 "Linear Measurement" (pydicom's concept
      dictionary, ``pydicom/sr/_concepts_dict.py``, generated from PS3.16: CIDs 218, 6165, 7469,
      7470; also HL7 IPS value set "imaging-linear-measure-code-uv-ips",
      https://hl7.org/fhir/uv/ips/2019Sep/ValueSet-imaging-linear-measure-code-uv-ips.html).
      The heart and thoracic widths are this measurement with a TID 300 Finding Site
      (SCT 363698007) of SCT 80891009 "Heart" or SCT 816094009 "Thorax" (CID 4 "Anatomic
      Region"), both from the same pydicom dictionary.
    * SCT 373066001 "Yes" / 373067005 "No" (CID 230 "Yes-No"), DCM, UCUM: as highdicom uses them.

    Private (99HEARTBATCH), because no standard code was found:

    * the cardiothoracic ratio: neither DICOM PS3.16 (pydicom's dictionary has only LOINC
      59076-0 "Cardiothoracic Area Ratio" and 59074-5 "Cardiothoracic Circumference Ratio", fetal
      echocardiography measures of a different quantity, CID 12279) nor a SNOMED CT or LOINC code
      for the radiographic (transverse diameter) ratio turned up in the sources searched;
    * "enlarged": the CTR above heartbatch's configured threshold, a decision of this tool rather
      than a diagnosis of cardiomegaly;
    * the review flag and its reason, heartbatch's own quality control.
    """
    from highdicom.sr import CodedConcept as C
    from pydicom.sr.codedict import codes

    def coded(code):
        return C.from_code(code)

    return SimpleNamespace(
        width=C("103355008", "SCT", "Width"),
        heart=coded(codes.SCT.Heart),       # 80891009
        thorax=coded(codes.SCT.Thorax),     # 816094009
        ctr=C("ctr", SCHEME, "Cardiothoracic ratio"),
        enlarged=C("enlarged", SCHEME, "Heart enlarged (CTR above threshold)"),
        review=C("review", SCHEME, "Measurement needs review"),
        review_reason=C("review-reason", SCHEME, "Review reason"),
        yes=coded(codes.SCT.Yes),
        no=coded(codes.SCT.No),
        mm=coded(codes.UCUM.Millimeter),
        pixels=C("{pixels}", "UCUM", "pixels"),
        no_units=coded(codes.UCUM.NoUnits),
        device=coded(codes.DCM.Device),
        procedure=coded(codes.cid100.XRUnspecifiedBodyRegion),
        source_image_for_processing=coded(codes.DCM.SourceImageForImageProcessingOperation),
        spatial_resampling=coded(codes.DCM.SpatialResampling),
        lossy_compression=coded(codes.DCM.LossyCompression),
    )


@functools.lru_cache(maxsize=4)
def _finding_sites(site: str):
    """A one-item TID 300 finding-site list for "heart" or "thorax" (shared, never changed)."""
    import highdicom as hd

    return [hd.sr.FindingSite(anatomic_location=getattr(_vocabulary(), site))]


@functools.lru_cache(maxsize=16)
def _algorithm(model_id: str, model_version: str):
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(name=MANUFACTURER, version=str(model_id),
                                         parameters=[f"model version {model_version}"] if model_version else None)


@functools.lru_cache(maxsize=16)
def _observation_context(model_id: str):
    import highdicom as hd

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid("device", model_id, "device"), name=MANUFACTURER, model_name=str(model_id)[:64])
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=_vocabulary().device, observer_identifying_attributes=device))


# --- TID 1500 SR ----------------------------------------------------------------------------------

def write_sr(source: pydicom.Dataset, record: Record, model_id: str, model_version: str,
             out_dir: Path) -> Path:
    """Write ``<sop>.sr.dcm`` (sop: the SR's SOP Instance UID) in ``out_dir``: a TID 1500
    Measurement Report with one planar ROI group per box (its width, SCT "Width" at finding site
    Heart or Thorax, and its polygon on the source image), and one group with the CTR, enlarged
    yes/no and the review flag. Returns the path."""
    import highdicom as hd

    sop = _check(source, record)
    v = _vocabulary()
    model_id = str(model_id)
    algorithm = _algorithm(model_id, str(model_version or ""))
    mm = record.heart_width_mm is not None
    width_unit = v.mm if mm else v.pixels
    yes_no = {True: v.yes, False: v.no}

    def tracking(name: str):
        return hd.sr.TrackingIdentifier(uid=result_uid(sop, model_id, f"track-{name}"), identifier=name)

    with _quiet():
        image_ref = hd.sr.SourceImageForRegion.from_source_image(source)
        groups = []
        boxes = [("heart", record.heart, record.heart_width_mm, v.heart)]
        if record.thorax is not None:
            boxes.append(("thorax", record.thorax, record.thoracic_width_mm, v.thorax))
        for name, box, width_mm, site in boxes:
            value = width_mm if mm else float(box[2]) - float(box[0])
            if value is None:  # mm known for the heart but not the thorax: cannot happen, but be exact
                continue
            region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=_corners(box),
                                       source_image=image_ref)
            # The algorithm is identified once per group (TID 1501/1410), which covers its measurements.
            measurement = hd.sr.Measurement(name=v.width, value=round(float(value), WIDTH_DECIMALS),
                                            unit=width_unit, finding_sites=_finding_sites(name))
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(f"{name} box"), referenced_region=region,
                finding_type=site, algorithm_id=algorithm, measurements=[measurement]))

        measurements, evaluations = [], []
        if record.ctr is not None:
            measurements.append(hd.sr.Measurement(name=v.ctr, value=round(float(record.ctr), CTR_DECIMALS),
                                                  unit=v.no_units))
        if record.enlarged is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(name=v.enlarged, value=yes_no[bool(record.enlarged)]))
        if record.review is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(name=v.review, value=yes_no[bool(record.review)]))
        if measurements or evaluations:
            group = hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking("cardiothoracic ratio"), finding_type=v.heart,
                algorithm_id=algorithm, measurements=measurements or None,
                qualitative_evaluations=evaluations or None,
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])
            if record.review and record.review_reason:
                group[0].ContentSequence.append(hd.sr.TextContentItem(
                    name=v.review_reason, value=record.review_reason[:1024],
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
            groups.append(group)

        report = hd.sr.MeasurementReport(observation_context=_observation_context(model_id),
                                         procedure_reported=v.procedure, imaging_measurements=groups)
        sr_uid = result_uid(sop, model_id, "sr")
        sr = hd.sr.Comprehensive3DSR(
            evidence=[source], content=report[0], series_instance_uid=result_uid(sop, model_id, "sr-series"),
            series_number=SR_SERIES_NUMBER, sop_instance_uid=sr_uid, instance_number=1, manufacturer=MANUFACTURER,
            series_description=f"heartbatch CTR ({model_id})"[:64], is_complete=True)
        return _save(sr, Path(out_dir) / f"{sr_uid}.sr.dcm")


# --- Grayscale Softcopy Presentation State --------------------------------------------------------

def write_presentation_state(source: pydicom.Dataset, record: Record, model_id: str, out_dir: Path) -> Path:
    """Write ``<sop>.pr.dcm`` in ``out_dir``: a Grayscale Softcopy Presentation State of the source
    image that draws the heart and thorax boxes and a line of text with the CTR. Returns the path."""
    import highdicom as hd

    sop = _check(source, record)
    model_id = str(model_id)
    units = hd.pr.AnnotationUnitsValues.PIXEL
    with _quiet():
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
            series_number=PR_SERIES_NUMBER, sop_instance_uid=pr_uid, instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER, software_versions=_software_version(),
            device_serial_number=model_id[:64], content_label="HEARTBATCH",
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


# --- Secondary Capture ----------------------------------------------------------------------------

def write_capture(record: Record, model_id: str, out_dir: Path, max_side: int = CAPTURE_MAX_SIDE) -> Path:
    """Write ``<sop>.sc.dcm`` in ``out_dir``: a Secondary Capture image (RGB, 8 bits, JPEG
    baseline) of the source image at ``record.path`` with the boxes and numbers burned in, as
    :func:`heartbatch.overlay.render` draws them, the longer side at most ``max_side`` pixels (a
    smaller image keeps its size). Returns the path."""
    _check_record(record)
    return _write_capture(read_header(record.path), record, model_id, Path(out_dir), max_side)


def _write_capture(source: pydicom.Dataset, record: Record, model_id: str, out_dir: Path, max_side: int) -> Path:
    import numpy as np
    from pydicom.uid import JPEGBaseline8Bit

    from .overlay import Marks, render

    import highdicom as hd

    sop = _check(source, record)
    model_id = str(model_id)
    v = _vocabulary()
    pixels = np.asarray(render(record.path, Marks.from_record(record), int(max_side)).convert("RGB"), dtype=np.uint8)
    out_rows, out_columns = pixels.shape[:2]
    rows, columns = record.header.rows, record.header.columns  # what the boxes are in
    resized = (out_rows, out_columns) != (rows, columns)
    # Pixel Spacing only: Imager Pixel Spacing is at the detector, and the SC IOD has no such
    # attribute; calling it Pixel Spacing would claim a calibration in the patient plane.
    spacing = pixel_spacing(source, ("PixelSpacing",))
    if spacing is not None:
        spacing = (round(spacing[0] * rows / out_rows, 6), round(spacing[1] * columns / out_columns, 6))
    sc_uid = result_uid(sop, model_id, "sc")
    with _quiet():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=pixels,
            # JPEG baseline: highdicom converts RGB to YCbCr and labels it YBR_FULL_422. (Pillow
            # subsamples the chroma 4:2:0; DICOM CP 1653 allows other subsamplings under that
            # label, per DCMTK feature #995, https://support.dcmtk.org/redmine/issues/995.)
            photometric_interpretation=hd.PhotometricInterpretationValues.YBR_FULL_422,
            bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=result_uid(sop, model_id, "sc-series"), series_number=SC_SERIES_NUMBER,
            sop_instance_uid=sc_uid, instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER, software_versions=_software_version(),
            device_serial_number=model_id[:64],
            pixel_spacing=spacing,
            # placeholder that highdicom requires for a PATIENT image; replaced by the source's below
            patient_orientation=("L", "F"),
            transfer_syntax_uid=JPEGBaseline8Bit,
            series_description=f"heartbatch overlay ({model_id})"[:64])
        sc.copy_patient_and_study_information(source)
    # Resampling and drawing keep the orientation: the source's value, or empty (type 2) if unknown.
    orientation = source.get("PatientOrientation")
    orientation = [str(x) for x in orientation] if isinstance(orientation, (list, tuple, MultiValue)) else []
    sc.PatientOrientation = orientation if len(orientation) == 2 and all(orientation) else None
    sc.BurnedInAnnotation = "YES"
    for keyword in ("BodyPartExamined", "RecognizableVisualFeatures"):  # what a viewer files or hides it by
        if source.get(keyword):
            setattr(sc, keyword, source.get(keyword))
    _lossy_history(sc, source, 3 * out_rows * out_columns / max(1, len(sc.PixelData)))
    derivation = ["heartbatch overlay burned in (heart box red, thorax box blue, CTR)"]
    codes = []
    if resized:
        derivation.append(f"resampled from {columns}x{rows} to {out_columns}x{out_rows}")
        codes.append(v.spatial_resampling)
    derivation.append("JPEG baseline")
    codes.append(v.lossy_compression)
    sc.DerivationDescription = "; ".join(derivation)[:1024]
    sc.DerivationCodeSequence = [_plain_code(c) for c in codes]
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = sop
    reference.PurposeOfReferenceCodeSequence = [_plain_code(v.source_image_for_processing)]
    sc.SourceImageSequence = [reference]
    return _save(sc, Path(out_dir) / f"{sc_uid}.sc.dcm")


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


def _plain_code(concept) -> pydicom.Dataset:
    """A code sequence item (pydicom Dataset) of a highdicom CodedConcept."""
    item = pydicom.Dataset()
    item.CodeValue = concept.value
    item.CodingSchemeDesignator = concept.scheme_designator
    item.CodeMeaning = concept.meaning
    return item
