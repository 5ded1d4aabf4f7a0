"""Recording a model's arithmetic probe (see :mod:`heartbatch.arithmetic`): a few fixed inputs
and the outputs the exact arithmetic gives for them, in the model's metadata.

The probe images are embedded in the model file, so they come from a source whose licence
allows redistribution (Wingspan, MIT), never from JSRT (research use, no redistribution).
"""

from __future__ import annotations

import numpy as np
import onnx

from heartbatch import arithmetic

from . import props

# data sources (the first part of a film's key, "wingspan/x.png") whose images may be shipped
REDISTRIBUTABLE = ("wingspan",)
FILMS = 2  # with a negative of the first: every single Wingspan film catches a saturating model


def choose(keys: list[str], n: int = FILMS) -> list[str]:
    """The probe films: the first ``n`` of ``keys`` (sorted) from a redistributable source."""
    allowed = sorted(k for k in keys if k.split("/", 1)[0] in REDISTRIBUTABLE)
    if not allowed:
        raise ValueError(f"no film from a redistributable source ({', '.join(REDISTRIBUTABLE)}) to record "
                         f"a probe with; the probe images are shipped inside the model file")
    return allowed[:n]


def images(films: list[np.ndarray]) -> np.ndarray:
    """Preprocessed films (float in [0, 1]) as probe images: the films as they are, plus a
    negative of the first (so the probe also covers the content check's refusal side)."""
    stack = [np.clip(np.round(np.asarray(f, np.float64) * 255), 0, 255).astype(np.uint8) for f in films]
    stack.append(255 - stack[0])
    return np.stack(stack)


def exact_outputs(model: onnx.ModelProto, inputs: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from heartbatch import contract

    session = ort.InferenceSession(model.SerializeToString(), arithmetic.session_options(arithmetic.EXACT, None),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {contract.INPUT_NAME: inputs})))


def record(model: onnx.ModelProto, probe_images: np.ndarray | None = None) -> arithmetic.Probe:
    """Store in ``model``'s metadata the probe of ``probe_images`` (default: the images its probe
    already has) with the exact outputs of this graph."""
    meta = props.metadata(model)
    if probe_images is None:
        if arithmetic.META_PROBE not in meta:
            raise ValueError("the model has no probe images to record outputs for")
        probe_images = arithmetic.Probe.from_json(meta[arithmetic.META_PROBE]).images
    inputs = (probe_images.astype(np.float32) / 255.0)[:, None]
    outputs = exact_outputs(model, inputs)
    probe = arithmetic.Probe(probe_images, outputs, arithmetic.default_tolerance(outputs),
                             f"onnxruntime {arithmetic.onnxruntime_version()}, exact arithmetic "
                             f"(no graph optimization: dequantize, float, quantize)")
    meta[arithmetic.META_PROBE] = probe.to_json()
    props.set_metadata(model, meta)
    return probe
