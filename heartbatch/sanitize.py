"""The one gate for DICOM header values and exception texts that reach an output.

A corrupt element length makes pydicom read kilobytes of the file as one
value: the names, IDs and dates that follow it, pixel bytes, control
characters.  Anything that goes to the report, the terminal, the debug log,
the summaries or the HTML report therefore passes through here:

- a header value is shown only when it is valid for its VR (a UID is digits
  and dots, a CS an upper-case code, a DA eight digits, text printable and
  within its VR's length); an invalid value is *described*
  ("an invalid SOP Class UID"), never shortened and echoed, because the first
  characters of a swallowed value can themselves be patient data;
- patient-identifying elements are never shown (only :func:`patient_cell`,
  for the opt-in ``--include-patient-id`` columns, returns them);
- exception messages are cut where a quoted part begins (libraries quote
  values there, and a swallowed value may hold quotes itself; a quoted DICOM
  element, UID or VR name stays) or where anything but printable ASCII
  begins, and are capped.

In report cells an invalid value becomes empty (:func:`cell`): a column of
UIDs or dates holds only valid UIDs or dates, or nothing.
"""

from __future__ import annotations

import functools
import re
import traceback

from pydicom.datadict import dictionary_description, dictionary_VR

MAX_CHARS = 64  # the most characters of any header value in any output
MESSAGE_CHARS = 200  # the most characters of an exception message in a reason (as before)

#: Elements that identify the patient (or the people and place around them);
#: any element of VR PN counts too.
PATIENT_KEYWORDS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
    "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence", "IssuerOfPatientID",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "MedicalRecordLocator",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID", "AdmissionID",
    "PatientInsurancePlanCodeSequence", "MilitaryRank", "BranchOfService", "EthnicGroup",
    "PatientReligiousPreference", "CountryOfResidence", "RegionOfResidence", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "RequestingPhysician", "ResponsiblePerson", "PatientComments", "AdditionalPatientHistory",
})

#: Maximum value length by VR (PS3.5 table 6.2-1), for the VRs validated as text.
TEXT_VR_CHARS = {"AE": 16, "AS": 4, "CS": 16, "DS": 16, "IS": 12, "LO": 64, "SH": 16, "PN": 64,
                 "ST": 1024, "LT": 10240, "UT": 10240, "UC": 10240, "DT": 26, "TM": 16}

_UID = re.compile(r"[0-9.]{1,64}")
_CS = re.compile(r"[A-Z0-9 _]{0,16}")
_DA = re.compile(r"[0-9]{8}")
_NOT_ASCII_PRINTABLE = re.compile(r"[^\x20-\x7e]+")
_NOT_ASCII_PRINTABLE_ON = re.compile(r"[^\x20-\x7e].*", re.DOTALL)
_SPACES = re.compile(r"\s+")
# A quoted part: an opening quote not inside a word (so "can't" is no quote), up to
# the matching closing quote or, when the message was cut, to the end.
_QUOTED = re.compile(r"(?<![A-Za-z0-9])[bBrRuU]?(?:'(?P<single>[^']*)(?:'|$)|\"(?P<double>[^\"]*)(?:\"|$))")


def _vr(keyword: str) -> str:
    try:
        return dictionary_VR(keyword)
    except KeyError:
        return ""


def name(keyword: str) -> str:
    """The element's name for people: 'SOP Class UID' for SOPClassUID."""
    try:
        return dictionary_description(keyword)
    except KeyError:
        return keyword


def identifying(keyword: str) -> bool:
    return keyword in PATIENT_KEYWORDS or _vr(keyword) == "PN"


def value(keyword: str, text: str) -> str | None:
    """``text`` (an element's value as a string) when it is valid for the element's VR
    and does not identify the patient; None otherwise.  CS values are upper-cased
    first (lower case is a common, harmless deviation)."""
    if identifying(keyword):
        return None
    text = text.strip()
    if not text:
        return ""
    vr = _vr(keyword)
    if vr == "UI":
        return text if _UID.fullmatch(text) else None
    if vr == "DA":
        return text if _DA.fullmatch(text) else None
    if vr == "CS":
        text = text.upper()
        return text if all(_CS.fullmatch(part) for part in text.split("\\")) else None
    # longer than the VR allows, or than any output shows: described, never cut and echoed
    if len(text) > min(TEXT_VR_CHARS.get(vr, MAX_CHARS), MAX_CHARS) or not text.isprintable():
        return None
    return text


def cell(keyword: str, text: str) -> str:
    """A header value for a report cell: the valid value, or empty."""
    valid = value(keyword, text)
    return "" if valid is None else valid


def invalid(keyword: str) -> str:
    """What a reason says instead of a value it must not show."""
    return f"a {name(keyword)} (not shown)" if identifying(keyword) else f"an invalid {name(keyword)}"


def shown(keyword: str, text: str) -> str:
    """A header value for a reason or message: the valid value, or what it is."""
    valid = value(keyword, text)
    return invalid(keyword) if valid is None else valid


def patient_cell(keyword: str, text: str) -> str:
    """A patient-identifying value for the opt-in ``--include-patient-id`` columns:
    printable and within its VR's length (and at most :data:`MAX_CHARS`), else empty."""
    text = text.strip()
    limit = min(TEXT_VR_CHARS.get(_vr(keyword), MAX_CHARS), MAX_CHARS)
    return text if len(text) <= limit and text.isprintable() else ""


def printable(text: str, limit: int = MAX_CHARS) -> str:
    """Printable ASCII only (other runs become '?'), whitespace collapsed, at most ``limit``."""
    text = _NOT_ASCII_PRINTABLE.sub("?", _SPACES.sub(" ", text)).strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


@functools.cache
def _vocabulary() -> frozenset[str]:
    """Names pydicom's messages quote that are not data: element names and keywords,
    UID names, VRs."""
    from pydicom.datadict import DicomDictionary
    from pydicom.valuerep import VR

    words = {str(vr.value) for vr in VR}
    for entry in DicomDictionary.values():
        words.update(entry[2:5:2])
    try:
        from pydicom._uid_dict import UID_dictionary  # private: the UID names, if it is still there
    except ImportError:
        pass
    else:
        words.update(entry[0] for entry in UID_dictionary.values())
    return frozenset(w for w in words if w)


def redact(text: str) -> str:
    """``text`` up to its first quoted part, which becomes '...' (messages quote values
    there, and what follows may be more of the value); quoted DICOM element, UID
    and VR names are kept."""
    for match in _QUOTED.finditer(text):
        inner = match.group("single") if match.group("single") is not None else match.group("double")
        if inner not in _vocabulary():
            return text[: match.start()] + "'...'"
    return text


def message(exc: BaseException, limit: int = MESSAGE_CHARS) -> str:
    """An exception's message for a reason: redacted (:func:`redact`), its first
    line up to anything but printable ASCII, capped; the exception's type name
    when nothing is left."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not sink the record
        text = ""
    lines = [line for line in redact(text).splitlines() if line.strip()]
    first = _NOT_ASCII_PRINTABLE_ON.sub("", lines[0].replace("\t", " ")) if lines else ""
    return printable(first, limit) if first.strip() else type(exc).__name__


def exception(exc: BaseException, limit: int = MESSAGE_CHARS) -> str:
    """'TypeName: message' (just the type name when the message is empty), for reasons."""
    text = message(exc, limit)
    return type(exc).__name__ if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def traceback_text(exc: BaseException) -> str:
    """A traceback for the ``--debug`` log: the frames as Python prints them (code,
    not data), each exception's message through :func:`message`."""
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    parts = []
    for i, item in enumerate(reversed(chain)):
        if i:
            parts.append("\nwhich led to:\n\n")
        if item.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(item.__traceback__))
        parts.append(f"{type(item).__name__}: {message(item, 400)}\n")
    return "".join(parts)
