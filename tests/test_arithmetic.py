"""The same film gives the same result on every CPU (heartbatch.arithmetic, exporter.saturation).

Int8 kernels of x86 CPUs without VNNI add pairs of u8 x s8 products in 16 bits with
saturation. These tests hold the shipped model to "cannot saturate" statically, check its
probe and its fused-vs-exact parity on real films on this CPU, run the AVX2 kernels under
qemu-user whatever CPU the tests run on, and check that a model that does saturate is
caught (the runtime falls back and says so; the exporter refuses to write it).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_models as M
from dicom_factory import shared_png, write_dicom
from exporter import onnxfile, probe as probe_writer, props, quantize
from exporter.saturation import SAFE_WEIGHT, SaturationError, saturation_risks
from heartbatch import arithmetic
from heartbatch.arithmetic import EXACT, FUSED, Probe
from heartbatch.cli import main as cli_main
from heartbatch.confidence import Policy
from heartbatch.dicom import DicomHeader
from heartbatch.errors import ContractError
from heartbatch.geometry import ctr
from heartbatch.images import load_image
from heartbatch.model import BoxModel, ModelRef, default_model_path, worker_model
from heartbatch.pixels import preprocess
from heartbatch.records import measure

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def films(chest_pngs) -> np.ndarray:
    return np.stack([preprocess(load_image(p), 224) for p in chest_pngs])


@pytest.fixture(scope="module")
def saturating(tmp_path_factory) -> Path:
    return M.saturating_copy(default_model_path(), tmp_path_factory.mktemp("sat") / "saturating.onnx")


def _records(model: BoxModel, films: np.ndarray):
    header, policy = DicomHeader(rows=224, columns=224), Policy.for_model(model.info.metadata)
    return [measure("", header, p, model.info.model_id, policy) for p in model.infer(films)]


# --- the shipped model ---------------------------------------------------------------

def test_shipped_model_cannot_saturate_any_cpu():
    """Every int8 weight of the shipped model within +-64, so 2 x 255 x |w| fits 16 bits."""
    model = onnx.load(str(default_model_path()))
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 20  # it is quantized: the check has weights to look at
    assert saturation_risks(model) == []
    assert max(int(np.abs(onnx.numpy_helper.to_array(i).astype(int)).max()) for i in int8) <= SAFE_WEIGHT


def test_shipped_model_probe_passes_with_the_fast_kernels():
    model = BoxModel(threads=1)
    check = model.arithmetic
    assert check.has_probe and check.mode == FUSED and not check.fallback
    assert check.comparisons[0].passed and check.comparisons[0].difference < check.comparisons[0].tolerance
    probe = Probe.from_json(model.info.metadata[arithmetic.META_PROBE])
    assert probe.images.shape[1:] == (224, 224) and len(probe.images) >= 3
    assert set(probe.outputs) >= {"boxes", "chest_score", "uncertainty"}


def test_fixture_films_fast_kernels_equal_exact_arithmetic(films):
    """On real films the fast kernels of this CPU give the exact arithmetic's rows: same status,
    CTR within 0.003 (today's full-range int8 model moved it by up to 0.1 on AVX2 CPUs)."""
    fast, exact = BoxModel(threads=1), BoxModel(threads=1, start=EXACT)
    assert exact.arithmetic.mode == EXACT
    a, b = _records(fast, films), _records(exact, films)
    assert [r.status for r in a] == [r.status for r in b] and all(r.ok for r in a)
    assert max(abs(x.ctr - y.ctr) for x, y in zip(a, b)) <= 0.003
    assert max(abs(x.chest_score - y.chest_score) for x, y in zip(a, b)) <= 0.03


_EMULATED = """
import json, sys
import numpy as np
from heartbatch import arithmetic
from heartbatch.model import BoxModel
films = np.load(sys.argv[1])
shipped = BoxModel(sys.argv[2], threads=1)
saturating = BoxModel(sys.argv[3], threads=1)
boxes = shipped.predict(films)
print(json.dumps({"cpu": arithmetic.cpu().as_dict(), "shipped": shipped.arithmetic.as_dict(),
                  "saturating": saturating.arithmetic.as_dict(), "boxes": boxes.tolist()}))
"""


def _qemu() -> str:
    qemu = shutil.which("qemu-x86_64")
    if platform.machine() not in ("x86_64", "AMD64") or qemu is None:
        pytest.skip("needs an x86_64 host with qemu-user (Debian: apt-get install qemu-user; .ci/run installs it)")
    return qemu


@pytest.mark.slow
def test_avx2_kernels_under_emulation(films, saturating, tmp_path):
    """Under qemu-user as a Haswell (AVX2, no AVX-512, no VNNI), whatever the host: the shipped
    model's fast kernels match the host's exact arithmetic, and a full-range int8 model is caught
    by its probe and measured in another arithmetic."""
    qemu = _qemu()
    np.save(tmp_path / "films.npy", films[:2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, "-c", _EMULATED, str(tmp_path / "films.npy"),
                           str(default_model_path()), str(saturating)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "AVX2" in seen["cpu"]["features"] and not seen["cpu"]["int8_exact"]
    assert seen["shipped"]["mode"] == FUSED
    exact = BoxModel(threads=1, start=EXACT).predict(films[:2])
    emulated = np.array(seen["boxes"])
    assert np.abs(emulated - exact).max() <= 0.004
    assert max(abs(ctr(a[:4], a[4:]) - ctr(b[:4], b[4:])) for a, b in zip(emulated, exact)) <= 0.003
    # the saturating model: its probe fails with the AVX2 kernels, so another arithmetic measures
    first = seen["saturating"]["checks"][0]
    assert first["mode"] == FUSED and not first["passed"]
    assert seen["saturating"]["mode"] != FUSED and seen["saturating"]["checks"][-1]["passed"]


# --- a model that saturates on CPUs without VNNI ------------------------------------

def test_saturating_model_is_caught_on_this_cpu(saturating, films):
    """Where the fast kernels are inexact (no VNNI) the probe fails and a slower arithmetic that
    gives the exact rows takes over; where they are exact the fast kernels are kept."""
    model = BoxModel(saturating, threads=1)
    exact = BoxModel(saturating, threads=1, start=EXACT)
    if arithmetic.cpu().int8_exact:
        assert model.arithmetic.mode == FUSED
    else:
        assert model.arithmetic.fallback and not model.arithmetic.comparisons[0].passed
        assert model.arithmetic.comparisons[-1].passed
    a, b = _records(model, films), _records(exact, films)
    assert [r.status for r in a] == [r.status for r in b]
    assert max(abs(x.ctr - y.ctr) for x, y in zip(a, b) if x.ok) <= 0.003


def test_run_with_a_saturating_model_says_so_and_records_it(saturating, tmp_path, data_dir, capsys):
    folder = tmp_path / "studies"
    folder.mkdir()
    for i in range(3):
        write_dicom(folder / f"f{i}.dcm", shared_png(data_dir, i), bits_stored=8)
    out = tmp_path / "report.csv"
    assert cli_main(["run", str(folder), "--out", str(out), "--model", str(saturating), "--workers", "0"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    summary = json.loads((tmp_path / "report.summary.json").read_text())
    recorded = summary["arithmetic"]
    assert recorded["cpu"] == arithmetic.cpu().describe() and recorded["onnxruntime"]
    markdown = (tmp_path / "report.summary.md").read_text()
    assert "Arithmetic (last run)" in markdown
    if arithmetic.cpu().int8_exact:
        assert recorded["mode"] == FUSED and "warning" not in err
    else:
        assert recorded["mode"] != FUSED and recorded["checks"][0]["passed"] is False
        assert "do not give model" in err and "measuring with the" in err
        assert "disagreed with the model's recorded exact outputs" in markdown


def test_worker_processes_start_in_the_clients_arithmetic(saturating):
    client = BoxModel(saturating, threads=1)
    ref = ModelRef.of(client)
    assert ref.arithmetic_mode == client.arithmetic.mode
    assert worker_model(ref, threads=1).arithmetic.mode == client.arithmetic.mode


def test_a_probe_no_arithmetic_reproduces_refuses_the_model(tmp_path, capsys):
    """Recorded outputs that nothing here gives: no row is written from it (exit 3)."""
    model = onnx.load(str(default_model_path()))
    meta = props.metadata(model)
    probe = Probe.from_json(meta[arithmetic.META_PROBE])
    probe.outputs["boxes"] = probe.outputs["boxes"] + 0.05
    meta[arithmetic.META_PROBE] = probe.to_json()
    props.set_metadata(model, meta)
    bad = tmp_path / "bad-probe.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ContractError, match="reproduces the outputs recorded"):
        BoxModel(bad, threads=1)
    assert cli_main(["info", "--model", str(bad)]) == 3
    assert "reproduces the outputs recorded" in " ".join(capsys.readouterr().err.split())

    meta[arithmetic.META_PROBE] = "{not json"
    props.set_metadata(model, meta)
    onnx.save(model, str(bad))
    with pytest.raises(ContractError, match="probe cannot be read"):
        BoxModel(bad, threads=1)


def test_info_names_cpu_runtime_model_and_probe(capsys):
    assert cli_main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["cpu"] == arithmetic.cpu().as_dict() and facts["onnxruntime"] == arithmetic.onnxruntime_version()
    assert facts["model"]["model_id"] == BoxModel(threads=1).info.model_id
    assert "7-bit" in facts["model"]["quantization"]
    assert facts["arithmetic"]["probe"] is True and facts["arithmetic"]["mode"] == FUSED
    assert cli_main(["info"]) == 0
    text = capsys.readouterr().out
    for label in ("CPU", "int8 kernels", "arithmetic probe", "measures with", arithmetic.cpu().model):
        assert label in text


def test_cpu_features_are_read_from_proc_cpuinfo():
    info = arithmetic.cpu()
    assert info.model and info.machine == platform.machine()
    if Path("/proc/cpuinfo").is_file():
        flags = Path("/proc/cpuinfo").read_text().split()
        assert ("AVX2" in info.features) == ("avx2" in flags)
        assert info.int8_exact == (not platform.machine().startswith("x86")
                                   or any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")))


# --- the exporter never writes a model that can saturate ------------------------------

def test_exporter_refuses_to_write_a_saturating_model(saturating, tmp_path):
    model = onnx.load(str(saturating))
    assert len(saturation_risks(model)) >= 20
    out = tmp_path / "never.onnx"
    with pytest.raises(SaturationError, match="7-bit weights"):
        onnxfile.save(model, out)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_requantize_an_int8_model_to_7_bit_weights(saturating, data_dir, tmp_path, capsys):
    """`quantize-onnx --requantize`: the full-range model becomes one that cannot saturate, with a
    probe this CPU's fast kernels pass, and the same boxes as before in exact arithmetic."""
    keys = sorted(f"wingspan/{p.name}" for p in (data_dir / "cxr-ctr" / "wingspan" / "png").glob("*.png"))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": keys[:-3], "val": keys[-3:]}))
    out = tmp_path / "7bit.onnx"
    assert quantize.main([str(saturating), "--requantize", "--data", str(data_dir / "cxr-ctr"),
                          "--split", str(split), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "largest box difference" in printed and "heart error change" in printed
    written = onnx.load(str(out))
    assert saturation_risks(written) == []
    meta = props.metadata(written)
    assert "requantized from 8 to 7 bits" in meta[quantize.META_QUANTIZATION]
    probe = Probe.from_json(meta[arithmetic.META_PROBE])
    assert len(probe.images) == probe_writer.FILMS + 1  # the films and a negative
    model = BoxModel(out, threads=1)
    assert model.arithmetic.mode == FUSED
    films = probe.inputs[:, 0]
    before = BoxModel(saturating, threads=1, start=EXACT).predict(films)
    assert np.abs(model.predict(films) - before).max() < 0.01


def test_probe_films_come_from_a_redistributable_source():
    assert probe_writer.choose(["jsrt/JPCLN001.png", "wingspan/b.png", "wingspan/a.png"], 1) == ["wingspan/a.png"]
    with pytest.raises(ValueError, match="redistributable"):
        probe_writer.choose(["jsrt/JPCLN001.png"])
