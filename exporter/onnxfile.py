"""An ONNX model file as export-onnx, quantize-onnx and trust-onnx write it: its metadata and
an all-or-nothing save."""

from __future__ import annotations

import math
from pathlib import Path

import onnx

from heartbatch.files import replacing


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


def save(proto: onnx.ModelProto, path: Path) -> None:
    """Write through ``NAME.partial`` and one rename: a reader never sees half a model."""
    with replacing(path, suffix=".partial") as partial:
        onnx.save(proto, str(partial))
