"""Fuzzing the reader: mutated DICOM bytes never crash, hang or escape as an untyped error.

Valid small DICOMs (uncompressed 8/16-bit, implicit VR, big endian, RLE, JPEG
baseline, JPEG 2000) are mutated by hypothesis: bit flips, truncations,
corrupted tags, VRs and lengths, duplicated and deleted byte ranges.  Each
mutant goes through :func:`heartbatch.workers.prepare` in this process (a
crash in a C decoder would take pytest down with it) and must come back as
model input or as a skipped/error record whose reason came from a typed
:class:`~heartbatch.dicom.Skipped` / :class:`~heartbatch.dicom.ReadError`,
never the catch-all "unexpected ..." reason.

Examples are derandomized, so a failure reproduces on every run; set
``HEARTBATCH_FUZZ_SCALE`` (e.g. 10) to try more inputs.  The number of inputs
tried is printed by the last test of this module.
"""

from __future__ import annotations

import csv
import os
import random
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom.uid import (ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         RLELossless)

from dicom_factory import make_nonsquare, shared_png, to_bits, write_dicom
from heartbatch.records import Record
from heartbatch.workers import WorkerPool, Prepared, prepare

#: mutants make pydicom warn about everything they break: expected, not news
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SIZE = 224
NUM_SEEDS = 7
TIMEOUT = 10.0
SCALE = float(os.environ.get("HEARTBATCH_FUZZ_SCALE", "1"))

#: inputs tried, per strategy (reported by test_zz_report_fuzz_count)
TRIED: Counter[str] = Counter()
SLOWEST: list[float] = [0.0]

LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}


@dataclass(frozen=True)
class Field:
    """Where one element's tag, VR and length sit in a seed file."""
    tag: int
    vr: int | None      # offset of the 2 VR bytes (None: implicit VR)
    length: int         # offset of the length field
    length_size: int    # 2 or 4 bytes


class Seed:
    """A valid file and its element layout (a plain class: hypothesis prints it by its repr)."""

    def __init__(self, name: str, data: bytes, fields: tuple[Field, ...]):
        self.name, self.data, self.fields = name, data, fields

    def __repr__(self) -> str:
        return f"<seed {self.name}: {len(self.data)} bytes, {len(self.fields)} elements>"


def _walk(data: bytes, start: int, explicit: bool, little: bool,
          stop_group: int | None = None) -> tuple[list[Field], int]:
    """Top-level elements from ``start``: their tag/VR/length offsets, and where the walk ended."""
    fields, pos, end = [], start, "<" if little else ">"
    while pos + 8 <= len(data):
        group, _ = struct.unpack_from(end + "HH", data, pos)
        if stop_group is not None and group != stop_group:
            break
        if explicit:
            vr = data[pos + 4:pos + 6]
            if vr in LONG_VRS:
                fields.append(Field(pos, pos + 4, pos + 8, 4))
                length = struct.unpack_from(end + "I", data, pos + 8)[0]
                pos += 12
            else:
                fields.append(Field(pos, pos + 4, pos + 6, 2))
                length = struct.unpack_from(end + "H", data, pos + 6)[0]
                pos += 8
        else:
            fields.append(Field(pos, None, pos + 4, 4))
            length = struct.unpack_from(end + "I", data, pos + 4)[0]
            pos += 8
        if length == 0xFFFFFFFF:  # encapsulated pixel data: its items follow
            while pos + 8 <= len(data):
                fields.append(Field(pos, None, pos + 4, 4))
                pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
            break
        pos += length
    return fields, pos


def _fields(data: bytes, syntax: str) -> tuple[Field, ...]:
    meta, pos = _walk(data, 132, explicit=True, little=True, stop_group=0x0002)
    body, _ = _walk(data, pos, explicit=syntax != ImplicitVRLittleEndian, little=syntax != ExplicitVRBigEndian)
    return tuple(meta + body)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, data_dir) -> list[Seed]:
    """Valid 64 x 64 chest DICOMs in the encodings the reader must survive."""
    folder = tmp_path_factory.mktemp("fuzz_seeds")
    img = make_nonsquare(shared_png(data_dir, 8), 64, 64)
    specs = {
        "explicit-8bit": dict(pixels=img),
        "explicit-12bit-rescale-window": dict(pixels=to_bits(img, 12), bits_stored=12, rescale=(2.0, -100.0),
                                              window=(4000, 8000)),
        "implicit-16bit-mono1": dict(pixels=to_bits(img, 16), bits_stored=16, photometric="MONOCHROME1",
                                     transfer_syntax=ImplicitVRLittleEndian),
        "big-endian-16bit": dict(pixels=to_bits(img, 16), bits_stored=16, transfer_syntax=ExplicitVRBigEndian),
        "rle-12bit": dict(pixels=to_bits(img, 12), bits_stored=12, transfer_syntax=RLELossless),
        "jpeg-baseline": dict(pixels=img, transfer_syntax=JPEGBaseline8Bit),
        "j2k-lossless-16bit": dict(pixels=to_bits(img, 16), bits_stored=16, transfer_syntax=JPEG2000Lossless),
    }
    assert len(specs) == NUM_SEEDS
    out = []
    for name, spec in specs.items():
        pixels = spec.pop("pixels")
        data = write_dicom(folder / f"{name}.dcm", pixels, **spec).read_bytes()
        out.append(Seed(name, data, _fields(data, spec.get("transfer_syntax", "1.2.840.10008.1.2.1"))))
    return out


def test_seeds_are_valid_and_walked(seeds, tmp_path):
    """Unmutated, every seed is measured, and the walker found its Rows and PixelData tags."""
    for seed in seeds:
        path = tmp_path / f"{seed.name}.dcm"
        path.write_bytes(seed.data)
        assert isinstance(prepare(str(path), SIZE, timeout=TIMEOUT), Prepared), seed.name
        tags = {seed.data[f.tag:f.tag + 4] for f in seed.fields}
        assert tags & {b"\x28\x00\x10\x00", b"\x00\x28\x00\x10"}, seed.name        # Rows
        assert tags & {b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"}, seed.name        # PixelData


# --- mutations -----------------------------------------------------------------------

def flip_bits(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for offset, bit in flips:
        buf[offset % len(buf)] ^= 1 << bit
    return bytes(buf)


def truncate_at(data: bytes, fraction: float) -> bytes:
    return data[:int(len(data) * fraction)]


def corrupt_field(seed: Seed, data: bytes, index: int, part: str, value: int) -> bytes:
    """Overwrite one element's group, element, VR or length with ``value``."""
    f = seed.fields[index % len(seed.fields)]
    if f.length + f.length_size > len(data):  # an earlier mutation cut the file short
        return data
    buf = bytearray(data)
    if part == "group":
        struct.pack_into("<H", buf, f.tag, value & 0xFFFF)
    elif part == "element":
        struct.pack_into("<H", buf, f.tag + 2, value & 0xFFFF)
    elif part == "vr" and f.vr is not None:
        buf[f.vr:f.vr + 2] = bytes([65 + value % 26, 65 + (value >> 8) % 26])
    elif f.length_size == 2:
        struct.pack_into("<H", buf, f.length, value & 0xFFFF)
    else:
        struct.pack_into("<I", buf, f.length, value & 0xFFFFFFFF)
    return bytes(buf)


def splice(data: bytes, start: int, length: int, duplicate: bool) -> bytes:
    start %= len(data)
    chunk = data[start:start + length]
    return data[:start] + chunk + data[start:] if duplicate else data[:start] + data[start + length:]


#: lengths and values that break readers: zero, odd, all ones, just past the end, huge
SPECIAL = st.sampled_from([0, 1, 2, 3, 0xFF, 0xFFFF, 0xFFFE, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFE, 0x10000,
                           64, 4096, 65535, 20000])
VALUES = st.one_of(SPECIAL, st.integers(0, 0xFFFFFFFF))
PARTS = st.sampled_from(["group", "element", "vr", "length", "length"])


def _op():
    return st.one_of(
        st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), min_size=1,
                                            max_size=8)),
        st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
        st.tuples(st.just("field"), st.integers(0, 10_000), PARTS, VALUES),
        st.tuples(st.just("splice"), st.integers(0, 2**31), st.integers(1, 512), st.booleans()),
    )


def apply(seed: Seed, data: bytes, op) -> bytes:
    kind, *args = op
    if not data:
        return data
    if kind == "flip":
        return flip_bits(data, *args)
    if kind == "truncate":
        return truncate_at(data, *args)
    if kind == "field":
        return corrupt_field(seed, data, *args)
    return splice(data, *args)


# --- the check -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "mutant.dcm"


def check(strategy: str, path: Path, data: bytes) -> Prepared | Record:
    """Write a mutant and read it: model input or a typed skipped/error record (prepare bounds the
    time); returns what prepare() gave."""
    path.write_bytes(data)
    TRIED[strategy] += 1
    started = time.monotonic()
    try:
        result = prepare(str(path), SIZE, timeout=TIMEOUT)
    except BaseException as exc:  # noqa: BLE001 - e.g. a Rust decoder's PanicException
        pytest.fail(f"prepare() raised {type(exc).__module__}.{type(exc).__name__}: {exc}; "
                    f"in a run this stops everything")
    SLOWEST[0] = max(SLOWEST[0], time.monotonic() - started)  # printed at the end, never asserted
    if isinstance(result, Prepared):
        image = result.image
        assert image.shape == (SIZE, SIZE) and image.dtype == np.float32
        assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
        return result
    assert isinstance(result, Record), type(result)
    assert result.status in ("skipped", "error"), result.status
    assert result.reason, "empty reason"
    assert not result.reason.startswith("unexpected"), f"untyped error: {result.reason}\n{result.detail}"
    return result


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


SEED_INDEX = st.integers(0, NUM_SEEDS - 1)


@fuzz_settings(150)
@given(which=SEED_INDEX, flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), min_size=1,
                                         max_size=16))
def test_bit_flips(seeds, target, which, flips):
    seed = seeds[which]
    check("bit flips", target, flip_bits(seed.data, flips))


@fuzz_settings(100)
@given(which=SEED_INDEX, fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncations(seeds, target, which, fraction):
    seed = seeds[which]
    check("truncations", target, truncate_at(seed.data, fraction))


@fuzz_settings(200)
@given(which=SEED_INDEX, index=st.integers(0, 10_000), part=PARTS, value=VALUES)
def test_tag_vr_and_length_corruption(seeds, target, which, index, part, value):
    seed = seeds[which]
    check("tag/VR/length corruption", target, corrupt_field(seed, seed.data, index, part, value))


@fuzz_settings(80)
@given(which=SEED_INDEX, start=st.integers(0, 2**31), length=st.integers(1, 1024), duplicate=st.booleans())
def test_duplicated_and_deleted_ranges(seeds, target, which, start, length, duplicate):
    seed = seeds[which]
    check("duplicated/deleted ranges", target, splice(seed.data, start, length, duplicate))


@fuzz_settings(120)
@given(which=SEED_INDEX, ops=st.lists(_op(), min_size=2, max_size=5))
def test_combined_mutations(seeds, target, which, ops):
    seed = seeds[which]
    data = seed.data
    for op in ops:
        data = apply(seed, data, op)
    check("combined", target, data)


# --- a known mutant: pylibjpeg-rle panics -------------------------------------------------

def rle_panic_mutant(seeds) -> bytes:
    """The RLE seed with its second segment's offset moved to byte 100: pylibjpeg-rle (Rust)
    indexes past its output buffer and raises pyo3's PanicException, a BaseException
    that ``except Exception`` does not catch."""
    seed = next(s for s in seeds if s.name == "rle-12bit")
    fragment = next(f for f in seed.fields if seed.data[f.tag:f.tag + 4] == b"\xfe\xff\x00\xe0"
                    and f.tag > seed.data.index(b"\xe0\x7f\x10\x00") + 12)
    header = fragment.length + 4                      # the 64-byte RLE header starts the fragment
    buf = bytearray(seed.data)
    assert struct.unpack_from("<I", buf, header)[0] == 2, "expected two RLE segments (12-bit)"
    struct.pack_into("<I", buf, header + 8, 100)      # offset of segment 2
    return bytes(buf)


def test_decoder_panic_is_an_error_record(seeds, target):
    """A panic in a Rust decoder is one file's error, not the end of the run."""
    result = check("known mutants", target, rle_panic_mutant(seeds))
    assert isinstance(result, Record) and result.status == "error", result


@pytest.mark.slow
def test_decoder_panic_in_a_run_costs_one_row(seeds, tmp_path, box8_model):
    """The same file among good ones, through `heartbatch run` with workers: one error row, exit 0."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "panic.dcm").write_bytes(rle_panic_mutant(seeds))
    for seed in seeds:
        (folder / f"{seed.name}.dcm").write_bytes(seed.data)
    out = tmp_path / "out" / "report.csv"
    TRIED["known mutants"] += 1
    proc = subprocess.run([sys.executable, "-m", "heartbatch", "run", str(folder), "--out", str(out), "--model",
                           str(box8_model), "--workers", "2", "--quiet"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    with open(out, newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert len(rows) == len(seeds) + 1
    assert rows["panic.dcm"]["status"] == "error" and rows["panic.dcm"]["reason"]
    assert all(r["status"] == "ok" for name, r in rows.items() if name != "panic.dcm")


def test_mutants_through_worker_processes(seeds, tmp_path):
    """The same mutations through WorkerPool: every mutant gets exactly one result.

    The known panicking mutant is among them, so a worker-side BaseException is always exercised.
    """
    rng = random.Random(20240115)
    paths = []
    panic = tmp_path / "known-panic.dcm"
    panic.write_bytes(rle_panic_mutant(seeds))
    paths.append(str(panic))
    for i in range(int(48 * SCALE)):
        seed = seeds[i % len(seeds)]
        data = seed.data
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(["flip", "truncate", "field", "splice"])
            if kind == "flip":
                op = ("flip", [(rng.randrange(2**31), rng.randrange(8)) for _ in range(rng.randint(1, 8))])
            elif kind == "truncate":
                op = ("truncate", rng.random())
            elif kind == "field":
                op = ("field", rng.randrange(10_000), rng.choice(["group", "element", "vr", "length"]),
                      rng.choice([0, 0xFFFFFFFF, 0xFFFF, rng.randrange(2**32)]))
            else:
                op = ("splice", rng.randrange(2**31), rng.randint(1, 512), rng.random() < 0.5)
            data = apply(seed, data, op)
        path = tmp_path / f"mutant{i:03d}.dcm"
        path.write_bytes(data)
        paths.append(str(path))
    TRIED["through WorkerPool"] += len(paths)
    pool = WorkerPool(workers=2, size=SIZE, timeout=TIMEOUT)
    try:
        results = list(pool.map(paths))
    finally:
        pool.close()
    assert sorted(r.path for r in results) == sorted(paths)
    for result in results:
        if isinstance(result, Record):
            assert result.status in ("skipped", "error") and result.reason
        else:
            assert isinstance(result, Prepared)


def test_zz_report_fuzz_count(capsys):
    """Prints how many mutated inputs this module tried (run it with the fuzz tests)."""
    total = sum(TRIED.values())
    with capsys.disabled():
        detail = ", ".join(f"{k} {v}" for k, v in TRIED.items())
        print(f"\nfuzz: {total} mutated inputs tried ({detail}); slowest prepare() {SLOWEST[0]:.2f} s")
    if TRIED:
        assert all(count > 0 for count in TRIED.values())
