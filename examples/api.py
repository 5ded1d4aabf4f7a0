"""The Python API: measure one file, then a folder, as a notebook user would.

    python examples/api.py PATH_TO_DICOM_OR_FOLDER [--model model.onnx]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import heartbatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--model", type=Path, help="ONNX model (default: the shipped model)")
    args = parser.parse_args()

    if args.path.is_file():
        record = heartbatch.predict(args.path, model=args.model)
        print(f"{record.path}: {record.status} {record.reason}")
        if record.ok:
            print(f"  view {record.header.view_position or '?'}  {record.header.rows}x{record.header.columns}")
            print(f"  heart box (px)  {tuple(round(v, 1) for v in record.heart)}")
            if record.thorax:
                print(f"  thorax box (px) {tuple(round(v, 1) for v in record.thorax)}")
                print(f"  CTR {record.ctr:.3f}  enlarged: {record.enlarged}")
        return

    import pandas as pd

    rows = [{"path": r.path, "status": r.status, "reason": r.reason, "ctr": r.ctr,
             "view": r.header.view_position if r.header else None}
            for r in heartbatch.predict_folder(args.path, model=args.model)]
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False))
    print("\nmedian CTR of measured images:", frame["ctr"].median())


if __name__ == "__main__":
    main()
