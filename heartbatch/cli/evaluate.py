"""`heartbatch evaluate`: a model's accuracy on labeled images (heart and thorax IoU, CTR error
and agreement, against the masks and the expert CTR where given).

    heartbatch evaluate --data ../shared/data/cxr-ctr --split runs/default/split.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..argtypes import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="measure a model's accuracy on labeled images",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path,
                   help="cxr-ctr style folder (png/ + mask/), an image folder with --labels, or a box CSV")
    p.add_argument("--labels", type=Path, help="box CSV or the original project's label CSV for --data")
    p.add_argument("--split", type=Path, help="split.json from training: evaluate its 'val' images only")
    p.add_argument("--model", type=Path, help="ONNX model (default: the shipped model)")
    p.add_argument("--ctr-threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per inference batch (16)")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)


def _error(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_evaluate(args) -> int:
    """Errors go to stderr: exit 2 for bad labels or a bad --split file, 3 for a model
    refused, 4 when no labeled image is left to evaluate."""
    from ..errors import ContractError, ExitCode, LabelError, SplitError
    from ..evaluate import evaluate, format_metrics
    from ..labels import load_labels, read_split
    from ..model import BoxModel

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
