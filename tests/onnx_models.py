"""Tiny ONNX models for runtime tests, built with onnx.helper (no torch).

Each one honours (or, for the broken ones, breaks on purpose) the contract in
:mod:`heartbatch.contract`, so runner tests run in milliseconds and know the
exact output to expect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from heartbatch import contract as C
from heartbatch.pixels import PIPELINE_VERSION, pipeline_description

OPSET = 17
IR_VERSION = 8  # opset 17 needs IR >= 8; old enough for any recent onnxruntime

#: The box :func:`constant_box_model` uses unless told otherwise (CTR 0.5).
DEFAULT_BOXES = (0.3, 0.4, 0.7, 0.8, 0.1, 0.2, 0.9, 0.9)
#: Thorax box of :func:`intensity_model`; its heart box widens with intensity.
INTENSITY_THORAX = (0.1, 0.2, 0.9, 0.9)


def metadata(size: int = 224, outputs: int = 8, overrides: dict[str, str | None] | None = None
             ) -> dict[str, str]:
    """Complete contract metadata; an override of ``None`` drops that key."""
    meta = {
        C.META_FORMAT: C.FORMAT_VERSION,
        C.META_INPUT_SIZE: str(size),
        C.META_OUTPUT_LAYOUT: C.OUTPUT_LAYOUTS.get(outputs, f"{outputs} columns"),
        C.META_PREPROCESSING: pipeline_description(),
        C.META_PIXELS_VERSION: PIPELINE_VERSION,
        C.META_NORMALIZATION: "none (test model)",
        C.META_TRAINING_DATA: "none: synthetic test model",
        C.META_VALIDATION: json.dumps({}),
        C.META_CODE_VERSION: "tests",
    }
    for key, value in (overrides or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return meta


def _save(path: str | Path, nodes: list, inits: list, *, size: int, outputs: int,
          input_shape: Sequence[int | str] | None = None, input_name: str = C.INPUT_NAME,
          output_name: str = C.OUTPUT_NAME, batch: int | str = "N",
          metadata_overrides: dict[str, str | None] | None = None) -> Path:
    shape = list(input_shape) if input_shape is not None else [batch, 1, size, size]
    graph = helper.make_graph(
        nodes, "heartbatch_test",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, outputs])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="heartbatch-tests", ir_version=IR_VERSION)
    helper.set_model_props(model, metadata(size, outputs, metadata_overrides))
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _const(name: str, values) -> TensorProto:
    arr = np.asarray(values, dtype=np.float32)
    return helper.make_tensor(name, TensorProto.FLOAT, arr.shape, arr.ravel().tolist())


def _mean_nodes(input_name: str, rank: int = 4) -> list:
    """Per-image mean as ``[N, 1]``: the batch dimension the output must follow."""
    return [
        helper.make_node("ReduceMean", [input_name], ["mean4"], axes=list(range(1, rank)),
                         keepdims=1),
        helper.make_node("Reshape", ["mean4", "shape_n1"], ["mean"]),
    ]


def _shape_n1() -> TensorProto:
    return helper.make_tensor("shape_n1", TensorProto.INT64, [2], [-1, 1])


def constant_box_model(path: str | Path, boxes: Sequence[float] = DEFAULT_BOXES, size: int = 224,
                       metadata_overrides: dict[str, str | None] | None = None, *,
                       input_name: str = C.INPUT_NAME, output_name: str = C.OUTPUT_NAME,
                       batch: int | str = "N") -> Path:
    """Same box for every image; ``mean * 0 + box`` so the output has N rows.

    ``input_name``/``output_name``/``batch`` (an int fixes the batch size) let
    contract tests break one rule at a time.
    """
    boxes = [float(b) for b in boxes]
    nodes = _mean_nodes(input_name) + [
        helper.make_node("Mul", ["mean", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "box"], [output_name]),
    ]
    inits = [_shape_n1(), _const("zero", 0.0), _const("box", [boxes])]
    return _save(path, nodes, inits, size=size, outputs=len(boxes), input_name=input_name,
                 output_name=output_name, batch=batch, metadata_overrides=metadata_overrides)


def intensity_expected(images: np.ndarray) -> np.ndarray:
    """What :func:`intensity_model` returns for ``images`` [N, 1, S, S] (float32 [N, 8]).

    Heart ``x0=0.61-0.4*m, y0=0.45, x1=0.85, y1=0.75`` with ``m`` the image mean
    clipped to [0, 1]; thorax :data:`INTENSITY_THORAX`.  So CTR = 0.3 + 0.5 * m:
    rows mixed up across a batch show as wrong CTRs.  The heart lies right of
    the thorax midline, in the anatomical ranges of the review rules, for m
    from about 0.1 to 1.
    """
    m = np.clip(images.reshape(len(images), -1).mean(axis=1, dtype=np.float64), 0, 1)
    out = np.tile(np.array([0.61, 0.45, 0.85, 0.75, *INTENSITY_THORAX]), (len(images), 1))
    out[:, 0] -= 0.4 * m
    return out.astype(np.float32)


def intensity_model(path: str | Path, size: int = 224,
                    metadata_overrides: dict[str, str | None] | None = None) -> Path:
    """Output depends on each image (see :func:`intensity_expected`)."""
    nodes = _mean_nodes(C.INPUT_NAME) + [
        helper.make_node("Clip", ["mean", "lo", "hi"], ["m"]),
        helper.make_node("Mul", ["m", "gain"], ["scaled"]),  # [N,1] * [1,8]
        helper.make_node("Add", ["scaled", "base"], [C.OUTPUT_NAME]),
    ]
    gain = np.zeros((1, 8), np.float32)
    gain[0, 0] = -0.4
    inits = [_shape_n1(), _const("lo", 0.0), _const("hi", 1.0), _const("gain", gain),
             _const("base", [[0.61, 0.45, 0.85, 0.75, *INTENSITY_THORAX]])]
    return _save(path, nodes, inits, size=size, outputs=8, metadata_overrides=metadata_overrides)


def wrong_rank_model(path: str | Path, size: int = 224) -> Path:
    """Input ``[N, S, S]``: the runner must refuse it before reading any DICOM."""
    nodes = _mean_nodes(C.INPUT_NAME, rank=3) + [
        helper.make_node("Mul", ["mean", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "box"], [C.OUTPUT_NAME]),
    ]
    inits = [_shape_n1(), _const("zero", 0.0), _const("box", [DEFAULT_BOXES])]
    return _save(path, nodes, inits, size=size, outputs=8, input_shape=["N", size, size])


def wrong_width_model(path: str | Path, size: int = 224) -> Path:
    """Five outputs (metadata still claims eight): only the real shape gives it away."""
    return constant_box_model(path, DEFAULT_BOXES[:5], size=size,
                              metadata_overrides={C.META_OUTPUT_LAYOUT: C.OUTPUT_LAYOUTS[8]})


def nan_model(path: str | Path, size: int = 224, threshold: float = 0.5) -> Path:
    """NaN rows for images with mean > ``threshold``, the default box otherwise,
    so one batch mixes good and bad rows."""
    nodes = _mean_nodes(C.INPUT_NAME) + [
        helper.make_node("Greater", ["mean", "threshold"], ["bad"]),
        helper.make_node("Where", ["bad", "nan", "box"], [C.OUTPUT_NAME]),
    ]
    inits = [_shape_n1(), _const("threshold", threshold), _const("nan", [[np.nan] * 8]),
             _const("box", [DEFAULT_BOXES])]
    return _save(path, nodes, inits, size=size, outputs=8)


def saturating_copy(source: str | Path, out: str | Path) -> Path:
    """The shipped model with its 7-bit weights widened to the full int8 range (as models were
    quantized before 7-bit weights): the same network, but its weights can overflow the 16-bit
    pair sums of x86 int8 kernels without VNNI. Its probe is recorded again in exact arithmetic,
    so it is a model a careless exporter could have written; written around the exporter's own
    refusal to save such a model."""
    from onnx import numpy_helper

    from exporter import probe

    model = onnx.load(str(source))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        dq = producer.get(node.input[1]) if node.op_type == "Conv" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[dq.input[0]])
        if w.dtype != np.int8:
            continue
        for name, value in ((dq.input[0], np.clip(w.astype(np.int16) * 2, -127, 127).astype(np.int8)),
                            (dq.input[1], numpy_helper.to_array(inits[dq.input[1]]) / 2)):
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
        bias = producer.get(node.input[2]) if len(node.input) > 2 else None
        if bias is not None and bias.op_type == "DequantizeLinear":
            for name, value in ((bias.input[0], numpy_helper.to_array(inits[bias.input[0]]) * 2),
                                (bias.input[1], numpy_helper.to_array(inits[bias.input[1]]) / 2)):
                inits[name].CopyFrom(numpy_helper.from_array(value, name))
    probe.record(model)
    onnx.save(model, str(out))
    return Path(out)


def ellipse_masks(grid: int = 56, *, heart=(0.56, 0.62, 0.17, 0.12), right_lung=(0.30, 0.47, 0.17, 0.30),
                  left_lung=(0.70, 0.47, 0.17, 0.30), supersample: int = 8) -> np.ndarray:
    """Area-sampled ``[3, grid, grid]`` masks of three ellipses ``(cx, cy, rx, ry)`` (normalized):
    heart, right lung (the patient's: on the image left), left lung. The defaults are anatomically
    plausible (CTR 0.34 / 0.74 = 0.46, areas within :mod:`heartbatch.masks`' ranges)."""
    n = grid * supersample
    c = (np.arange(n) + 0.5) / n
    y, x = np.meshgrid(c, c, indexing="ij")
    out = []
    for cx, cy, rx, ry in (heart, right_lung, left_lung):
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
        out.append(inside.reshape(grid, supersample, grid, supersample).mean(axis=(1, 3)))
    return np.stack(out).astype(np.float32)


def masks_model(path: str | Path, masks: np.ndarray | None = None, boxes: Sequence[float] = DEFAULT_BOXES,
                size: int = 224, metadata_overrides: dict[str, str | None] | None = None, *,
                masks_type: int = TensorProto.FLOAT, extra_outputs: bool = False) -> Path:
    """The same ``masks`` (default :func:`ellipse_masks`) and ``boxes`` for every image (``mean * 0 +
    constant``, so both have N rows). ``masks`` of another shape (two channels, a grid larger than
    ``size``) or ``masks_type`` (e.g. TensorProto.DOUBLE) break the contract on purpose; with
    ``extra_outputs``, also ``chest_score`` (0.99) and ``uncertainty`` (zeros)."""
    masks = ellipse_masks() if masks is None else np.asarray(masks, np.float32)
    nodes = _mean_nodes(C.INPUT_NAME) + [
        helper.make_node("Mul", ["mean", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "box"], [C.OUTPUT_NAME]),
        helper.make_node("Reshape", ["zeros", "shape_n111"], ["zeros4"]),
        helper.make_node("Add", ["zeros4", "mask_const"], ["masks_f"]),
    ]
    if masks_type == TensorProto.FLOAT:
        nodes[-1].output[0] = C.MASKS
    else:
        nodes.append(helper.make_node("Cast", ["masks_f"], [C.MASKS], to=masks_type))
    inits = [_shape_n1(), _const("zero", 0.0), _const("box", [[float(b) for b in boxes]]),
             helper.make_tensor("shape_n111", TensorProto.INT64, [4], [-1, 1, 1, 1]),
             _const("mask_const", masks[None])]
    outputs = [helper.make_tensor_value_info(C.OUTPUT_NAME, TensorProto.FLOAT, ["N", len(boxes)]),
               helper.make_tensor_value_info(C.MASKS, masks_type, ["N", *masks.shape])]
    if extra_outputs:
        nodes += [helper.make_node("Reshape", ["zeros", "shape_n"], ["zeros1"]),
                  helper.make_node("Add", ["zeros1", "score"], [C.CHEST_SCORE]),
                  helper.make_node("Add", ["zeros", "sd"], [C.UNCERTAINTY])]
        inits += [helper.make_tensor("shape_n", TensorProto.INT64, [1], [-1]), _const("score", 0.99),
                  _const("sd", [[0.0] * 8])]
        outputs += [helper.make_tensor_value_info(C.CHEST_SCORE, TensorProto.FLOAT, ["N"]),
                    helper.make_tensor_value_info(C.UNCERTAINTY, TensorProto.FLOAT, ["N", 8])]
    graph = helper.make_graph(nodes, "heartbatch_test_masks",
                              [helper.make_tensor_value_info(C.INPUT_NAME, TensorProto.FLOAT, ["N", 1, size, size])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="heartbatch-tests", ir_version=IR_VERSION)
    helper.set_model_props(model, metadata(size, len(boxes), metadata_overrides))
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
