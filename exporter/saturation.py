"""Can a quantized model saturate onnxruntime's int8 kernels on some CPU? A static check.

x86 CPUs without VNNI multiply u8 activations by s8 weights with VPMADDUBSW, which adds
each pair of products into a signed 16-bit integer with saturation: with activations up
to 255, a pair can overflow unless every weight is within +-64 (2 x 255 x 64 = 32,640 <=
32,767); heartbatch keeps weights to 7 signed bits, [-63, 63], a step inside that bound. Which weights are paired depends on the kernel's packing, so the bound is on
every weight. s8 activations are shifted to u8 by those kernels first, so the same bound
holds for them. u8 weights (U8U8) run in kernels that widen to 16 bits before
multiplying: they cannot saturate. With 7-bit weights the same fast kernels are exact on
every CPU.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from heartbatch.errors import HeartbatchError

ACTIVATION_MAX = 255
PAIR_SUM_MAX = 32767
SAFE_WEIGHT = 63  # 7 signed bits; the 16-bit pair sum allows up to PAIR_SUM_MAX // (2 * ACTIVATION_MAX) = 64

# op type -> index of its (quantized) weight input
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}
_INTEGER_OPS = {"QLinearConv": 3, "ConvInteger": 1, "QLinearMatMul": 3, "MatMulInteger": 1}


def saturation_risks(model: onnx.ModelProto) -> list[str]:
    """One line per quantized weight that can overflow the 16-bit pair sums (empty: safe)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    weights: dict[str, str] = {}  # int8 initializer -> the node that multiplies with it
    for node in graph.node:
        if node.op_type in _WEIGHT_INPUT and len(node.input) > _WEIGHT_INPUT[node.op_type]:
            source = producer.get(node.input[_WEIGHT_INPUT[node.op_type]])
            if source is not None and source.op_type == "DequantizeLinear" and source.input[0] in inits:
                weights[source.input[0]] = node.name or node.op_type
        elif node.op_type in _INTEGER_OPS and len(node.input) > _INTEGER_OPS[node.op_type]:
            if node.input[_INTEGER_OPS[node.op_type]] in inits:
                weights[node.input[_INTEGER_OPS[node.op_type]]] = node.name or node.op_type
    risks = []
    for name, user in weights.items():
        tensor = inits[name]
        if tensor.data_type != onnx.TensorProto.INT8:
            continue  # u8 weights run in kernels that widen first
        largest = int(np.abs(numpy_helper.to_array(tensor).astype(np.int16)).max(initial=0))
        if largest > SAFE_WEIGHT:
            risks.append(f"{user}: int8 weight {name} reaches {largest}, beyond 7 bits ({SAFE_WEIGHT}); pairs of "
                         f"u8 x s8 products reach 2 x 255 x {largest} = {2 * ACTIVATION_MAX * largest} "
                         f"against a 16-bit limit of {PAIR_SUM_MAX}")
    return risks


class SaturationError(HeartbatchError):
    """A quantized model that could give other results on CPUs without VNNI: never written."""


def refuse_saturating(model: onnx.ModelProto, what: str) -> None:
    risks = saturation_risks(model)
    if risks:
        raise SaturationError(f"{what} can saturate the int8 kernels of x86 CPUs without VNNI ({len(risks)} "
                              f"weights; {risks[0]}), so its results would depend on the CPU. Quantize with "
                              f"7-bit weights: quantize-onnx does so from a float model, and "
                              f"`quantize-onnx MODEL --requantize` converts an existing int8 model")


def requantize_weights(model: onnx.ModelProto) -> list[str]:
    """Requantize, in place, each int8 weight beyond 7 bits to 7 bits (per output channel,
    symmetric, [-63, 63]), and the int32 bias of its
    convolution with it (its scale is the input scale times the weight scale). Activations and
    everything else stay as they are. For a quantized model whose float source is gone: the
    dequantized weights are the float model that the exact arithmetic computes. Returns the
    weights changed."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    changed = []
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        wdq = producer.get(node.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[wdq.input[0]])
        if w.dtype != np.int8 or np.abs(w.astype(np.int16)).max(initial=0) <= SAFE_WEIGHT:
            continue
        scale = numpy_helper.to_array(inits[wdq.input[1]]).astype(np.float64)
        zero = numpy_helper.to_array(inits[wdq.input[2]]) if len(wdq.input) > 2 else np.zeros(1, np.int8)
        if np.any(zero != 0):
            raise ValueError(f"{node.name}: asymmetric int8 weights are not supported")
        axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1)
        if scale.ndim == 0 or scale.size == 1:
            axis, scale = 0, np.full(w.shape[0], float(scale.ravel()[0]))
        if axis != 0:
            raise ValueError(f"{node.name}: per-channel weights on axis {axis} are not supported")
        shape = (-1,) + (1,) * (w.ndim - 1)
        real = w.astype(np.float64) * scale.reshape(shape)
        largest = np.abs(real).reshape(w.shape[0], -1).max(axis=1)
        new_scale = np.where(largest > 0, largest / SAFE_WEIGHT, scale).astype(np.float32)
        new_w = np.clip(np.round(real / new_scale.astype(np.float64).reshape(shape)), -SAFE_WEIGHT, SAFE_WEIGHT)
        _set(inits, wdq.input[0], new_w.astype(np.int8))
        _set(inits, wdq.input[1], new_scale.reshape(numpy_helper.to_array(inits[wdq.input[1]]).shape))
        if len(wdq.input) > 2:
            _set(inits, wdq.input[2], np.zeros(new_scale.shape, np.int8).reshape(zero.shape))
        bdq = producer.get(node.input[2]) if len(node.input) > 2 else None
        if bdq is not None and bdq.op_type == "DequantizeLinear" and bdq.input[0] in inits:
            ratio = new_scale.astype(np.float64) / scale  # the bias scale follows the weight scale
            bias = numpy_helper.to_array(inits[bdq.input[0]]).astype(np.float64)
            bias_scale = numpy_helper.to_array(inits[bdq.input[1]]).astype(np.float64)
            _set(inits, bdq.input[0], np.round(bias / ratio).astype(np.int32))
            _set(inits, bdq.input[1], (bias_scale * ratio).astype(np.float32))
        changed.append(wdq.input[0])
    return changed


def _set(inits: dict, name: str, value: np.ndarray) -> None:
    inits[name].CopyFrom(numpy_helper.from_array(value, name))
