"""`checkpoint-from-onnx`: a training checkpoint rebuilt from an exported model, to fine-tune it.

    checkpoint-from-onnx heartbatch/models/heartbox.onnx --data ../shared/data/cxr-ctr \\
        --split heartbatch/models/heartbox.split.json --out runs/shipped.pt
    heartbatch-train --init runs/shipped.pt ...

A shipped model is an ONNX file (float, or int8 with DequantizeLinear weights); its float
checkpoint may be long gone.  The graph still holds every weight of the box network, with each
BatchNorm folded into the convolution before it.  This rebuilds a :class:`HeartBoxNet`:

- convolution weights and biases dequantized (int8 weights are the shipped ones to within their
  quantization step);
- each BatchNorm unfolded with the statistics of its input on the training images: running mean
  mu and variance var from the data, scale sqrt(var + eps) and shift mu + folded bias, so that the
  network in eval mode computes exactly the folded graph, and in train mode (batch statistics)
  nearly the same: fine-tuning starts where the model is instead of from a BatchNorm shock;
- the training-only mask head (not in the graph) fitted on the frozen features of the training
  images, so that its loss does not tear the features apart in the first steps.

The checkpoint says what it was rebuilt from (``config['recovered_from']``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from heartbatch.labels import LabelError, SplitError, load_labels, read_split

from . import checkpoint
from .datasets import build_dataset, heart_and_lungs
from .engine import evaluate
from .net import HeartBoxNet
from .surgery import SurgeryError, input_size

SEG_FIT_STEPS = 300
STAT_BATCH = 32


class RecoverError(ValueError):
    """The ONNX graph is not a heartbatch box network this module can read back."""


# --- reading the graph -------------------------------------------------------------

def _values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every initializer, and every DequantizeLinear of initializers, as float arrays."""
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not all(n in values for n in node.input[:2]):
            continue
        q = values[node.input[0]].astype(np.float64)
        scale = values[node.input[1]].astype(np.float64)
        zero = values[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
        if np.ndim(scale) == 1 and q.ndim > 1:  # per channel, along the node's axis (default 1)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
        values[node.output[0]] = ((q - zero) * scale).astype(np.float32)
    return values


def module_of(node_name: str, conv_names: list[str]) -> str:
    """The HeartBoxNet module of an exported Conv node: its scope path ends with the module's
    name ("/layer2/layer2.0/downsample/downsample.0/Conv" -> layer2.0.downsample.0)."""
    scopes = [s for s in node_name.split("/") if s][:-1]
    if not scopes:
        raise RecoverError(f"Conv node {node_name!r} carries no module scope")
    last, prefix = scopes[-1], max((s for s in scopes[:-1] if "." in s), key=len, default="")
    found = [n for n in conv_names if (n == last or n.endswith("." + last)) and n.startswith(prefix)]
    if len(found) != 1:
        raise RecoverError(f"Conv node {node_name!r} matches {found or 'no module'} of HeartBoxNet")
    return found[0]


def norm_after(conv: str, norms: set[str]) -> str | None:
    """The BatchNorm that follows a convolution in HeartBoxNet, None when it has its own bias."""
    head, _, last = conv.rpartition(".")
    candidates = [f"{head}.{int(last) + 1}" if last.isdigit() else None,
                  f"{head}.{last.replace('conv', 'bn')}" if last.startswith("conv") else None]
    return next((c for c in candidates if c in norms), None)


def folded_weights(model_path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray | None]], float, float]:
    """({conv module: (weight, bias)}, input mean, input std) read from the graph."""
    graph = onnx.load(str(model_path)).graph
    values = _values(graph)
    probe = HeartBoxNet()
    conv_names = [n for n, m in probe.named_modules() if isinstance(m, torch.nn.Conv2d) and n != "segment"]
    convs = {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        name = module_of(node.name, conv_names)
        if node.input[1] not in values:
            raise RecoverError(f"{model_path}: the weights of {name} are computed, not stored")
        bias = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        convs[name] = (values[node.input[1]], bias)
    missing = sorted(set(conv_names) - set(convs))
    if missing:
        raise RecoverError(f"{model_path}: no weights for {', '.join(missing)}: not a HeartBoxNet export")
    try:
        mean, std = float(values["mean"]), float(values["std"])
    except KeyError:
        raise RecoverError(f"{model_path}: no input normalization (mean, std) in the graph") from None
    return convs, mean, std


# --- rebuilding the network ----------------------------------------------------------

def rebuild(model_path: Path, images: torch.Tensor, masks: torch.Tensor) -> HeartBoxNet:
    """The network of ``model_path`` with BatchNorm unfolded on ``images`` and the mask head fitted
    to ``masks`` (``[N, 3, S, S]``: heart, right lung, left lung, as the data sets hold them); in eval mode."""
    convs, mean, std = folded_weights(model_path)
    model = HeartBoxNet(mean=mean, std=std).eval()
    modules = dict(model.named_modules())
    norms = {n for n, m in modules.items() if isinstance(m, torch.nn.BatchNorm2d)}
    folded_bias = {}
    with torch.no_grad():
        for name, (weight, bias) in convs.items():
            conv = modules[name]
            if tuple(conv.weight.shape) != weight.shape:
                raise RecoverError(f"{model_path}: {name} has shape {weight.shape}, "
                                   f"HeartBoxNet {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(np.array(weight)))
            norm = norm_after(name, norms)
            if norm is None:
                conv.bias.copy_(torch.from_numpy(np.array(bias)))
                continue
            bn = modules[norm]  # identity plus the folded bias until the statistics are known
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(np.array(bias)) if bias is not None else torch.zeros_like(bn.bias))
            folded_bias[norm] = bn.bias.clone()
    stats = _input_statistics(model, [modules[n] for n in sorted(folded_bias)], images)
    with torch.no_grad():
        for norm, (mu, var) in zip(sorted(folded_bias), stats):
            bn = modules[norm]
            bn.running_mean.copy_(mu)
            bn.running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mu + folded_bias[norm])
    fit_segment_head(model, images, masks)
    return model.eval()


@torch.no_grad()
def _input_statistics(model: HeartBoxNet, norms: list, images: torch.Tensor) -> list[tuple]:
    """Per-channel mean and variance of each BatchNorm's input over ``images`` (eval mode)."""
    sums = {id(m): [0.0, 0.0, 0] for m in norms}

    def hook(module, inputs):
        x = inputs[0].double()
        acc = sums[id(module)]
        acc[0] = acc[0] + x.sum((0, 2, 3))
        acc[1] = acc[1] + (x * x).sum((0, 2, 3))
        acc[2] += x.numel() // x.shape[1]

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    try:
        for start in range(0, len(images), STAT_BATCH):
            model(images[start:start + STAT_BATCH])
    finally:
        for h in handles:
            h.remove()
    out = []
    for m in norms:
        s, s2, n = sums[id(m)]
        mu = s / n
        out.append((mu.float(), (s2 / n - mu * mu).clamp(min=0).float()))
    return out


def fit_segment_head(model: HeartBoxNet, images: torch.Tensor, masks: torch.Tensor, steps: int = SEG_FIT_STEPS) -> float:
    """The training-only 1x1 mask head (heart, both lungs) by full-batch Adam on the frozen features;
    its final BCE."""
    with torch.no_grad():
        feats = torch.cat([model.features(images[i:i + STAT_BATCH]) for i in range(0, len(images), STAT_BATCH)])
        target = F.adaptive_avg_pool2d(heart_and_lungs(masks), feats.shape[-2:])
    optimizer = torch.optim.Adam(model.segment.parameters(), lr=0.05)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model.segment(feats), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def checkpoint_state(model: HeartBoxNet, model_path: Path, size: int, split: dict, metrics: dict) -> dict:
    config = {"size": size, "outputs": model.outputs, "mean": float(model.mean), "std": float(model.std),
              "arch": checkpoint.ARCH, "recovered_from": str(model_path),
              "code_version": checkpoint.code_version()}
    return {"format": checkpoint.CHECKPOINT_FORMAT, "model": model.state_dict(), "config": config,
            "epoch": 0, "metrics": metrics, "best_score": float("inf"), "split": split}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="checkpoint-from-onnx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="an exported heartbatch model (float or int8 QDQ)")
    p.add_argument("--data", required=True, help="the labeled images: their training part sets the BatchNorm "
                                                 "statistics and fits the mask head")
    p.add_argument("--labels", help="label CSV for --data")
    p.add_argument("--split", type=Path, required=True, help="split JSON; its training images are used")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (for heartbatch-train --init)")
    args = p.parse_args(argv)
    try:
        size = input_size(onnx.load(str(args.model)))
        items = load_labels(args.data, args.labels)
        split = read_split(args.split, [i.key for i in items])
    except (OSError, ValueError, LabelError, SplitError, SurgeryError,
            onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    by_key = {i.key: i for i in items}
    train = build_dataset([by_key[k] for k in split["train"]], size)
    val = build_dataset([by_key[k] for k in split["val"]], size)
    try:
        model = rebuild(args.model, train.images, train.masks)
    except RecoverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = evaluate(model, val, STAT_BATCH, torch.device("cpu"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(checkpoint_state(model, args.model, size, split, metrics), args.out)
    print(f"{args.model} -> {args.out}: validation heart IoU {metrics['heart_iou_mean']:.4f}, "
          f"CTR MAE {metrics.get('ctr_mae', float('nan')):.4f} ({len(train)} training images set BatchNorm "
          f"and the mask head)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
