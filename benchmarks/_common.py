"""Shared bits for the benchmark scripts: test folders from the shared PNGs, RSS sampling."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("HEARTBATCH_DATA", REPO.parent / "shared" / "data"))


def print_machine() -> None:
    """The machine every figure below was measured on: int8 results and speed depend on the CPU's
    features (AVX2, AVX-512, VNNI, AMX), so no number is printed without them."""
    from heartbatch.arithmetic import cpu, onnxruntime_version

    print(f"# machine: {cpu().describe()}; {os.cpu_count()} cores; onnxruntime {onnxruntime_version()}", flush=True)


def shared_pngs() -> list[Path]:
    pngs = sorted((DATA / "cxr-ctr").glob("*/png/*.png"))
    if not pngs:
        raise SystemExit(f"no shared PNGs under {DATA / 'cxr-ctr'}; set HEARTBATCH_DATA")
    return pngs


#: Encodings the benchmarks write: name -> (transfer syntax keyword, what writes it).
SYNTAXES = {
    "raw": "ExplicitVRLittleEndian",    # uncompressed
    "rle": "RLELossless",               # pydicom's RLE encoder (pylibjpeg-rle)
    "jpeg": "JPEGBaseline8Bit",         # Pillow (libjpeg), quality 95; 8-bit only
    "jpeg-lossless": "JPEGLosslessSV1",  # imagecodecs (libjpeg-turbo 3's lossless JPEG, predictor 1)
    "jpeg-ls": "JPEGLSLossless",        # pydicom with pyjpegls (CharLS)
    "j2k": "JPEG2000Lossless",          # pydicom with pylibjpeg-openjpeg (OpenJPEG), 5 levels
    "j2k-lossy": "JPEG2000",            # the same, compression ratio 10
}


def chest_dicom(path: Path, pixels: np.ndarray, *, bits: int = 8, syntax: str = "jpeg", index: int = 0) -> None:
    """A frontal CR like the RSNA files: PA, MONOCHROME2, 0.168 mm spacing, in one of SYNTAXES."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    cr_storage = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.1")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = cr_storage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = cr_storage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "CR", "PA", "CHEST"
    ds.StudyDate = "20240101"
    ds.PatientID = f"BENCH{index:05d}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelSpacing = [0.168, 0.168]
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    stored = pixels.astype(np.uint8 if bits == 8 else np.uint16)
    syntax_uid = getattr(pydicom.uid, SYNTAXES[syntax])
    if syntax in ("jpeg", "jpeg-lossless"):
        if syntax == "jpeg":
            buffer = io.BytesIO()
            Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
            frame = buffer.getvalue()
            ds.LossyImageCompression = "01"
        else:
            import imagecodecs

            frame = imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1, bitspersample=bits)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax_uid
        ds["PixelData"].is_undefined_length = True
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = stored.tobytes()
        if syntax == "j2k-lossy":
            ds.compress(syntax_uid, j2k_cr=[10], encoding_plugin="pylibjpeg")
            ds.LossyImageCompression = "01"
        elif syntax != "raw":
            ds.compress(syntax_uid)
    ds.save_as(path, enforce_file_format=True)


def build_folder(folder: Path, n: int, *, size: int = 1024, bits: int = 8, syntax: str = "jpeg") -> Path:
    """N chest DICOMs made from the shared PNGs (cycled), upsampled to size x size."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = shared_pngs()
    existing = len(list(folder.glob("*.dcm")))
    for i in range(existing, n):
        with Image.open(pngs[i % len(pngs)]) as im:
            img = np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
        pixels = img if bits == 8 else np.round(img / 255 * (2 ** bits - 1))
        chest_dicom(folder / f"img{i:05d}.dcm", pixels, bits=bits, syntax=syntax, index=i)
    return folder


class PeakRSS:
    """Samples the summed RSS of a process and its children every 50 ms."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed_command(cmd: list[str], **kwargs) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run cmd, return (wall seconds, peak RSS bytes of its process tree, result)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    sampler = PeakRSS(proc.pid)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    return seconds, peak, subprocess.CompletedProcess(cmd, proc.returncode, out, err)
