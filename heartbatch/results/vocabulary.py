"""The coded concepts of the results: standard codes where one exists, heartbatch's private scheme
for the rest, built once per process."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pydicom

#: Coding scheme for the concepts no standard scheme names (see :func:`vocabulary`): the
#: cardiothoracic ratio, the enlarged flag (CTR above heartbatch's threshold), the review flag and
#: its reason. Private schemes start with "99".
SCHEME = "99HEARTBATCH"


@functools.lru_cache(maxsize=1)
def vocabulary() -> SimpleNamespace:
    """Every coded concept the results use, as highdicom CodedConcepts built once (each item then
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


def plain_code(concept) -> pydicom.Dataset:
    """A code sequence item (pydicom Dataset) of a highdicom CodedConcept, for the attributes
    highdicom does not fill itself (e.g. a Secondary Capture's derivation codes)."""
    item = pydicom.Dataset()
    item.CodeValue = concept.value
    item.CodingSchemeDesignator = concept.scheme_designator
    item.CodeMeaning = concept.meaning
    return item
