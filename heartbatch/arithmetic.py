"""The same film gives the same numbers on every CPU: the model's arithmetic probe.

onnxruntime computes a quantized model's int8 convolutions with kernels that
differ by CPU. Without VNNI, x86 kernels add pairs of u8 x s8 products in 16
bits with saturation, so a model whose weights use the full int8 range can give
other boxes (and refuse clean films) on such a CPU, silently. A model file
written by heartbatch's exporter carries a few probe inputs and the outputs the
exact arithmetic gives for them (dequantize -> float -> quantize); every process
runs the probe once when it loads the model, and measures with a slower exact
arithmetic when the CPU's fast kernels disagree.

Arithmetics, tried in this order: ``fused`` (onnxruntime's fastest kernels),
``precise`` (the same with onnxruntime's precise int8 kernels for x86 CPUs
without VNNI), ``exact`` (no graph fusion: every quantized convolution in float).
"""

from __future__ import annotations

import base64
import json
import os
import platform
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

META_PROBE = "heartbatch.probe"
PROBE_FORMAT = 1

FUSED, PRECISE, EXACT = "fused", "precise", "exact"
MODES = (FUSED, PRECISE, EXACT)

# Default tolerances (absolute, in each output's own units) when a probe does not state its own:
# saturation moves boxes by 0.01-0.2 of the image and chest scores by up to 1; float rounding
# between kernels moves them by < 0.001.
DEFAULT_TOLERANCE = {"boxes": 0.004, "uncertainty": 0.004, "chest_score": 0.03, "content": 0.03}
OTHER_TOLERANCE = 0.03  # relative, for any other output (a distance, a feature)
# ``masks`` are compared by the boxes they give (what a row reports), at the boxes' tolerance: a
# mask's edge cells sit on the steep part of the sigmoid, where kernels that round differently move a
# probability by a few hundredths and the sub-pixel edge by a few thousandths of a cell, while
# saturating kernels move whole edges.
MASKS = "masks"


# --- the CPU ------------------------------------------------------------------------

# the instruction-set extensions that decide which int8 kernels onnxruntime runs
_FLAGS = {
    "avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
    "amx_int8": "AMX-INT8", "asimddp": "dot product (ARM)", "i8mm": "int8 matmul (ARM)",
}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    machine: str
    features: tuple[str, ...]  # the int8-relevant extensions present, by _FLAGS name

    @property
    def int8_exact(self) -> bool:
        """Whether onnxruntime's fast u8 x s8 kernels are exact on this CPU (VNNI, AMX or ARM)."""
        exact = {"AVX512-VNNI", "AVX-VNNI", "AMX-INT8"}
        return bool(exact & set(self.features)) or not self.machine.lower().startswith(("x86", "amd64", "i686"))

    def describe(self) -> str:
        present = ", ".join(self.features) or "none of AVX2 / AVX-512 / VNNI / AMX"
        return f"{self.model} ({self.machine}; {present})"

    def as_dict(self) -> dict:
        return {"model": self.model, "machine": self.machine, "features": list(self.features),
                "int8_exact": self.int8_exact}


@lru_cache(maxsize=1)
def cpu() -> CpuInfo:
    """The CPU's model name and int8-relevant features (from /proc/cpuinfo where there is one)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model in ("", "unknown CPU", platform.machine()):
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    model = re.sub(r"\s+", " ", model).strip() or "unknown CPU"
    return CpuInfo(model, platform.machine() or "unknown", tuple(name for flag, name in _FLAGS.items() if flag in flags))


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# --- sessions in each arithmetic ----------------------------------------------------

def session_options(mode: str, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if mode == EXACT
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if mode == PRECISE:  # u8 weights for the int8 kernels of x86 CPUs without VNNI: no 16-bit pair sums
        options.add_session_config_entry("session.x64quantprecision", "1")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # no busy-waiting between ops: the decode workers need those cycles on a small machine
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


# --- the probe a model file carries -------------------------------------------------

def _encode(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array)
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def _decode(item: dict) -> np.ndarray:
    data = base64.b64decode(item["data"])
    return np.frombuffer(data, dtype=np.dtype(item["dtype"])).reshape(item["shape"]).copy()


@dataclass
class Probe:
    """Probe inputs (uint8, shown to the model as value / 255) and the exact outputs for them."""
    images: np.ndarray                       # [K, S, S] uint8
    outputs: dict[str, np.ndarray]           # output name -> exact values for the K images
    tolerance: dict[str, float] = field(default_factory=dict)
    recorded_with: str = ""                  # onnxruntime version and arithmetic that gave ``outputs``

    @property
    def inputs(self) -> np.ndarray:
        return (self.images.astype(np.float32) / 255.0)[:, None]

    def to_json(self) -> str:
        return json.dumps({"format": PROBE_FORMAT, "images": _encode(self.images),
                           "outputs": {k: _encode(v.astype(np.float32)) for k, v in self.outputs.items()},
                           "tolerance": self.tolerance, "recorded_with": self.recorded_with}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Probe":
        raw = json.loads(text)
        if raw.get("format") != PROBE_FORMAT:
            raise ValueError(f"probe format {raw.get('format')!r} is not {PROBE_FORMAT}")
        return cls(_decode(raw["images"]), {k: _decode(v) for k, v in raw["outputs"].items()},
                   {k: float(v) for k, v in raw.get("tolerance", {}).items()}, raw.get("recorded_with", ""))

    def tolerance_of(self, name: str, reference: np.ndarray) -> float:
        if name in self.tolerance:
            return self.tolerance[name]
        if name in DEFAULT_TOLERANCE:
            return DEFAULT_TOLERANCE[name]
        return OTHER_TOLERANCE * max(1.0, float(np.abs(reference).max(initial=0.0)))


def default_tolerance(names) -> dict[str, float]:
    return {name: DEFAULT_TOLERANCE[name] for name in names if name in DEFAULT_TOLERANCE}


@dataclass(frozen=True)
class Comparison:
    """How far a session's outputs on the probe are from the recorded exact ones."""
    mode: str
    output: str        # the output with the worst difference relative to its tolerance
    difference: float  # its largest absolute difference
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.difference <= self.tolerance

    def describe(self) -> str:
        return (f"{self.mode}: worst difference {self.difference:.4g} in '{self.output}' "
                f"(tolerance {self.tolerance:g})")


def compare(session, probe: Probe, mode: str) -> Comparison:
    """Run the probe through ``session`` and compare."""
    from . import contract

    names = [o.name for o in session.get_outputs() if o.name in probe.outputs]
    return compare_outputs(dict(zip(names, session.run(names, {contract.INPUT_NAME: probe.inputs}))), probe, mode)


def compare_outputs(values: dict[str, np.ndarray], probe: Probe, mode: str) -> Comparison:
    """The worst of the outputs (relative to its tolerance) against the recorded exact ones."""
    worst = None
    for name, reference in probe.outputs.items():
        value = values.get(name)
        if value is None:
            continue
        if name == MASKS:
            item = _compare_masks(value, reference, probe.tolerance.get(name, DEFAULT_TOLERANCE["boxes"]), mode)
        else:
            tol = probe.tolerance_of(name, reference)
            diff = (float(np.max(np.abs(value.astype(np.float64) - reference), initial=0.0))
                    if value.shape == reference.shape and np.isfinite(value).all() else float("inf"))
            item = Comparison(mode, name, diff, tol)
        if worst is None or diff / tol > worst.difference / worst.tolerance:
            worst = item
    return worst or Comparison(mode, "-", 0.0, 1.0)


def _compare_masks(value: np.ndarray, reference: np.ndarray, tolerance: float, mode: str) -> Comparison:
    """Masks by the boxes they give (:func:`heartbatch.masks.boxes_from_masks`); a structure found in
    one and not the other is an infinite difference."""
    from .masks import boxes_from_masks

    if value.shape != reference.shape or not np.isfinite(value).all():
        return Comparison(mode, f"{MASKS} (their boxes)", float("inf"), tolerance)
    got, expected = boxes_from_masks(value), boxes_from_masks(reference)
    if not np.array_equal(np.isnan(got), np.isnan(expected)):
        return Comparison(mode, f"{MASKS} (their boxes)", float("inf"), tolerance)
    diff = float(np.nanmax(np.abs(got - expected), initial=0.0)) if np.isfinite(got).any() else 0.0
    return Comparison(mode, f"{MASKS} (their boxes)", diff, tolerance)


@dataclass(frozen=True)
class ArithmeticCheck:
    """What a loaded model's probe showed on this CPU, and the arithmetic it measures with."""
    mode: str                                  # the arithmetic in use
    comparisons: tuple[Comparison, ...] = ()   # each arithmetic tried, in order; empty: no probe

    @property
    def has_probe(self) -> bool:
        return bool(self.comparisons)

    @property
    def fallback(self) -> bool:
        """True when the fast kernels disagreed with the exact outputs on this CPU."""
        return self.mode != FUSED

    def describe(self) -> str:
        if not self.has_probe:
            return "not checked (the model carries no arithmetic probe)"
        first, last = self.comparisons[0], self.comparisons[-1]
        if self.mode == FUSED:
            return f"the fast kernels give the model's recorded exact outputs ({last.describe()})"
        if first.mode == FUSED:
            return (f"the fast kernels of this CPU do not give the model's recorded exact outputs "
                    f"({first.describe()}); measuring with the {self.mode} arithmetic ({last.describe()})")
        return f"measuring with the {self.mode} arithmetic ({last.describe()})"

    def as_dict(self) -> dict:
        return {"mode": self.mode, "probe": self.has_probe,
                "checks": [{"mode": c.mode, "output": c.output,
                            "difference": round(c.difference, 6) if np.isfinite(c.difference) else None,
                            "tolerance": c.tolerance, "passed": c.passed} for c in self.comparisons],
                "cpu": cpu().describe(), "onnxruntime": onnxruntime_version()}
