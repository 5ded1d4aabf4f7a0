"""An ONNX model's metadata_props as a dict of strings, and JSON that strict readers accept.

A leaf of the exporter: writing a model (:mod:`.onnxfile`), its probe (:mod:`.probe`) and
its trust outputs (:mod:`.trust`) all read and set metadata through it.
"""

from __future__ import annotations

import math

import onnx


def json_safe(value):
    """NaN/inf become null so the metadata is strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def set_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Replace the model's metadata_props with ``meta``."""
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
