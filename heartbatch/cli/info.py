"""`heartbatch info`: what decides the numbers on this machine (versions, CPU, model, probe)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..errors import ExitCode


def add_parser(sub) -> None:
    p = sub.add_parser(
        "info", help="this installation, the CPU's int8 features, the model and its arithmetic probe",
        description="What decides the numbers heartbatch writes on this machine: heartbatch, Python and "
                    "onnxruntime versions, the CPU and its int8-relevant features (AVX2, AVX-512, VNNI, AMX), "
                    "the model (path, id, quantization, validation metrics) and the result of its arithmetic "
                    "probe: whether this CPU's fast int8 kernels give the model's recorded exact outputs, and "
                    "the arithmetic runs use.")
    p.add_argument("--model", type=Path, help="ONNX model (default: the model shipped with heartbatch)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    import platform

    from ..arithmetic import cpu, onnxruntime_version
    from ..model import BoxModel

    model = BoxModel(args.model)
    info, check = model.info, model.arithmetic
    facts = {
        "heartbatch": __version__, "python": platform.python_version(), "onnxruntime": onnxruntime_version(),
        "cpu": cpu().as_dict(),
        "model": {"path": str(info.path), "model_id": info.model_id, "bytes": info.path.stat().st_size,
                  "input_size": info.input_size, "outputs": ["boxes", *info.optional],
                  "quantization": info.metadata.get("heartbatch.quantization", "none (float)"),
                  "validation": info.validation_metrics},
        "arithmetic": {**check.as_dict(), "verdict": check.describe()},
    }
    if args.json:
        print(json.dumps(facts, indent=1, sort_keys=True))
        return ExitCode.OK
    c = cpu()
    lines = [
        ("heartbatch", f"{__version__} (Python {facts['python']}, onnxruntime {facts['onnxruntime']})"),
        ("CPU", c.describe()),
        ("int8 kernels", "exact on this CPU (VNNI, AMX or not x86)" if c.int8_exact else
         "without VNNI: u8 x s8 pairs are added in 16 bits with saturation"),
        ("model", f"{info.path} ({info.model_id}, {facts['model']['bytes'] / 1e6:.1f} MB, input {info.input_size} px)"),
        ("quantization", facts["model"]["quantization"]),
        ("arithmetic probe", check.describe()),
        ("measures with", f"{check.mode} arithmetic" + (" (slower than the fast kernels)" if check.fallback else "")),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return ExitCode.OK

