"""`export-onnx`: a training checkpoint -> a contract-conformant ONNX model.

    export-onnx runs/default/best.pt --out heartbatch/models/heartbox.onnx
    export-onnx runs/a/averaged.pt runs/b/averaged.pt --out ensemble.onnx


Accepts this project's checkpoints (``heartbatch-checkpoint/1``) and, with
``--legacy`` or detected automatically, the original project's PyTorch
Lightning checkpoint (ResNet18 heart-box regressor at 224 px).  The exported
graph takes ``image`` [N, 1, S, S] in [0, 1] (normalization inside) and gives
``boxes`` [N, 8] or [N, 4] normalized; metadata records everything the runtime
and a reader need.  Several checkpoints make one graph that averages their
boxes (an ensemble of independently trained networks: steadier boxes, at N
times the inference cost).  After export, onnxruntime and torch are compared on the
same inputs; a difference above --tolerance exits 1 (the file is kept for
inspection).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torchvision.models import resnet18

from heartbatch import contract as C
from heartbatch.errors import HeartbatchError
from heartbatch.files import sha256_file
from heartbatch.pixels import PIPELINE_VERSION, pipeline_description

from . import checkpoint, onnxfile, props
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError

DEFAULT_OPSET = 17

# The original project: 224 x 224 input, pixels / 255 then (x - 0.494) / 0.252,
# output heart x0, y0, x1, y1 in 224-pixel coordinates.
LEGACY_SIZE = 224
LEGACY_MEAN = 0.494
LEGACY_STD = 0.252


class ExportError(HeartbatchError):
    """Something the user can fix (wrong file, wrong format): exit 2, no traceback."""


class LegacyHeartNet(nn.Module):
    """The original ResNet18 with its normalization and 224-px scaling moved into the graph."""

    def __init__(self, mean: float = LEGACY_MEAN, std: float = LEGACY_STD, size: int = LEGACY_SIZE):
        super().__init__()
        self.model = resnet18(weights=None)
        self.model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.model.fc = nn.Linear(512, 4)
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.scale = float(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std) / self.scale


class ShiftAveraged(nn.Module):
    """Test-time averaging inside the graph: the model on the image and on copies shifted by
    +-shift pixels along x and y (edges replicated), each prediction shifted back, then averaged."""

    def __init__(self, model: nn.Module, size: int, shift: int):
        super().__init__()
        self.model, self.size, self.shift = model, size, shift
        self.offsets = [(0, 0), (shift, 0), (-shift, 0), (0, shift), (0, -shift)]

    def _shifted(self, x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
        s = self.shift
        padded = torch.nn.functional.pad(x, (s, s, s, s), mode="replicate")
        return padded[:, :, s - dy:s - dy + self.size, s - dx:s - dx + self.size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = torch.cat([self._shifted(x, dx, dy) for dx, dy in self.offsets])
        out = self.model(batch).reshape(len(self.offsets), -1, self.model.outputs)
        back = torch.tensor([[dx, dy] * (self.model.outputs // 2) for dx, dy in self.offsets],
                            dtype=x.dtype) / self.size
        return (out - back[:, None, :]).mean(0)


class Averaged(nn.Module):
    """Several networks in one graph, their boxes averaged."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.outputs = members[0].outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="export-onnx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, nargs="+",
                   help="trainer checkpoint (best.pt) or original Lightning .ckpt; several trainer "
                        "checkpoints: one graph averaging their boxes")
    p.add_argument("--out", required=True, type=Path, help="ONNX file to write")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest accepted |onnxruntime - torch| difference (default 1e-4)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--tta-shift", type=int, default=0, metavar="PX",
                   help="average the model over the image and 4 copies shifted by PX pixels (5x the "
                        "inference cost; default 0: off)")
    p.add_argument("--legacy", action="store_true",
                   help="checkpoint is the original project's (detected automatically when unambiguous)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary pickled objects in the checkpoint (only for files you trust)")
    return p.parse_args(argv)


def _common_metadata(size: int, outputs: int, mean: float, std: float, source: Path) -> dict[str, str]:
    return {
        C.META_FORMAT: C.FORMAT_VERSION,
        C.META_INPUT_SIZE: str(size),
        C.META_OUTPUT_LAYOUT: C.OUTPUT_LAYOUTS[outputs],
        C.META_PREPROCESSING: pipeline_description(),
        C.META_PIXELS_VERSION: PIPELINE_VERSION,
        C.META_NORMALIZATION: f"mean={mean:.6g},std={std:.6g} (inside the graph)",
        C.META_SOURCE: f"{source.name} sha256:{sha256_file(source)[:16]}",
    }


def from_heartbatch(ckpt: dict, path: Path) -> tuple[nn.Module, int, dict[str, str]]:
    spec = checkpoint.network_spec(ckpt, path)
    size, outputs = spec.size, spec.outputs
    if size < C.MIN_INPUT_SIZE:
        raise ExportError(f"{path}: trained at {size}px; the model contract needs {C.MIN_INPUT_SIZE} or more")
    if outputs not in C.OUTPUT_LAYOUTS:
        raise ExportError(f"{path}: {outputs} outputs; the contract allows {sorted(C.OUTPUT_LAYOUTS)}")
    model = checkpoint.network(ckpt, spec, path)
    cfg = ckpt["config"]
    epochs = cfg.get("epochs", "?")
    epoch = ckpt.get("epoch")
    reached = f"epoch {epoch + 1} of {epochs}" if isinstance(epoch, int) else f"{epochs} epochs"
    meta = _common_metadata(size, outputs, spec.mean, spec.std, path)
    meta.update({
        C.META_TRAINING_DATA: (f"{cfg.get('data', '?')}"
                               + (f" + labels {cfg['labels']}" if cfg.get("labels") else "")
                               + f": {cfg.get('train_images', '?')} training / {cfg.get('val_images', '?')}"
                               f" validation images, seed {cfg.get('seed', '?')}, {reached}"),
        C.META_VALIDATION: json.dumps(props.json_safe(ckpt.get("metrics") or {}), sort_keys=True),
        C.META_CODE_VERSION: str(cfg.get("code_version", "unknown")),
    })
    return model, size, meta


def from_legacy(ckpt: dict, path: Path) -> tuple[nn.Module, int, dict[str, str]]:
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise ExportError(f"{path}: no 'state_dict' in the checkpoint; not an original-project checkpoint")
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    fc = weights.get("fc.weight")
    if fc is None or tuple(fc.shape) != (4, 512):
        raise ExportError(f"{path}: expected 'model.*' ResNet18 weights with fc 512 -> 4 "
                          f"(original heart-detection model); got fc {None if fc is None else tuple(fc.shape)}")
    model = LegacyHeartNet()
    try:
        model.model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ExportError(f"{path}: weights do not fit the original ResNet18 layout: {exc}") from None
    pl_version = ckpt.get("pytorch-lightning_version", "unknown")
    meta = _common_metadata(LEGACY_SIZE, 4, LEGACY_MEAN, LEGACY_STD, path)
    meta[C.META_NORMALIZATION] += ("; the original project scaled 8-bit pixels by 1/255, "
                                   "heartbatch feeds its own pipeline's [0,1] image")
    meta.update({
        C.META_TRAINING_DATA: "original project checkpoint (RSNA heart detection)",
        C.META_VALIDATION: "{}",  # unknown: the Lightning checkpoint carries none
        C.META_CODE_VERSION: (f"original project (PyTorch Lightning {pl_version}); "
                              f"converted by {checkpoint.code_version()}"),
    })
    return model, LEGACY_SIZE, meta


def export(model: nn.Module, size: int, meta: dict[str, str], out: Path, opset: int) -> None:
    """TorchScript exporter: simple, mature, and keeps the batch axis symbolic."""
    model.eval()
    example = torch.rand(2, 1, size, size)  # batch 2 so no size-1 shape gets specialised
    outputs = [C.OUTPUT_NAME] + ([C.MASKS] if getattr(model, "has_masks", False) else [])
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter
        torch.onnx.export(model, (example,), buf, input_names=[C.INPUT_NAME], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in [C.INPUT_NAME, *outputs]},
                          opset_version=opset, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    # the tracer leaves the coordinate axis symbolic; the contract fixes it
    width = proto.graph.output[0].type.tensor_type.shape.dim[1]
    width.ClearField("dim_param")
    width.dim_value = len(meta[C.META_OUTPUT_LAYOUT].split(","))
    props.set_metadata(proto, meta)
    proto.producer_name = "heartbatch export-onnx"
    onnx.checker.check_model(proto, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnxfile.save(proto, out)


def parity(model: nn.Module, out: Path, size: int) -> float:
    """Max |onnxruntime - torch| over a random batch of 3 and a flat image (batch 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(3, 1, size, size, generator=gen), torch.full((1, 1, size, size), 0.5)]
    worst = 0.0
    names = [o.name for o in session.get_outputs()]
    for x in batches:
        with torch.no_grad():
            out = model(x)
        for expected, got in zip(out if isinstance(out, tuple) else (out,), session.run(names, {C.INPUT_NAME: x.numpy()})):
            expected = expected.numpy()
            if got.shape != expected.shape:
                raise AssertionError(f"onnxruntime gave shape {got.shape}, torch {expected.shape}")
            worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def load_network(path: Path, legacy: bool, trust_pickle: bool) -> tuple[nn.Module, int, dict[str, str], bool]:
    """(network, input size, metadata, is the original project's) from one checkpoint."""
    ckpt = checkpoint.load(path, trust_pickle)
    legacy = legacy or ("format" not in ckpt and "state_dict" in ckpt)
    if legacy and "format" in ckpt:
        raise ExportError(f"{path}: --legacy given, but this is a {ckpt['format']!r} checkpoint")
    if not legacy and "format" not in ckpt:
        raise ExportError(f"{path}: unknown checkpoint layout (no 'format' or 'state_dict' key; "
                          f"keys: {', '.join(sorted(map(str, ckpt))[:8])})")
    return *(from_legacy if legacy else from_heartbatch)(ckpt, path), legacy


def ensemble(loaded: list[tuple[nn.Module, int, dict[str, str], bool]], paths: list[Path]):
    """One graph averaging several trainer networks; the metadata names every member."""
    if any(legacy for *_, legacy in loaded):
        raise ExportError("an ensemble takes heartbatch checkpoints only, not the original project's")
    if any(getattr(m, "has_masks", False) for m, *_ in loaded):
        raise ExportError("an ensemble averages boxes only; export a network with a mask head on its own")
    (first, size, meta, _), *rest = loaded
    for (model, other_size, _, _), path in zip(rest, paths[1:]):
        if (other_size, model.outputs) != (size, first.outputs):
            raise ExportError(f"{path}: {other_size}px with {model.outputs} outputs; {paths[0]} has {size}px "
                              f"with {first.outputs}: an ensemble needs one input size and output layout")
    metas = [m for _, _, m, _ in loaded]
    meta = dict(meta)
    meta[C.META_TRAINING_DATA] = f"average of {len(loaded)} networks: " + " | ".join(
        m[C.META_TRAINING_DATA] for m in metas)
    meta[C.META_NORMALIZATION] = " | ".join(m[C.META_NORMALIZATION] for m in metas)
    meta[C.META_SOURCE] = " + ".join(m[C.META_SOURCE] for m in metas)
    meta[C.META_VALIDATION] = "{}"  # the members' own metrics do not describe the average
    return Averaged([m.eval() for m, *_ in loaded]), size, meta


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        loaded = [load_network(p, args.legacy, args.trust_pickle) for p in args.checkpoint]
        if len(loaded) == 1:
            model, size, meta, legacy = loaded[0]
        else:
            (model, size, meta), legacy = ensemble(loaded, args.checkpoint), False
        if args.tta_shift:
            if legacy:
                raise ExportError("--tta-shift applies to heartbatch checkpoints only")
            if model.has_masks:
                raise ExportError("--tta-shift averages boxes only; not with a mask head")
            model = ShiftAveraged(model.eval(), size, args.tta_shift)
            meta[C.META_PREPROCESSING] += f"; in-graph average over shifts of 0, +-{args.tta_shift} px in x and y"
    except (ExportError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        export(model, size, meta, args.out, args.opset)
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    source = ("original project, heart only" if legacy else CHECKPOINT_FORMAT
              + (f", {len(loaded)} networks averaged" if len(loaded) > 1 else ""))
    print(f"wrote {args.out} ({source}; boxes {meta[C.META_OUTPUT_LAYOUT]}; input {size}px; "
          f"opset {args.opset}; sha256 {sha256_file(args.out)[:16]})")
    diff = parity(model, args.out, size)
    print(f"parity: max abs difference {diff:.1e} (tolerance {args.tolerance:.0e})")
    if not diff <= args.tolerance:
        print(f"error: onnxruntime and torch disagree by {diff:.3g} > {args.tolerance:g}; "
              f"{args.out} kept for inspection but should not be used", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
