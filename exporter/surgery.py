"""Graph surgery for the trust outputs: features for the content check, and box uncertainty.

The box network already computes what is needed: its pooled last-stage features
say what kind of image it is looking at, and its soft-argmax heatmaps say how
sure each coordinate is (a sharp peak or a wide spread).  These functions add
outputs to an exported model (float or int8) without retraining it:

* :func:`with_features` adds ``trust_features`` ``[N, D]``: the pooled layer4
  features, the fused feature map pooled to 4 x 4 and the input itself pooled
  to 16 x 16 (layout and polarity: what tells a film turned or inverted);
* :func:`add_uncertainty` adds ``uncertainty`` ``[N, 8]``: the standard
  deviation of each coordinate under its heatmap's softmax, times a factor
  calibrated on the validation split;
* :func:`add_content_head` adds ``content`` ``[N, K]`` (class probabilities
  of a linear classifier on ``trust_features``), ``chest_distance`` ``[N]``
  (Mahalanobis distance of the layer4 features from the training films, per
  dimension) and ``chest_score`` ``[N]``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from heartbatch.errors import HeartbatchError

from .net import LAYER4_DIMS

FEATURES = "trust_features"
PREFIX = "trust/"  # every node and initializer this module adds
OUTPUTS = ("chest_score", "uncertainty", "content", "chest_distance", FEATURES)


class SurgeryError(HeartbatchError, ValueError):
    """The graph is not one heartbatch network export (e.g. an ensemble)."""


def _producer(graph) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _softmax(graph) -> onnx.NodeProto:
    nodes = [n for n in graph.node if n.op_type == "Softmax" and not n.name.startswith(PREFIX)]
    if len(nodes) != 1:
        raise SurgeryError(f"expected one soft-argmax (Softmax) in the graph, found {len(nodes)}; "
                           "trust outputs are added to single-network exports only")
    return nodes[0]


def _heatmap_features(graph) -> str:
    """The fused feature map that the heatmap convolution reads."""
    producer = _producer(graph)
    node = producer.get(_softmax(graph).input[0])
    while node is not None and node.op_type != "Conv":
        node = producer.get(node.input[0])
    if node is None:
        raise SurgeryError("no heatmap convolution before the soft-argmax")
    return node.input[0]


def _layer4(graph) -> str:
    """The last backbone stage's output: what the top lateral 1x1 convolution reads."""
    for node in graph.node:
        if node.op_type == "Conv" and node.name.startswith("/lateral.2/"):
            return node.input[0]
    raise SurgeryError("no '/lateral.2/' convolution: not a heartbatch HeartBoxNet export")


def _const(graph, name: str, value) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _node(graph, op: str, inputs: list[str], output: str, **attrs) -> str:
    graph.node.append(helper.make_node(op, inputs, [output], name=f"{PREFIX}{output}", **attrs))
    return output


def _output(graph, name: str, shape: list) -> None:
    graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))


def input_size(model: onnx.ModelProto) -> int:
    from heartbatch import contract as C

    from .props import metadata

    return int(metadata(model)[C.META_INPUT_SIZE])


def without_trust(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every trust output removed: the box network as export or quantize wrote it."""
    model = _copy(model)
    g = model.graph
    keep = [n for n in g.node if not n.name.startswith(PREFIX)]
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if not i.name.startswith(PREFIX)]
    del g.initializer[:]
    g.initializer.extend(inits)
    outputs = [o for o in g.output if o.name not in OUTPUTS]
    del g.output[:]
    g.output.extend(outputs)
    return model


def with_features(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with the ``trust_features`` output (trust outputs already there are replaced)."""
    model = without_trust(model)
    g, size = model.graph, input_size(model)
    fused = _heatmap_features(g)
    l4 = _node(g, "GlobalAveragePool", [_layer4(g)], "trust/l4_pool")
    l4 = _node(g, "Flatten", [l4], "trust/l4")
    k = size // 32  # the stride-8 map pooled to 4 x 4
    fused = _node(g, "AveragePool", [fused], "trust/fused_pool", kernel_shape=[k, k], strides=[k, k])
    fused = _node(g, "Flatten", [fused], "trust/fused")
    k = size // 16
    thumb = _node(g, "AveragePool", [g.input[0].name], "trust/thumb_pool", kernel_shape=[k, k], strides=[k, k])
    thumb = _node(g, "Flatten", [thumb], "trust/thumb")
    _node(g, "Concat", [l4, fused, thumb], FEATURES, axis=1)
    _output(g, FEATURES, ["N", "D"])
    return model


def add_uncertainty(model: onnx.ModelProto, factor: float = 1.0, name: str = "uncertainty") -> onnx.ModelProto:
    """Per-coordinate spread of the soft-argmax distributions, times ``factor``."""
    g, size = model.graph, input_size(model)
    side = size // 8
    prob = _node(g, "Reshape", [_softmax(g).output[0], _const(g, "trust/hm_shape", np.array([-1, 8, side, side]))],
                 "trust/prob")
    grid = (np.arange(side, dtype=np.float32) + 0.5) / side
    moments = []
    for axis, reduce_axis in (("x", 2), ("y", 3)):
        marginal = _node(g, "ReduceSum", [prob, _const(g, f"trust/axes_{axis}", np.array([reduce_axis]))],
                         f"trust/m{axis}", keepdims=0)
        mean = _node(g, "ReduceSum", [_node(g, "Mul", [marginal, _const(g, f"trust/g{axis}", grid)],
                                            f"trust/mg{axis}"), _const(g, f"trust/last_{axis}", np.array([-1]))],
                     f"trust/e{axis}", keepdims=0)
        square = _node(g, "ReduceSum", [_node(g, "Mul", [marginal, _const(g, f"trust/g2{axis}", grid ** 2)],
                                              f"trust/mg2{axis}"), _const(g, f"trust/last2_{axis}", np.array([-1]))],
                       f"trust/e2{axis}", keepdims=0)
        moments.append(_node(g, "Sub", [square, _node(g, "Mul", [mean, mean], f"trust/ee{axis}")], f"trust/var{axis}"))
    is_x = np.array([1, 0] * 4, dtype=np.float32)
    var = _node(g, "Add", [_node(g, "Mul", [moments[0], _const(g, "trust/is_x", is_x)], "trust/vx"),
                           _node(g, "Mul", [moments[1], _const(g, "trust/is_y", 1 - is_x)], "trust/vy")], "trust/var")
    var = _node(g, "Max", [var, _const(g, "trust/eps", np.array(1e-12, np.float32))], "trust/var_pos")
    sd = _node(g, "Sqrt", [var], "trust/sd")
    _node(g, "Mul", [sd, _const(g, "trust/factor", np.array(factor, np.float32))], name)
    _output(g, name, ["N", 8])
    return model


def add_content_head(model: onnx.ModelProto, head: "ContentHead") -> onnx.ModelProto:
    """``content``, ``chest_distance`` and ``chest_score`` on top of ``trust_features``."""
    g = model.graph
    z = _node(g, "Sub", [FEATURES, _const(g, "trust/mu", head.mu.astype(np.float32))], "trust/centred")
    z = _node(g, "Mul", [z, _const(g, "trust/inv_sd", (1 / head.sd).astype(np.float32))], "trust/z")
    logits = _node(g, "Add", [_node(g, "MatMul", [z, _const(g, "trust/w", head.w.astype(np.float32))],
                                    "trust/zw"), _const(g, "trust/b", head.b.astype(np.float32))], "trust/logits")
    content = _node(g, "Softmax", [logits], "content", axis=1)
    _output(g, "content", ["N", len(head.classes)])
    l4 = _node(g, "Slice", [FEATURES, _const(g, "trust/s0", np.array([0])), _const(g, "trust/s1", np.array([LAYER4_DIMS])),
                            _const(g, "trust/s_axis", np.array([1]))], "trust/l4_slice")
    d = _node(g, "MatMul", [_node(g, "Sub", [l4, _const(g, "trust/l4_mean", head.l4_mean.astype(np.float32))],
                                  "trust/l4_c"), _const(g, "trust/whiten", head.whiten.astype(np.float32))],
              "trust/l4_w")
    d = _node(g, "ReduceSum", [_node(g, "Mul", [d, d], "trust/l4_sq"), _const(g, "trust/last_d", np.array([1]))],
              "trust/d2", keepdims=0)
    dist = _node(g, "Div", [d, _const(g, "trust/dims", np.array(LAYER4_DIMS, np.float32))], "chest_distance")
    _output(g, "chest_distance", ["N"])
    # the classifier alone: distance from the training films flags a film (the runtime compares
    # chest_distance with the policy's review_distance), it never refuses one
    _node(g, "ReduceSum", [_node(g, "Mul", [content, _const(g, "trust/chest_classes",
                                                           head.chest_mask().astype(np.float32))],
                             "trust/chest_p"), _const(g, "trust/last_c", np.array([1]))],
          "chest_score", keepdims=0)
    _output(g, "chest_score", ["N"])
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


# --- trust-onnx ------------------------------------------------------------------------


def strip_features(model: onnx.ModelProto) -> onnx.ModelProto:
    """``trust_features`` stays an inner tensor: only the contract's outputs are exported."""
    keep = [o for o in model.graph.output if o.name != FEATURES]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    return model
