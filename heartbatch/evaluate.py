"""`heartbatch evaluate`: accuracy of a model on labeled images, with onnxruntime only.

    heartbatch evaluate --data ../shared/data/cxr-ctr --split runs/default/split.json

Reports heart and thorax box IoU, heart coordinate error in pixels at 224 x
224 (the original project's measure), CTR error against the mask-derived CTR
and against expert CTR where given, and agreement of the CTR > threshold call.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .argtypes import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="measure a model's accuracy on labeled images",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path,
                   help="cxr-ctr style folder (png/ + mask/), an image folder with --labels, or a box CSV")
    p.add_argument("--labels", type=Path, help="box CSV or the original project's label CSV for --data")
    p.add_argument("--split", type=Path, help="split.json from training: evaluate its 'val' images only")
    p.add_argument("--model", type=Path, help="ONNX model (default: the shipped model)")
    p.add_argument("--ctr-threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per inference batch (16)")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)


def predict_items(model, items, batch_size: int = 16):
    import numpy as np

    from .images import load_image
    from .pixels import preprocess

    size = model.info.input_size
    out = []
    for start in range(0, len(items), batch_size):
        batch = [preprocess(load_image(i.image_path), size) for i in items[start:start + batch_size]]
        out.append(model.predict(np.stack(batch)))
    return np.concatenate(out) if out else np.zeros((0, model.info.outputs))


def evaluate(model, items, threshold: float = 0.5, batch_size: int = 16) -> dict:
    import numpy as np

    from .metrics import box_metrics

    pred = predict_items(model, items, batch_size)
    true = np.stack([i.boxes for i in items])[:, :pred.shape[1]]
    expert = np.array([i.expert_ctr for i in items], dtype=np.float64)
    return box_metrics(pred, true, threshold, expert if np.isfinite(expert).any() else None)


def _f(value, digits=3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_metrics(m: dict, threshold: float) -> str:
    lines = [f"images                      {m['n']}",
             f"heart IoU mean / median     {_f(m['heart_iou_mean'])} / {_f(m['heart_iou_median'])}",
             f"heart MAE (px at 224)       {_f(m['heart_mae_px224'], 2)}"]
    if "thorax_iou_mean" in m:
        a = m["ctr_agreement"]
        lines += [f"thorax IoU mean / median    {_f(m['thorax_iou_mean'])} / {_f(m['thorax_iou_median'])}"
                  f"   (n={m['thorax_n']})",
                  f"thorax MAE (px at 224)      {_f(m['thorax_mae_px224'], 2)}",
                  f"CTR MAE vs masks            {_f(m['ctr_mae'], 4)}",
                  f"CTR > {threshold:.2f} vs masks        accuracy {_f(a['accuracy'])}  sensitivity "
                  f"{_f(a['sensitivity'])}  specificity {_f(a['specificity'])}  (positives {a['positives']})"]
        if "expert_ctr_mae" in m:
            e = m["expert_ctr_agreement"]
            lines += [f"CTR MAE vs expert           {_f(m['expert_ctr_mae'], 4)}   (n={m['expert_n']})",
                      f"CTR > {threshold:.2f} vs expert       accuracy {_f(e['accuracy'])}  sensitivity "
                      f"{_f(e['sensitivity'])}  specificity {_f(e['specificity'])}  (positives {e['positives']})"]
    return "\n".join(lines)


def _error(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_evaluate(args) -> int:
    """Errors go to stderr: exit 2 for bad labels or a bad --split file, 3 for a model
    refused, 4 when no labeled image is left to evaluate."""
    from .errors import ContractError, ExitCode, LabelError, SplitError
    from .labels import load_labels, read_split
    from .model import BoxModel

    try:
        model = BoxModel(args.model)
    except ContractError as exc:
        _error(f"model refused: {exc}")
        return ExitCode.MODEL
    try:
        items = load_labels(args.data, args.labels)
    except (LabelError, OSError, KeyError, ValueError) as exc:
        _error(f"error: cannot read labels: {exc}")
        return ExitCode.USAGE
    if args.split:
        try:
            split = read_split(args.split, [i.key for i in items],
                               hint=f"evaluate with the --data{' and --labels' if args.labels else ''} "
                                    "the split was made from")
        except SplitError as exc:
            _error(f"error: --split {exc}")
            return ExitCode.USAGE
        wanted = set(split["val"])
        items = [i for i in items if i.key in wanted]
    if not items:
        _error("error: no labeled images found" + (f" in the 'val' list of {args.split}" if args.split else ""))
        return ExitCode.NOTHING
    metrics = evaluate(model, items, args.ctr_threshold, args.batch_size)
    print(f"model {model.info.path.name} ({model.info.model_id}) on {args.data}"
          + (f" [val split of {args.split}]" if args.split else ""))
    print(format_metrics(metrics, args.ctr_threshold))
    if args.json:
        args.json.write_text(json.dumps({"model_id": model.info.model_id, "data": str(args.data),
                                         "split": str(args.split) if args.split else None,
                                         "metrics": metrics}, indent=2) + "\n")
    return ExitCode.OK
