"""Are a refactor's reports byte-identical to the code's before it?

    python benchmarks/report_identity.py build /tmp/identity            # once: the input corpus
    python benchmarks/report_identity.py run /tmp/identity OUT_A --tree OLD_CHECKOUT
    python benchmarks/report_identity.py run /tmp/identity OUT_B --tree .
    python benchmarks/report_identity.py compare OUT_A OUT_B

The corpus: every shared PNG wrapped as a JPEG Baseline chest DICOM (446 files) and a copy of
every file pydicom and pydicom-data ship locally (their test files: every modality, transfer
syntax and broken header they have). `run` runs `heartbatch run` (the shipped model, in a
subprocess with the checkout as its working directory, so that checkout's code is imported)
with `--debug --html`, once in-process (`--workers 0`) and once with worker processes, and
`compare` compares every file written, byte for byte, after removing what legitimately differs
between two runs of the same code: the output folder's path, wall-clock times (log line stamps,
the HTML's "rendered" time, the seconds on stdout) and, with worker processes, the order in which
rows finished (those files are compared as sorted lines). The ledger (`report.csv.state/`) holds
times and is state, not a result: it is left out.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
from pathlib import Path

from _common import REPO, build_folder, print_machine, shared_pngs


def package_files() -> list[tuple[Path, Path]]:
    """(file, path relative to its package's data folder) for pydicom's and pydicom-data's local files."""
    import pydicom

    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # pydicom-data

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return [(f, Path(root.parent.name) / f.relative_to(root))
            for root in roots for f in sorted(root.rglob("*")) if f.is_file() and "__pycache__" not in f.parts]


def build(corpus: Path) -> None:
    build_folder(corpus / "shared", len(shared_pngs()), size=1024)
    for source, relative in package_files():
        target = corpus / "packages" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    n_shared = len(list((corpus / "shared").glob("*.dcm")))
    n_packages = sum(1 for f in (corpus / "packages").rglob("*") if f.is_file())
    print(f"{corpus}: {n_shared} shared chest DICOMs, {n_packages} package files")


def run(corpus: Path, out: Path, tree: Path, model: Path | None = None) -> None:
    for name, workers in (("inprocess", "0"), ("workers", "2")):
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        cmd = [sys.executable, "-m", "heartbatch", "run", str(corpus), "--out", str(folder / "report.csv"),
               "--debug", "--html", str(folder / "report.html"), "--quiet", "--workers", workers]
        if model is not None:
            cmd += ["--model", str(model)]
        result = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        (folder / "stdout.txt").write_text(result.stdout)
        (folder / "exit.txt").write_text(f"{result.returncode}\n")
        print(f"{tree} {name}: exit {result.returncode} {result.stdout.strip().splitlines()[-1:]}")


_TIMES = [
    (re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", re.M), b""),  # log line stamps
    (re.compile(rb"rendered \d{4}-\d\d-\d\d \d\d:\d\d UTC"), b"rendered <TIME>"),  # HTML
    (re.compile(rb'"seconds": [0-9.]+'), b'"seconds": <S>'),  # --quiet's JSON line
]


def _normalized(path: Path, root: Path) -> bytes:
    data = path.read_bytes().replace(str(root).encode(), b"<OUT>")
    for pattern, replacement in _TIMES:
        data = pattern.sub(replacement, data)
    if root.name == "workers":  # rows are written in the order workers finish them
        data = b"\n".join(sorted(data.split(b"\n")))
    return data


def _outputs(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")
            if p.is_file() and not any(part.endswith(".state") for part in p.parts)}


def compare(a: Path, b: Path) -> int:
    files_a, files_b = _outputs(a), _outputs(b)
    different = sorted(str(p) for p in files_a & files_b
                       if not filecmp.cmp(a / p, b / p, shallow=False)
                       and _normalized(a / p, a / p.parts[0]) != _normalized(b / p, b / p.parts[0]))
    only = sorted(str(p) for p in files_a ^ files_b)
    print(f"{len(files_a & files_b)} files compared, {len(different)} different, {len(only)} in one only")
    for p in different:
        print(f"  differs: {p}")
    for p in only:
        print(f"  in one only: {p}")
    return 1 if different or only else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("build").add_argument("corpus", type=Path)
    r = sub.add_parser("run")
    r.add_argument("corpus", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--tree", type=Path, default=REPO, help="checkout whose code runs (default: this one)")
    r.add_argument("--model", type=Path, help="ONNX model for both runs (default: each checkout's shipped model)")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args()
    print_machine()
    if args.command == "build":
        build(args.corpus)
    elif args.command == "run":
        run(args.corpus.resolve(), args.out.resolve(), args.tree.resolve(), args.model.resolve() if args.model else None)
    else:
        return compare(args.a, args.b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
