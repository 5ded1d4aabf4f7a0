"""`trust-onnx`: the command that adds the trust outputs to a model, and their calibration.

The graph surgery itself is :mod:`exporter.surgery`; here the content head is fitted and
checked, the uncertainty factor and the review cut chosen, and the model written.
"""

from __future__ import annotations

import numpy as np
import onnx

from .net import LAYER4_DIMS
from .surgery import (FEATURES, SurgeryError, add_content_head, add_uncertainty, input_size, strip_features,
                      with_features)

#: the runner's default refusal cut on ``chest_score``. Refusing a real chest film drops a sick patient
#: from every statistic; measuring a film that is not one puts a flagged row in the review queue. Taking
#: the first as three times as costly, the Bayes cut on P(chest) is 1 / (1 + 3).
MIN_CHEST_SCORE = 0.25

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


def measured_outputs(session, images: list[np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """:func:`run_outputs` with ``boxes`` as the runtime measures them: from the ``masks`` output when
    the model has one (:func:`heartbatch.masks.measured_boxes`; the regressed boxes also under
    ``"regressed"``), so that what is calibrated is the error of what a row reports."""
    from heartbatch import contract as C
    from heartbatch.masks import measured_boxes

    has_masks = C.MASKS in {o.name for o in session.get_outputs()}
    out = run_outputs(session, images, list(dict.fromkeys([C.OUTPUT_NAME, *names]))
                      + ([C.MASKS] if has_masks else []))
    if has_masks:
        out["regressed"] = out[C.OUTPUT_NAME]
        out[C.OUTPUT_NAME], _ = measured_boxes(out["regressed"], out.pop(C.MASKS))
    return out


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
    from heartbatch.metrics import ctrs
    from heartbatch.pixels import preprocess

    from . import content, probe
    from .onnxfile import save
    from .props import metadata, set_metadata
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
                        "films of each view (AP, PA; 0.10)")
    p.add_argument("--min-chest-score", type=float, default=MIN_CHEST_SCORE,
                   help=f"the runner's default refusal cut ({MIN_CHEST_SCORE}): refusing a real chest film is taken "
                        f"as 3x as costly as measuring and flagging a film that is not one")
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
    fit = {name: measured_outputs(session, s.images, names) for name, s in (("train", train), ("others", others),
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
    clean_rows = measured_outputs(session, [i for i, c in zip(val.images, clean) if c], ["uncertainty"])
    pred, spread = clean_rows[C.OUTPUT_NAME], clean_rows["uncertainty"]
    err = np.abs(ctrs(pred) - ctrs(truth))
    raw = ctr_sd(pred, spread)
    factor = float(np.median(err / raw) / 0.6745)
    review_uncertainty = choose_review_cut(session, films, split["val"], by_key, size, factor, args.seed + 1)
    ward_cut = None
    if ward_fit:  # real ward films spread wider where the boxes are fine (leads, haze): flag few of them
        ward_rows = measured_outputs(session, [ward[f.key] for f in ward_fit], ["uncertainty"])
        ward_sd = ctr_sd(ward_rows[C.OUTPUT_NAME], ward_rows["uncertainty"]) * factor
        ward_cut = ward_review_cut(ward_sd, [f.view for f in ward_fit], args.max_ward_flagged)
        review_uncertainty = max(review_uncertainty, ward_cut)

    as_they_are = np.array([k == "chest" for k in train.kinds]) & ~np.array([g.startswith("ward/") for g in train.groups])
    border_cut = border_review_cut([i for i, keep in zip(train.images, as_they_are) if keep],
                                   fit["train"][C.OUTPUT_NAME][as_they_are])
    policy = dict(classes=list(content.CLASSES), min_chest_score=args.min_chest_score, review_chest_score=0.8,
                  min_border_contrast=round(border_cut, 3),
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
    out = add_content_head(add_uncertainty(strip_features(with_features(base)), factor), head)
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


def border_review_cut(images: list[np.ndarray], boxes: np.ndarray, max_flagged: float = 0.01) -> float:
    """The heart-border contrast below which a row is flagged as hiding the heart's edge: 0 (the heart no
    brighter than the lung beside it), or lower where more than ``max_flagged`` of the training films as
    they are fall below 0 (low-contrast digitised films whose borders are fine)."""
    from heartbatch.confidence import heart_border_contrast

    values = np.array([heart_border_contrast(i, b) for i, b in zip(images, boxes)], dtype=float)
    values = values[np.isfinite(values)]
    return float(min(0.0, np.quantile(values, max_flagged))) if len(values) else 0.0


def ward_review_cut(sd: np.ndarray, views: list[str], max_flagged: float, min_films: int = 5) -> float:
    """The lowest CTR-SD cut that flags at most ``max_flagged`` of the ward films of each view with at
    least ``min_films`` films (all films together otherwise): AP films spread wider than PA films,
    and an archive's share of AP films is not the fitting patients' share."""
    views = np.array([v.upper() or "?" for v in views])
    cuts = [np.quantile(sd[views == v], 1 - max_flagged) for v in sorted(set(views))
            if (views == v).sum() >= min_films]
    return float(max(cuts) if cuts else np.quantile(sd, 1 - max_flagged))


def choose_review_cut(session, films, keys, by_key, size, factor, seed, max_flagged=0.05) -> float:
    """The lowest CTR-SD cut that flags at most ``max_flagged`` of the rows whose CTR is within
    0.05, on the validation films with every ward corruption (seeded apart from the model card's
    sets): the spread grows on ward films even where the boxes stay right (ECG leads), so a cut
    set on clean films alone would flag most ward films."""
    from heartbatch import contract as C

    from .datasets import build_dataset
    from heartbatch.metrics import ctrs

    from .robustness import SETS, corrupted

    data = build_dataset([by_key[k] for k in keys], size)
    images, masks = data.images[:, 0].numpy(), data.masks.numpy()
    errors, sds = [], []
    for kind in SETS:
        x, truth = corrupted(images, masks, data.keys, kind, seed)
        out = measured_outputs(session, list(x), ["uncertainty"])
        errors.append(np.abs(ctrs(out[C.OUTPUT_NAME]) - ctrs(truth)))
        sds.append(ctr_sd(out[C.OUTPUT_NAME], out["uncertainty"]) * factor)
    err, sd = np.concatenate(errors), np.concatenate(sds)
    good = sd[err <= 0.05]
    return float(np.quantile(good, 1 - max_flagged))


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
    scored by a classifier fitted without it: how the check does on kinds it never saw. Flagged
    counts every review rule the runtime applies to such a row, the CTR's SD and the box rules too."""
    from . import content

    groups = np.array(others.groups)
    by_boxes = _flagged_by_boxes(fit["others"], others.images, policy)
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
                                                          | held.far(family) | by_boxes[groups == group]))}
    return out


def _flagged_by_boxes(rows: dict, images: list[np.ndarray], policy: dict) -> np.ndarray:
    """Rows the runtime flags whatever the content check says: its own review rules
    (:func:`heartbatch.confidence.review_reasons`) on the boxes, the CTR's SD and the heart border."""
    from heartbatch import contract as C
    from heartbatch.confidence import Policy, Prediction, heart_border_contrast, review_reasons

    rules = Policy(review_uncertainty=policy["review_uncertainty"], min_border_contrast=policy["min_border_contrast"])
    boxes = rows[C.OUTPUT_NAME]
    sd = ctr_sd(boxes, rows["uncertainty"]) * policy["uncertainty_factor"]
    return np.array([bool(review_reasons(Prediction(b, border_contrast=heart_border_contrast(i, b)), rules, float(s)))
                     for i, b, s in zip(images, boxes, sd)])


def _print(evaluation: dict, policy: dict) -> None:
    print(f"{'validation-film samples':24}{'n':>6}{'refused':>10}{'refused or flagged':>20}{'mirrored':>10}"
          f"{'unlike':>8}")
    for kind, row in evaluation["by_kind"].items():
        print(f"{kind:24}{row['n']:6d}{row['refused']:10.3f}{row['refused_or_flagged']:20.3f}"
              f"{row['mirrored_flag']:10.3f}{row['unlike_flag']:8.3f}")
    for group, row in evaluation.get("left_out_packages", {}).items():
        print(f"left out {group:15}{row['n']:6d}{row['refused']:10.3f}{row['refused_or_flagged']:20.3f}")
    u = evaluation["uncertainty"]
    print(f"heart border hidden below a contrast of {policy['min_border_contrast']:.3f}; "
          f"uncertainty factor {u['factor']:.4f}; CTR error within one SD on clean validation "
          f"{u['share_within_1sd']:.2f}; review above CTR SD {u['review_cut']:.4f}"
          + (f" (the ward films' cut {u['ward_cut']:.4f})" if u.get("ward_cut") is not None else "") + "; "
          f"content check: refuse below {policy['min_chest_score']}, review below {policy['review_chest_score']}")
