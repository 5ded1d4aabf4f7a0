"""`heartbatch run --scheduler`: the same run on a Dask cluster (heartbatch.distributed).

Real DICOMs (written from the shared chest X-rays in several encodings, plus
files to skip and a truncated one), the intensity model so every image gets
its own values, and real Dask LocalClusters of worker processes.  Every
cluster is closed in a ``finally``/context manager and every wait is bounded.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

from dicom_factory import monochrome1_twin, shared_png, shared_png_paths, to_bits, truncate, write_dicom
from heartbatch import cli
from heartbatch.distributed import (DistributedError, ModelRef, WorkerModelError, parse_scheduler, process_chunk,
                                    worker_model)
from heartbatch.model import BoxModel
from heartbatch.pipeline import RunOptions, run as local_run
from heartbatch.report.schema import COLUMNS
from heartbatch.scheduler import CRASH_REASON
from helpers import wait_until

try:
    import distributed
except ImportError:  # fail loudly: a suite that silently skips would pass on a machine that tests nothing
    pytest.fail("dask distributed is not installed: pip install '.[dev]' (or '.[dask]')", pytrace=False)

SIZE = 256
TEXT_COLUMNS = {"path", "status", "reason", "sop_instance_uid", "study_instance_uid", "series_instance_uid",
                "study_date", "modality", "view_position", "enlarged", "model_id", "rows", "columns",
                "review", "review_reason"}


# --- helpers -----------------------------------------------------------------------

def small(data_dir: Path, index: int, size: int = SIZE) -> np.ndarray:
    """A real chest X-ray, downsized so that the files stay cheap to decode."""
    from PIL import Image

    return np.asarray(Image.fromarray(shared_png(data_dir, index)).resize((size, size), Image.BILINEAR))


def build_folder(root: Path, data_dir: Path, n_ok: int = 14, size: int = SIZE) -> dict[str, str]:
    """``n_ok`` frontal chests in several encodings, three files to skip, one truncated."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    encodings = ["plain", "jpeg", "rle", "j2k", "12bit", "mono1"]
    for i in range(n_ok):
        img = small(data_dir, i % len(shared_png_paths(data_dir)), size)
        name = f"cxr_{i:03d}_{encodings[i % len(encodings)]}.dcm"
        kind = encodings[i % len(encodings)]
        kw = dict(patient_id=f"HB-{i:04d}", accession=f"ACC{i:04d}")
        if kind == "jpeg":
            write_dicom(root / name, img, transfer_syntax=JPEGBaseline8Bit, **kw)
        elif kind == "rle":
            write_dicom(root / name, img, transfer_syntax=RLELossless, **kw)
        elif kind == "j2k":
            write_dicom(root / name, to_bits(img, 12), bits_stored=12, transfer_syntax=JPEG2000Lossless, **kw)
        elif kind == "12bit":
            write_dicom(root / name, to_bits(img, 12), bits_stored=12, view_position="AP", **kw)
        elif kind == "mono1":
            write_dicom(root / name, monochrome1_twin(to_bits(img, 12), 12), bits_stored=12,
                        photometric="MONOCHROME1", **kw)
        else:
            write_dicom(root / name, img, **kw)
        expected[name] = "ok"
    write_dicom(root / "lateral.dcm", small(data_dir, 0, size), view_position="LL")
    shutil.copyfile(get_testdata_file("CT_small.dcm"), root / "ct_small.dcm")
    (root / "README").write_text("not a DICOM file\n")
    truncate(write_dicom(root / "truncated.dcm", to_bits(small(data_dir, 1, size), 16)), 0.6)
    expected.update({"lateral.dcm": "skipped", "ct_small.dcm": "skipped", "README": "skipped",
                     "truncated.dcm": "error"})
    return expected


def read_rows(report: Path) -> list[dict[str, str]]:
    with open(report, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    """Rows identical, in any order; numbers within 1e-6."""
    a = sorted(a, key=lambda r: r["path"])
    b = sorted(b, key=lambda r: r["path"])
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for ra, rb in zip(a, b):
        for column in COLUMNS:
            va, vb = ra[column], rb[column]
            if column in TEXT_COLUMNS or va == "" or vb == "":
                assert va == vb, (ra["path"], column, va, vb)
            else:
                assert abs(float(va) - float(vb)) <= 1e-6, (ra["path"], column, va, vb)


def cli_json(capsys, *args) -> tuple[int, dict]:
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr().out.strip().splitlines()
    return code, (json.loads(out[-1]) if out else {})


# --- a local:2 run is a local run ---------------------------------------------------

@pytest.mark.slow
def test_local_cluster_rows_match_local_run_and_resume(tmp_path, data_dir, intensity_model, capsys,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)   # relative paths: the report shows them as given, workers get absolute ones
    expected = build_folder(tmp_path / "studies", data_dir)

    code, plain = cli_json(capsys, "run", "studies", "--out", "plain/report.csv", "--model", intensity_model,
                           "--quiet", "--dicom-out", "plain/results")
    assert code == 0, plain
    code, dask = cli_json(capsys, "run", "studies", "--out", "dask/report.csv", "--model", intensity_model,
                          "--scheduler", "local:2", "--batch-size", "4", "--quiet",
                          "--dicom-out", "dask/results")  # timings: benchmarks/
    assert code == 0, dask
    # DICOM results written by the Dask workers (given a relative folder): the same files as a local run's
    dask_results = sorted(p.name for p in (tmp_path / "dask/results").iterdir())
    assert dask_results == sorted(p.name for p in (tmp_path / "plain/results").iterdir())
    assert len(dask_results) == dask["dicom_results"] == 2 * dask["ok"] and dask["dicom_failed"] == 0
    assert dask["processed"] == plain["processed"] == len(expected)
    assert {k: dask[k] for k in ("ok", "skipped", "error")} == {k: plain[k] for k in ("ok", "skipped", "error")}

    plain_rows, dask_rows = read_rows(tmp_path / "plain/report.csv"), read_rows(tmp_path / "dask/report.csv")
    assert_same_rows(plain_rows, dask_rows)
    assert {r["path"]: r["status"] for r in dask_rows} == {f"studies/{k}": v for k, v in expected.items()}
    assert len({r["ctr"] for r in dask_rows if r["status"] == "ok"}) > len(expected) // 2  # values per image
    plain_summary = json.loads((tmp_path / "plain/report.summary.json").read_text())
    dask_summary = json.loads((tmp_path / "dask/report.summary.json").read_text())
    assert dask_summary["files"] == plain_summary["files"]
    assert dask_summary["ctr"] == plain_summary["ctr"]

    # resume: nothing new, nothing processed, the report byte-identical
    before = (tmp_path / "dask/report.csv").read_bytes()
    code, again = cli_json(capsys, "run", "studies", "--out", "dask/report.csv", "--model", intensity_model,
                           "--scheduler", "local:2", "--quiet", "--dicom-out", "dask/results")
    assert code == 0
    assert again["processed"] == 0 and again["unchanged"] == len(expected)
    assert (tmp_path / "dask/report.csv").read_bytes() == before


# --- worker failure ------------------------------------------------------------------

@pytest.fixture
def cluster_client():
    """A LocalCluster of two worker processes (one thread each) and its client; closed afterwards."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           host="127.0.0.1")
    try:
        client = Client(cluster, set_as_default=False)
        try:
            client.wait_for_workers(2, timeout=60)
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_killed_worker_each_file_exactly_once(tmp_path, data_dir, intensity_model, cluster_client):
    client = cluster_client
    expected = build_folder(tmp_path / "studies", data_dir, n_ok=40)
    out = tmp_path / "report.csv"
    model = BoxModel(intensity_model, threads=1)
    killed: dict = {}

    def kill_a_busy_worker(records):
        """On the first chunk back: SIGKILL a worker process that has tasks in flight."""
        if killed:
            return
        busy = wait_until(lambda: {w: keys for w, keys in client.processing().items() if keys}, timeout=20,
                          interval=0.02, message="a worker with a task in flight to kill")
        address, keys = next(iter(busy.items()))
        pid = client.run(os.getpid, workers=[address])[address]
        killed.update(address=address, pid=pid, keys=list(keys))
        os.kill(pid, signal.SIGKILL)

    result = local_run_dask(tmp_path / "studies", out, model, client, on_records=kill_a_busy_worker)
    assert killed, "the callback never ran"
    assert killed["keys"], killed
    assert not _pid_alive(killed["pid"])
    rows = read_rows(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == len(expected)         # every file exactly once
    assert {Path(p).name: r["status"] for p, r in zip(paths, rows)} == expected
    assert result.processed == len(expected)
    assert not any(r["reason"] == CRASH_REASON for r in rows)      # a lost task is retried, not an error

    # same values as a plain local run (decoding inline here, to keep the CPU use low)
    reference = tmp_path / "plain.csv"
    local_run([tmp_path / "studies"], reference, model, RunOptions(workers=0, threads=1))
    assert_same_rows(read_rows(reference), rows)

    # a changed file is measured again through the cluster, its row replaced, never duplicated
    changed = tmp_path / "studies" / "cxr_000_plain.dcm"
    write_dicom(changed, small(data_dir, 12))
    again = local_run_dask(tmp_path / "studies", out, model, client)
    assert again.processed == 1 and again.unchanged == len(expected) - 1
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(paths)

    # a worker that does not see the client's model file: a clear error, exit code 3
    import dataclasses

    impostor = BoxModel(intensity_model, threads=1)
    impostor.info = dataclasses.replace(impostor.info, model_id="000000000000")
    with pytest.raises(DistributedError, match="not the client's model") as err:
        local_run_dask(tmp_path / "studies", tmp_path / "other.csv", impostor, client)
    assert err.value.exit_code == 3


class CrashOnMarker(distributed.WorkerPlugin):
    """On every worker (restarted ones too): reading a file named '*crash*' SIGKILLs the worker
    process, as a segfaulting C decoder or the OOM killer would."""

    name = "heartbatch-test-crash-on-marker"

    def setup(self, worker):
        import heartbatch.workers as workers

        real = workers.__dict__.setdefault("_real_prepare", workers.prepare)

        def prepare(path, size, timeout=None):
            if "crash" in Path(path).name:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, size, timeout)

        workers.prepare = prepare


@pytest.mark.slow
def test_file_that_kills_workers_gets_an_error_row(tmp_path, data_dir, intensity_model):
    """A chunk that keeps killing workers is retried file by file; the culprit gets an error row."""
    import dask
    from distributed import Client, LocalCluster

    folder = tmp_path / "studies"
    build_folder(folder, data_dir, n_ok=6)
    write_dicom(folder / "zz_crash.dcm", small(data_dir, 7))
    files = sorted(p.name for p in folder.iterdir())
    model = BoxModel(intensity_model, threads=1)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # fail a task on its first killed worker
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                               host="127.0.0.1")
    try:
        with Client(cluster, set_as_default=False) as client:
            client.register_plugin(CrashOnMarker())
            result = local_run_dask(folder, tmp_path / "report.csv", model, client)
    finally:
        cluster.close()
    rows = {Path(r["path"]).name: r for r in read_rows(tmp_path / "report.csv")}
    assert sorted(rows) == files and result.processed == len(files)
    assert rows["zz_crash.dcm"]["status"] == "error"
    assert rows["zz_crash.dcm"]["reason"] == CRASH_REASON
    assert all(r["reason"] != CRASH_REASON for name, r in rows.items() if name != "zz_crash.dcm")
    assert sum(r["status"] == "ok" for r in rows.values()) == 6


def local_run_dask(folder, out, model, client, **kwargs):
    from heartbatch.distributed import run

    return run([folder], out, model, RunOptions(threads=1), scheduler=client, chunk_size=4, **kwargs)


# --- no cluster needed ---------------------------------------------------------------

def test_parse_scheduler(tmp_path):
    assert parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("tcp://10.0.0.5:8786") == ("address", "tcp://10.0.0.5:8786")
    assert parse_scheduler("10.0.0.5:8786") == ("address", "10.0.0.5:8786")
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text("{}")
    assert parse_scheduler(str(scheduler_file)) == ("file", str(scheduler_file))
    for bad in ("local:0", "local:x", "local", "nonsense"):
        with pytest.raises(DistributedError):
            parse_scheduler(bad)


@pytest.mark.parametrize("address", ["local:0", "nonsense"])
def test_cli_bad_scheduler_is_a_usage_error(tmp_path, address, capsys):
    (tmp_path / "studies").mkdir()
    code = cli.main(["run", str(tmp_path / "studies"), "--out", str(tmp_path / "r.csv"), "--scheduler", address])
    assert code == 2
    assert "--scheduler" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_cli_without_dask_says_what_to_install(tmp_path, capsys, monkeypatch):
    (tmp_path / "studies").mkdir()
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    code = cli.main(["run", str(tmp_path / "studies"), "--out", str(tmp_path / "r.csv"), "--scheduler", "local:2"])
    assert code == 2
    assert "install heartbatch[dask]" in capsys.readouterr().err


def test_cli_unreachable_scheduler(tmp_path, data_dir, intensity_model, capsys):
    import dask

    build_folder(tmp_path / "studies", data_dir, n_ok=1)
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        code = cli.main(["run", str(tmp_path / "studies"), "--out", str(tmp_path / "r.csv"), "--model",
                         str(intensity_model), "--scheduler", "tcp://127.0.0.1:1", "--quiet"])
    assert code == 2
    assert "cannot connect to the Dask scheduler" in capsys.readouterr().err  # how soon: benchmarks/


def test_worker_model_checks_the_file(tmp_path, intensity_model, box8_model):
    real = BoxModel(intensity_model, threads=1)
    assert worker_model(ModelRef.of(real), threads=1).info.model_id == real.info.model_id
    with pytest.raises(WorkerModelError, match="not found"):
        worker_model(ModelRef(str(tmp_path / "missing.onnx"), real.info.model_id))
    other = BoxModel(box8_model, threads=1)
    with pytest.raises(WorkerModelError, match="not the client's model"):
        worker_model(ModelRef(str(box8_model), real.info.model_id))
    assert other.info.model_id != real.info.model_id


def test_process_chunk_is_the_local_pipeline(tmp_path, data_dir, intensity_model, monkeypatch):
    """The task function, called directly: client paths in the records, same values as a local run."""
    monkeypatch.chdir(tmp_path)
    build_folder(tmp_path / "studies", data_dir, n_ok=3)
    names = sorted(p.name for p in (tmp_path / "studies").iterdir())
    items = [(f"studies/{n}", str(tmp_path / "studies" / n)) for n in names]
    model = BoxModel(intensity_model, threads=1)
    records = process_chunk(items, ModelRef.of(model), RunOptions(threads=1, workers=4))
    assert sorted(r.path for r in records) == sorted(p for p, _ in items)
    local_run(["studies"], tmp_path / "plain.csv", model, RunOptions(workers=0, threads=1))
    from heartbatch.report.table import format_rows

    chunk_rows = list(csv.DictReader([",".join(COLUMNS) + "\n"] + format_rows(records).splitlines(True)))
    assert_same_rows(read_rows(tmp_path / "plain.csv"), chunk_rows)
