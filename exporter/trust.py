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

FEATURES = "trust_features"
LAYER4_DIMS = 512
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

    from .onnxfile import metadata

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

USAGE = """`trust-onnx`: add the content check and box uncertainty to an exported model.

    trust-onnx heartbox.onnx --data ../shared/data/cxr-ctr \\
        --split heartbatch/models/heartbox.split.json --out heartbox-trust.onnx

Fits the content classifier and the feature distance on training-split films
(made ward-like and made wrong, see exporter/corrupt.py) and on the non-chest
images pip packages ship; calibrates the uncertainty and chooses the review
thresholds on the validation split, and prints the check's accuracy by kind
on validation-split films it never saw.  The thresholds go into the model's
metadata (heartbatch.trust), where `heartbatch run` reads its defaults.
"""


def _session(model: onnx.ModelProto, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_outputs(session, images: list[np.ndarray], names: list[str], batch: int = 32) -> dict[str, np.ndarray]:
    from heartbatch import contract as C

    chunks: dict[str, list] = {n: [] for n in names}
    for start in range(0, len(images), batch):
        x = np.stack(images[start:start + batch])[:, None].astype(np.float32)
        for name, value in zip(names, session.run(names, {C.INPUT_NAME: x})):
            chunks[name].append(value)
    return {n: np.concatenate(v) for n, v in chunks.items()}


def ctr_sd(boxes: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """:func:`heartbatch.confidence.ctr_uncertainty` over rows."""
    from heartbatch.confidence import ctr_uncertainty

    return np.array([ctr_uncertainty(b, s) for b, s in zip(boxes, sd)], dtype=np.float64)


def main(argv=None) -> int:
    import argparse
    import json
    import sys
    from pathlib import Path

    from heartbatch import contract as C
    from heartbatch.images import load_image
    from heartbatch.labels import LabelError, SplitError, load_labels, read_split
    from heartbatch.pixels import preprocess

    from . import content, probe
    from .onnxfile import metadata, save, set_metadata
    from .robustness import ctrs
    from .saturation import SaturationError, refuse_saturating
    from .ward import patient_split, read_ward

    p = argparse.ArgumentParser(prog="trust-onnx", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="ONNX model written by export-onnx or quantize-onnx")
    p.add_argument("--data", required=True, help="labeled chest films (cxr-ctr layout)")
    p.add_argument("--labels", help="label CSV for --data")
    p.add_argument("--split", required=True, type=Path, help="the model's train/validation split (split.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--report", type=Path, help="also write the evaluation as JSON here")
    p.add_argument("--ward", type=Path,
                   help="a folder of real ward films with FOLDER.csv (file, patient): half the patients (by a "
                        "seeded hash) are fitted on as chest films and set the review cut; the rest are held out "
                        "and reported")
    p.add_argument("--max-ward-flagged", type=float, default=0.10,
                   help="with --ward: review-uncertainty cut flags at most this share of the fitting patients' "
                        "films (0.10)")
    p.add_argument("--leave-out-packages", action="store_true",
                   help="also check each family of package images with a classifier fitted without it "
                        "(kinds of image never seen in fitting; about 30 more fits)")
    args = p.parse_args(argv)
    try:
        base = onnx.load(str(args.model))
        refuse_saturating(base, args.model.name)  # its features would depend on the CPU
        items = load_labels(args.data, args.labels)
        split = read_split(args.split, [i.key for i in items])
        size = input_size(base)
        featured = with_features(base)
        probe_films = probe.choose(split["train"])
        ward_fit, ward_held = patient_split(read_ward(args.ward), args.seed) if args.ward else ([], [])
    except (OSError, ValueError, LabelError, SplitError, SurgeryError, SaturationError, KeyError,
            onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    add_uncertainty(featured)  # factor 1: raw spreads, calibrated below
    session = _session(featured)
    names = [C.OUTPUT_NAME, FEATURES, "uncertainty"]
    by_key = {i.key: i for i in items}
    films = {k: preprocess(load_image(by_key[k].image_path), size) for k in split["train"] + split["val"]}
    train = content.chest_samples({k: films[k] for k in split["train"]}, args.seed)
    ward = {f.key: preprocess(load_image(f.path), size) for f in ward_fit + ward_held}
    train.extend(content.chest_samples({f.key: ward[f.key] for f in ward_fit}, args.seed, ward_copies=1))
    others = content.package_samples(size, args.seed)
    others.extend(content.pattern_samples(size, args.seed))
    val = content.chest_samples({k: films[k] for k in split["val"]}, args.seed + 1)
    held = content.Samples()
    for f in ward_held:
        held.add(ward[f.key], content.CHEST, f"ward_held_{f.view or 'any'}", f.key)
    print(f"fitting on {len(train.images)} training-film samples ({len(ward_fit)} real ward films among the "
          f"films) and {len(others.images)} package images and patterns; checking on {len(val.images)} "
          f"validation-film samples and {len(ward_held)} held-out ward films", flush=True)
    fit = {name: run_outputs(session, s.images, names) for name, s in (("train", train), ("others", others),
                                                                          ("val", val), ("held", held)) if s.images}
    features = np.concatenate([fit["train"][FEATURES], fit["others"][FEATURES]])
    labels = np.array(train.labels + others.labels)
    mu, sd, w, b = content.fit_classifier(features, labels, len(content.CLASSES))
    positives = np.isin(np.array(train.labels), [content.CHEST, content.MIRRORED])
    l4_mean, whiten = content.fit_distance(fit["train"][FEATURES][positives, :LAYER4_DIMS])
    head = content.ContentHead(content.CLASSES, mu, sd, w, b, l4_mean, whiten)
    val_pos = np.isin(np.array(val.labels), [content.CHEST, content.MIRRORED])
    typical = float(np.percentile(head.distance(fit["val"][FEATURES][val_pos]), 99))
    head.distance_cut = 2.0 * typical                       # twice the validation films' 99th percentile

    # uncertainty: scale the spread so that it is one standard deviation of the CTR error (clean validation)
    clean = np.array([k == "chest" for k in val.kinds])
    val_items = [by_key[k] for k in np.array(val.groups)[clean]]
    truth = np.stack([i.boxes for i in val_items])
    pred, spread = fit["val"][C.OUTPUT_NAME][clean], fit["val"]["uncertainty"][clean]
    err = np.abs(ctrs(pred) - ctrs(truth))
    raw = ctr_sd(pred, spread)
    factor = float(np.median(err / raw) / 0.6745)
    review_uncertainty = choose_review_cut(session, films, split["val"], by_key, size, factor, args.seed + 1)
    ward_cut = None
    if ward_fit:  # real ward films spread wider where the boxes are fine (leads, haze): flag few of them
        ward_rows = run_outputs(session, [ward[f.key] for f in ward_fit], [C.OUTPUT_NAME, "uncertainty"])
        ward_cut = float(np.quantile(ctr_sd(ward_rows[C.OUTPUT_NAME], ward_rows["uncertainty"]) * factor,
                                     1 - args.max_ward_flagged))
        review_uncertainty = max(review_uncertainty, ward_cut)

    policy = dict(classes=list(content.CLASSES), min_chest_score=0.5, review_chest_score=0.8,
                  review_uncertainty=round(review_uncertainty, 4), mirrored_probability=0.5,
                  uncertainty_factor=round(factor, 4), distance_cut=round(head.distance_cut, 3),
                  review_distance=round(head.distance_cut, 3))
    checked = [fit[name][FEATURES] for name in ("val", "held") if name in fit]
    evaluation = _evaluate(head, np.concatenate(checked), _joined(val, held), policy)
    evaluation["uncertainty"] = {"factor": factor, "review_cut": review_uncertainty, "ward_cut": ward_cut,
                                 "ctr_mae_clean_val": float(err.mean()),
                                 "share_within_1sd": float(np.mean(err <= raw * factor))}
    if args.leave_out_packages:
        evaluation["left_out_packages"] = _leave_out(head, fit, train, others, policy)
    out = add_content_head(add_uncertainty(_strip(with_features(base)), factor), head)
    meta = metadata(base)
    meta[C.META_TRUST] = json.dumps({**policy, "fit": (
        f"content classifier and feature distance fitted by trust-onnx on {len(train.images)} samples of "
        f"{len(split['train'])} training films, {len(ward_fit)} ward films of {len({f.patient for f in ward_fit})} "
        f"patients and {len(others.images)} package images and patterns (seed {args.seed}); uncertainty "
        f"calibrated on {int(clean.sum())} validation films"
        + (f"; review cut flags at most {args.max_ward_flagged:.0%} of those ward films" if ward_fit else "")
        + (f"; held-out ward patients: {', '.join(sorted({f.patient for f in ward_held}))}" if ward_held else ""))},
        sort_keys=True)
    set_metadata(out, meta)
    onnx.checker.check_model(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save(out, args.out, probe.images([films[k] for k in probe_films]))
    _print(evaluation, policy)
    if args.report:
        args.report.write_text(json.dumps(evaluation, indent=1, sort_keys=True))
    print(f"wrote {args.out}")
    return 0


def choose_review_cut(session, films, keys, by_key, size, factor, seed, max_flagged=0.05) -> float:
    """The lowest CTR-SD cut that flags at most ``max_flagged`` of the rows whose CTR is within
    0.05, on the validation films with every ward corruption (seeded apart from the model card's
    sets): the spread grows on ward films even where the boxes stay right (ECG leads), so a cut
    set on clean films alone would flag most ward films."""
    from heartbatch import contract as C

    from .datasets import build_dataset
    from .robustness import SETS, corrupted, ctrs

    data = build_dataset([by_key[k] for k in keys], size)
    images, masks = data.images[:, 0].numpy(), data.masks.numpy()
    errors, sds = [], []
    for kind in SETS:
        x, truth = corrupted(images, masks, data.keys, kind, seed)
        out = run_outputs(session, list(x), [C.OUTPUT_NAME, "uncertainty"])
        errors.append(np.abs(ctrs(out[C.OUTPUT_NAME]) - ctrs(truth)))
        sds.append(ctr_sd(out[C.OUTPUT_NAME], out["uncertainty"]) * factor)
    err, sd = np.concatenate(errors), np.concatenate(sds)
    good = sd[err <= 0.05]
    return float(np.quantile(good, 1 - max_flagged))


def _strip(model: onnx.ModelProto) -> onnx.ModelProto:
    """``trust_features`` stays an inner tensor: only the contract's outputs are exported."""
    keep = [o for o in model.graph.output if o.name != FEATURES]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    return model


def _evaluate(head, features: np.ndarray, samples, policy: dict) -> dict:
    """Per kind of validation-film sample: share refused (score below the minimum), share
    flagged as unsure or mirrored among those measured."""
    from . import content

    score = head.score(features)
    p = head.probabilities(features)
    mirrored = p[:, content.CLASSES.index("mirrored")] > policy["mirrored_probability"]
    far = head.far(features)
    kinds = np.array(samples.kinds)
    out = {}
    for kind in sorted(set(kinds)):
        m = kinds == kind
        refused = score[m] < policy["min_chest_score"]
        unsure = (score[m] < policy["review_chest_score"]) | mirrored[m] | far[m]
        out[kind] = {"n": int(m.sum()), "refused": float(refused.mean()),
                     "refused_or_flagged": float((refused | unsure).mean()),
                     "mirrored_flag": float(mirrored[m].mean()), "unlike_flag": float((far[m] & ~refused).mean())}
    return {"by_kind": out}


def _joined(*samples):
    from . import content

    out = content.Samples()
    for s in samples:
        out.extend(s)
    return out


def _leave_out(head, fit: dict, train, others, policy: dict) -> dict:
    """Each family of package images (pydicom's CT, MR, NM, US, extremity CR, test pattern ...)
    scored by a classifier fitted without it: how the check does on kinds it never saw."""
    from . import content

    groups = np.array(others.groups)
    features = np.concatenate([fit["train"][FEATURES], fit["others"][FEATURES]])
    labels = np.array(train.labels + others.labels)
    in_train = np.ones(len(train.labels), bool)
    out = {}
    for group in sorted(set(groups)):
        keep = np.concatenate([in_train, groups != group])
        mu, sd, w, b = content.fit_classifier(features[keep], labels[keep], len(content.CLASSES), steps=200)
        held = content.ContentHead(head.classes, mu, sd, w, b, head.l4_mean, head.whiten, head.distance_cut)
        family = fit["others"][FEATURES][groups == group]
        score = held.score(family)
        out[group] = {"n": int(len(score)), "refused": float(np.mean(score < policy["min_chest_score"])),
                      "refused_or_flagged": float(np.mean((score < policy["review_chest_score"])
                                                          | held.far(family)))}
    return out


def _print(evaluation: dict, policy: dict) -> None:
    print(f"{'validation-film samples':24}{'n':>6}{'refused':>10}{'refused or flagged':>20}{'mirrored':>10}"
          f"{'unlike':>8}")
    for kind, row in evaluation["by_kind"].items():
        print(f"{kind:24}{row['n']:6d}{row['refused']:10.3f}{row['refused_or_flagged']:20.3f}"
              f"{row['mirrored_flag']:10.3f}{row['unlike_flag']:8.3f}")
    for group, row in evaluation.get("left_out_packages", {}).items():
        print(f"left out {group:15}{row['n']:6d}{row['refused']:10.3f}{row['refused_or_flagged']:20.3f}")
    u = evaluation["uncertainty"]
    print(f"uncertainty factor {u['factor']:.4f}; CTR error within one SD on clean validation "
          f"{u['share_within_1sd']:.2f}; review above CTR SD {u['review_cut']:.4f}"
          + (f" (the ward films' cut {u['ward_cut']:.4f})" if u.get("ward_cut") is not None else "") + "; "
          f"content check: refuse below {policy['min_chest_score']}, review below {policy['review_chest_score']}")
