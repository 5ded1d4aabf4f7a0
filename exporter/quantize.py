"""`quantize-onnx`: an int8 statically quantized copy of an exported model.

    quantize-onnx heartbox.onnx --data ../shared/data/cxr-ctr \\
        --split runs/default/split.json --out heartbox-int8.onnx
    quantize-onnx old-int8.onnx --requantize --data ../shared/data/cxr-ctr \\
        --split runs/default/split.json --out heartbox-int8.onnx

Convolutions (and the residual additions between them) run in int8 with
per-channel 7-bit weights (so that no CPU's int8 kernels can saturate: see
exporter/saturation.py) and uint8 activations; activation ranges are calibrated
on training images only (the validation split is never seen).  The box head
(the heatmap convolution, softmax and soft-argmax) stays in float: that is where
sub-pixel positions are computed.  ``--requantize`` takes an int8 model written
before (full-range weights, float source gone) and requantizes only its
weights to 7 bits.  The result carries an arithmetic probe (heartbatch.arithmetic);
it is evaluated on the validation split next to the source model in exact
arithmetic, and refused (exit 1) when its heart coordinate error grows by more
than --max-loss-px.  A model that could saturate is never written.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from heartbatch import arithmetic, contract as C
from heartbatch.evaluate import evaluate, predict_items
from heartbatch.images import load_image
from heartbatch.labels import LabelError, SplitError, load_labels, read_split
from heartbatch.model import BoxModel, ContractError
from heartbatch.files import replacing
from heartbatch.pixels import preprocess

from . import onnxfile, probe, props
from .saturation import SaturationError, refuse_saturating, requantize_weights

META_QUANTIZATION = "heartbatch.quantization"


def calibration_batches(paths: list[Path], size: int, batch_size: int = 8):
    """Preprocessed images in batches, as the runtime would feed them."""
    for start in range(0, len(paths), batch_size):
        images = [preprocess(load_image(p), size) for p in paths[start:start + batch_size]]
        yield np.stack(images)[:, None].astype(np.float32)


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes between the output and the nearest convolutions (included): each network's
    heatmap convolution and soft-argmax (every member of an ensemble), kept in float."""
    producer = {out: node for node in model.graph.node for out in node.output}
    head, todo = {}, [o.name for o in model.graph.output]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in head:
            continue
        head[node.name] = node
        if node.op_type != "Conv":
            todo.extend(node.input)
    return [n.name for n in model.graph.node if n.name in head]


def quantize(source: Path, out: Path, batches) -> None:
    """Static QDQ int8 (uint8 activations, 7-bit per-channel weights) with copied metadata."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {C.INPUT_NAME: batch}

    original = onnx.load(str(source))
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        excluded = head_nodes(onnx.load(str(prepared)))
        with replacing(out, suffix=".partial") as partial:
            quantize_static(str(prepared), str(partial), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            op_types_to_quantize=["Conv", "Add", "MaxPool"], nodes_to_exclude=excluded,
                            calibrate_method=CalibrationMethod.MinMax, reduce_range=True)
            quantized = onnx.load(str(partial))
            requantize_weights(quantized)  # reduce_range's symmetric grid reaches +-64: one step beyond 7 bits
            refuse_saturating(quantized, f"the quantized {source.name}")
            props.set_metadata(quantized, props.metadata(original))
            quantized.producer_name = "heartbatch quantize-onnx"
            onnx.save(quantized, str(partial))


def requantize(source: Path, out: Path) -> int:
    """An int8 model's full-range weights requantized to 7 bits, everything else kept."""
    model = onnx.load(str(source))
    changed = requantize_weights(model)
    onnxfile.save(model, out)
    return len(changed)


def update_metadata(path: Path, updates: dict[str, str], probe_images=None) -> None:
    model = onnx.load(str(path))
    props.set_metadata(model, {**props.metadata(model), **updates})
    onnxfile.save(model, path, probe_images)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="quantize-onnx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="float ONNX model written by export-onnx (int8 with --requantize)")
    p.add_argument("--requantize", action="store_true",
                   help="MODEL is an int8 model written before: requantize its weights to 7 bits (no calibration)")
    p.add_argument("--data", required=True, help="labeled images (cxr-ctr layout, or a box CSV with --labels)")
    p.add_argument("--labels", help="label CSV for --data")
    p.add_argument("--split", type=Path,
                   help="split.json from training: calibrate on its 'train' images, evaluate on 'val'")
    p.add_argument("--calibration-images", type=int, default=128)
    p.add_argument("--max-loss-px", type=float, default=0.3,
                   help="refuse the result when heart error (px at 224) grows by more (default 0.3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        source = BoxModel(args.model, start=arithmetic.EXACT)  # the reference: what the source computes
        items = load_labels(args.data, args.labels)
    except (ContractError, LabelError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.split:
        try:
            split = read_split(args.split, [i.key for i in items],
                               hint="quantize with the --data (and --labels) the split was made from")
        except SplitError as exc:
            print(f"error: --split {exc}", file=sys.stderr)
            return 2
        train = [i for i in items if i.key in set(split["train"])]
        val = [i for i in items if i.key in set(split["val"])]
    else:  # no split: calibrate and check on disjoint halves
        shuffled = random.Random(args.seed).sample(items, len(items))
        train, val = shuffled[len(items) // 2:], shuffled[:len(items) // 2]
    if not train or not val:
        print("error: need labeled images for both calibration and evaluation", file=sys.stderr)
        return 2
    size = source.info.input_size
    try:
        films = probe.choose([i.key for i in train])  # before writing anything
        if args.requantize:
            changed = requantize(args.model, args.out)
            how = (f"int8 static (QDQ, per-channel 7-bit weights, uint8 activations): {changed} weights of "
                   f"{args.model.name} ({source.info.model_id}) requantized from 8 to 7 bits, activation "
                   f"ranges kept ({source.info.metadata.get(META_QUANTIZATION, 'as calibrated before')})")
        else:
            chosen = random.Random(args.seed).sample(train, min(args.calibration_images, len(train)))
            quantize(args.model, args.out, calibration_batches([i.image_path for i in chosen], size))
            how = (f"int8 static (QDQ, per-channel 7-bit weights, uint8 activations), calibrated on "
                   f"{len(chosen)} training images; float source {args.model.name} ({source.info.model_id})")
    except (SaturationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    by_key = {i.key: i for i in train}
    probe_images = probe.images([preprocess(load_image(by_key[k].image_path), size) for k in films])
    update_metadata(args.out, {}, probe_images)

    before = evaluate(source, val)
    quantized = BoxModel(args.out)
    after = evaluate(quantized, val)
    exact = predict_items(BoxModel(args.out, start=arithmetic.EXACT), val)
    parity = float(np.abs(predict_items(quantized, val) - exact).max())
    loss = after["heart_mae_px224"] - before["heart_mae_px224"]
    update_metadata(args.out, {
        META_QUANTIZATION: f"{how}; heart error {loss:+.3f} px at 224 on {len(val)} validation images",
        C.META_VALIDATION: json.dumps(props.json_safe(after), sort_keys=True),
    })
    print(f"{'':24}{'source':>10}{'int8':>10}   (source in exact arithmetic; int8 as this CPU runs it: "
          f"{quantized.arithmetic.mode})")
    for key in ("heart_iou_mean", "heart_mae_px224", "thorax_iou_mean", "ctr_mae"):
        print(f"{key:24}{before.get(key, float('nan')):10.4f}{after.get(key, float('nan')):10.4f}")
    print(f"this CPU ({arithmetic.cpu().describe()}) vs exact arithmetic on {len(val)} validation films: "
          f"largest box difference {parity:.5f} of the image")
    print(f"heart error change {loss:+.3f} px (limit {args.max_loss_px}); wrote {args.out}")
    if loss > args.max_loss_px:
        print(f"error: int8 costs {loss:.3f} px of heart accuracy (> {args.max_loss_px}); "
              f"{args.out} kept for inspection but should not be shipped", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
