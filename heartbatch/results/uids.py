"""The UIDs of a result, derived rather than random: measuring the same image with the same model
again gives the same UIDs, so the new result replaces the old one (same file name, and a PACS files
it once); a different model gives new ones."""

from __future__ import annotations

import uuid

#: Namespace of the name-based (version 5) UUIDs behind every result UID.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/heartbatch/dicom-results")


def result_uid(source_sop_uid: str, model_id: str, tag: str) -> str:
    """A UID that depends only on the source image, the model and what it names ("sr", "pr"...):
    a "2.25." UID (ISO/IEC 9834-8) of a name-based UUID. (pydicom's ``generate_uid(prefix=None,
    entropy_srcs=...)`` would not do: with no prefix it ignores the entropy and is random.)"""
    name = "\x1f".join((str(source_sop_uid), str(model_id), str(tag)))
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
