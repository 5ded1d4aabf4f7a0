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


def save(proto: onnx.ModelProto, path: Path, probe_images=None) -> None:
    """Write through ``NAME.partial`` and one rename: a reader never sees half a model. The
    arithmetic probe is recorded for ``probe_images``, or recorded again for the images the model
    already carries (its outputs change with the graph). A model whose int8 weights could saturate
    some CPU's kernels is refused (SaturationError), whoever writes it."""
    from heartbatch.arithmetic import META_PROBE

    from .saturation import refuse_saturating

    refuse_saturating(proto, path.name)
    if probe_images is not None or META_PROBE in metadata(proto):
        from . import probe

        probe.record(proto, probe_images)
    with replacing(path, suffix=".partial") as partial:
        onnx.save(proto, str(partial))
