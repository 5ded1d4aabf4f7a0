"""An ONNX model file as export-onnx, quantize-onnx and trust-onnx write it: checked, probed, and
saved all or nothing."""

from __future__ import annotations

from pathlib import Path

import onnx

from heartbatch.files import replacing

from .props import metadata


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
