"""The network test harness (tests/pacs.py) against the real programs it drives.

One Orthanc serves the module (emptied before each test); dcmtk's echoscu,
storescu, storescp, dcmdump and dsrdump are the other peers.  Without the
tools these tests skip (``apt-get install dcmtk orthanc``), with CI set they fail.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

import pacs
from dicom_factory import write_dicom, write_text_sr

TOOLS = ("Orthanc", "echoscu", "storescu", "storescp", "dcmdump", "dsrdump")


@pytest.fixture(scope="module")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pacs.Orthanc]:
    pacs.skip_or_fail_without(*TOOLS)
    server = pacs.Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        yield server
        assert server.running, f"Orthanc died during the tests\n{server.log_tail()}"
    finally:
        status = server.stop()  # SIGTERM: Orthanc stops cleanly
    assert status == 0, f"Orthanc exited with {status}\n{server.log_tail()}"


@pytest.fixture
def orthanc(orthanc_server: pacs.Orthanc) -> pacs.Orthanc:
    orthanc_server.clear()
    assert orthanc_server.count() == 0
    return orthanc_server


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _store(orthanc: pacs.Orthanc, paths, **kw):
    return pacs.storescu(paths, orthanc.aet, orthanc.host, orthanc.dicom_port, **kw)


def test_orthanc_runs_on_free_loopback_ports_with_its_own_config(orthanc):
    system = orthanc.get("/system")
    assert (system["DicomAet"], system["DicomPort"], system["HttpPort"]) == (
        "ORTHANC", orthanc.dicom_port, orthanc.http_port)
    assert 4242 not in (orthanc.dicom_port, orthanc.http_port)
    assert [p for p in orthanc.get("/plugins") if p != "explorer.js"] == []  # explorer.js: built in
    assert orthanc.startup_seconds is not None and orthanc.startup_seconds < 60


def test_echoscu_reaches_orthanc(orthanc):
    proc = pacs.echoscu(orthanc.aet, orthanc.host, orthanc.dicom_port)
    assert proc.returncode == 0
    # any called AE title is accepted (DicomCheckCalledAet false)
    pacs.echoscu("SOMEONE_ELSE", orthanc.host, orthanc.dicom_port, calling_aet="HB")


def test_echoscu_to_a_closed_port_fails_with_its_output():
    pacs.skip_or_fail_without("echoscu")
    with pytest.raises(pacs.ToolError, match="Connection refused") as info:
        pacs.echoscu("NOBODY", pacs.LOOPBACK, pacs.free_port(), timeout=5)
    assert info.value.returncode != 0
    assert pacs.echoscu("NOBODY", pacs.LOOPBACK, pacs.free_port(), timeout=5, check=False).returncode != 0


def test_storescu_sends_the_siim_chest_and_orthanc_returns_it(orthanc, siim_dicom):
    uid = _uid(siim_dicom)
    _store(orthanc, siim_dicom)
    assert orthanc.sop_instance_uids() == [uid]
    assert orthanc.count() == 1 and len(orthanc.instances()) == 1
    stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(uid)))
    sent = pydicom.dcmread(siim_dicom)
    assert stored.SOPInstanceUID == uid
    assert stored.file_meta.TransferSyntaxUID == JPEGBaseline8Bit  # sent as it is, not transcoded
    assert stored.PixelData == sent.PixelData
    assert orthanc.tags(uid)["SOPInstanceUID"] == uid


def test_storing_the_same_instance_twice_keeps_one(orthanc, siim_dicom, tmp_path):
    uid = _uid(siim_dicom)
    first = _store(orthanc, siim_dicom, extra=["-v"])
    instance = orthanc.instance_id(uid)
    received = orthanc.get(f"/instances/{instance}/metadata/ReceptionDate")
    changed = pydicom.dcmread(siim_dicom)
    changed.SeriesDescription = "second copy"
    changed.save_as(tmp_path / "again.dcm")
    second = _store(orthanc, tmp_path / "again.dcm", extra=["-v"])
    for proc in (first, second):  # Orthanc answers Success both times ...
        assert "Received Store Response (Success)" in proc.stderr
    # ... and keeps the first copy
    assert orthanc.sop_instance_uids().count(uid) == 1 and orthanc.count() == 1
    assert orthanc.instance_ids_of(uid) == [instance]
    assert orthanc.get(f"/instances/{instance}/metadata/ReceptionDate") == received
    assert orthanc.tags(uid)["SeriesDescription"] == "view: PA"


def test_same_sop_uid_under_another_patient_is_a_second_instance(orthanc, siim_dicom, tmp_path):
    """Why "exactly once" counts SOP Instance UIDs, not Orthanc instances of one patient."""
    uid = _uid(siim_dicom)
    other = pydicom.dcmread(siim_dicom)
    other.PatientID = "SOMEONE-ELSE"
    other.save_as(tmp_path / "other.dcm")
    _store(orthanc, [siim_dicom, tmp_path / "other.dcm"])
    assert orthanc.sop_instance_uids() == [uid, uid]
    with pytest.raises(KeyError, match="2 instances"):
        orthanc.instance_id(uid)


@pytest.fixture
def mixed_export(tmp_path: Path, siim_dicom: Path) -> tuple[Path, list[str]]:
    """CR, DX and SC in four transfer syntaxes plus an SR, nested, among files that are not DICOM."""
    root = tmp_path / "export"
    img = (np.add.outer(np.arange(64), np.arange(48)) * 2).astype(np.uint8)
    files = [
        write_dicom(root / "cr.dcm", img, modality="CR"),
        write_dicom(root / "a" / "dx_jpeg.dcm", img, modality="DX", transfer_syntax=JPEGBaseline8Bit),
        write_dicom(root / "a" / "b" / "cr_j2k.dcm", img, modality="CR", transfer_syntax=JPEG2000Lossless),
        write_dicom(root / "a" / "b" / "dx_rle.dcm", img, modality="DX", transfer_syntax=RLELossless),
        write_text_sr(root / "report_sr.dcm"),
        Path(shutil.copyfile(siim_dicom, root / "a" / "siim_sc.dcm")),
    ]
    (root / "README.txt").write_text("not DICOM\n")
    (root / "a" / "DICOMDIR_notes").write_text("not DICOM either\n")
    return root, sorted(_uid(f) for f in files)


def test_storescu_sends_a_folder_of_mixed_classes_and_syntaxes(orthanc, mixed_export):
    root, uids = mixed_export
    proc = _store(orthanc, root, pattern="*.dcm", extra=["-v"])
    assert orthanc.sop_instance_uids() == uids
    assert proc.stderr.count("Received Store Response (Success)") == len(uids)
    assert "Converting transfer syntax: JPEG Baseline -> JPEG Baseline" in proc.stderr  # as they are


def test_storescu_default_proposal_cannot_send_compressed_files(orthanc, mixed_export):
    """The reason storescu(propose="auto") exists: plain storescu proposes uncompressed only."""
    root, _ = mixed_export
    with pytest.raises(pacs.ToolError, match="unable to convert dataset from 'JPEG Baseline'"):
        _store(orthanc, root / "a" / "dx_jpeg.dcm", propose=None)
    _store(orthanc, root / "a" / "dx_jpeg.dcm", propose="-xy")  # one flag per syntax does it
    assert orthanc.count() == 1


def test_storescu_no_halt_failures_still_raise(orthanc, mixed_export):
    """With -nh storescu exits 0 after failed files; the wrapper reads its E: lines."""
    root, uids = mixed_export
    with pytest.raises(pacs.ToolError, match="Bad DICOM file"):
        _store(orthanc, root, pattern="*", no_halt=True)
    assert orthanc.sop_instance_uids() == uids  # everything that is DICOM still arrived
    proc = _store(orthanc, root, pattern="*", no_halt=True, check=False)
    assert proc.returncode == 0 and "Bad DICOM file" in proc.stderr


def test_orthanc_sends_to_a_storescp(orthanc, siim_dicom, tmp_path):
    uid = _uid(siim_dicom)
    _store(orthanc, siim_dicom)
    with pacs.StoreSCP(tmp_path / "scp", aet="RECEIVER") as scp:
        orthanc.add_modality("receiver", scp.aet, scp.host, scp.port)
        orthanc.echo("receiver")
        summary = orthanc.send("receiver", [uid])
        assert (summary["InstancesCount"], summary["FailedInstancesCount"]) == (1, 0)
        (received,) = scp.files()
        assert _uid(received) == uid
        assert pydicom.dcmread(received).PixelData == pydicom.dcmread(siim_dicom).PixelData
    assert scp.proc is None


def test_dcmdump_and_dsrdump(siim_dicom, tmp_path):
    pacs.skip_or_fail_without("dcmdump", "dsrdump")
    uid = _uid(siim_dicom)
    assert f"(0008,0018) UI [{uid}]" in pacs.dcmdump(siim_dicom)
    assert pacs.dcmdump(siim_dicom, "+P", "0008,0060").strip().startswith("(0008,0060) CS [CR]")
    sr = write_text_sr(tmp_path / "sr.dcm")
    dump = pacs.dsrdump(sr, "+Pl")
    assert "Basic Text SR Document" in dump and "Heart size within normal limits." in dump
    with pytest.raises(pacs.ToolError):
        pacs.dsrdump(siim_dicom)  # not a structured report
    with pytest.raises(pacs.ToolError):
        pacs.dcmdump(tmp_path / "missing.dcm")


def test_missing_tool_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install dcmtk orthanc"):
        pacs.skip_or_fail_without("dcmdump", "no-such-dicom-tool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install dcmtk orthanc"):
        pacs.skip_or_fail_without("no-such-dicom-tool")
