"""The throughput benchmark runs end to end on a tiny folder (its numbers are not asserted:
benchmarks print measurements, the suite only checks that they can be taken)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_runs_on_a_tiny_folder(tmp_path, data_dir):
    pytest.importorskip("torch")  # (a) runs the original path in PyTorch: the [train] extra
    out = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--n", "6",
                             "--repeats", "1", "--workdir", str(tmp_path / "bench"), "--json", str(out),
                             "--checkpoint", str(tmp_path / "absent.pt")],
                            capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "HEARTBATCH_DATA": str(data_dir)})  # the fixture set
    assert result.returncode == 0, result.stderr[-3000:]
    assert "b / ideal (JPEG Baseline)" in result.stdout and "b / cold-start bound" in result.stdout

    r = json.loads(out.read_text())
    assert r["n"] == 6 and len(list((tmp_path / "bench" / "jpeg-6").glob("*.dcm"))) == 6
    for key in ("a_original_img_s", "b_heartbatch_run_img_s", "b_heartbatch_run_j2k12_img_s",
                "decode_1proc_img_s", "decode_pool_img_s", "inference_1thread_best_img_s",
                "ideal_pipelined_img_s", "all_cores_img_s", "startup_floor_s", "peak_rss_mb_b"):
        assert r[key] > 0, key
    assert r["b_over_a"] == pytest.approx(r["b_heartbatch_run_img_s"] / r["a_original_img_s"])
    cores = r["machine"]["cores"]
    assert r["machine"]["cpu"]["model"] and isinstance(r["machine"]["cpu"]["features"], list)
    assert r["ideal_pipelined_img_s"] == pytest.approx(
        cores / (1 / r["decode_1proc_img_s"] + 1 / r["inference_1thread_best_img_s"]))
    assert r["cold_start_bound_img_s"] == pytest.approx(6 / (r["startup_floor_s"] + 6 / r["all_cores_img_s"]))
    assert len(r["inference_grid"]) == 4 * len({1, cores})


def test_dicom_out_benchmark_runs_on_a_tiny_folder(tmp_path, data_dir):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dicom_out.py"), "--n", "4", "--repeats", "1",
                             "--workers", "0"],
                            capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "HEARTBATCH_DATA": str(data_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    machine, *lines = result.stdout.splitlines()
    assert machine.startswith("# machine: ") and "onnxruntime" in machine  # every figure names its CPU
    assert [line.split(":")[0].strip() for line in lines] == ["plain", "dicom-out", "capture"]
    assert all("img/s; throughput vs plain" in line for line in lines)
