"""Assemble a small demo folder of real DICOMs and run `heartbatch run` on it.

The files come from pip-installable packages, so this works on a fresh
machine with no DICOMs of your own: chest CRs from `pydicom-data` (a real
MONOCHROME1 15-bit PA chest, uncompressed and JPEG 2000), plus files that
heartbatch must skip (an extremity CR, a CT slice, an MR, a text file).

    python examples/demo.py [--out-dir demo]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

DEMO_FILES = {
    # pydicom-data name -> name in the demo folder
    "RG1_UNCI.dcm": "chest/rg1_pa_uncompressed.dcm",
    "RG1_J2KR.dcm": "chest/rg1_pa_jpeg2000_lossless.dcm",
    "RG1_J2KI.dcm": "chest/rg1_pa_jpeg2000_lossy",          # no .dcm suffix on purpose
    "RG3_J2KR.dcm": "other/rg3_extremity_cr.dcm",
    "693_J2KR.dcm": "other/ct_slice.dcm",
    "MR_small.dcm": "other/mr_small.dcm",
}


def build(out_dir: Path) -> Path:
    from pydicom.data import get_testdata_file

    studies = out_dir / "studies"
    if studies.exists():
        shutil.rmtree(studies)
    for source, target in DEMO_FILES.items():
        path = get_testdata_file(source)
        if path is None:
            sys.exit(f"{source} not found: install the demo data with  pip install 'heartbatch[examples]'")
        destination = studies / target
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    (studies / "other" / "notes.txt").write_text("not an image\n")
    return studies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("demo"))
    args = parser.parse_args()
    studies = build(args.out_dir)
    report = args.out_dir / "report.csv"
    command = [sys.executable, "-m", "heartbatch", "run", str(studies), "--out", str(report)]
    print("$ heartbatch run", studies, "--out", report, flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
