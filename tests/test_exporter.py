"""Training, ONNX export and label parsing: real torch, real onnxruntime, real files.

Kept small (a handful of images, tiny sizes, one export per model kind) so the
suite stays fast while still training, exporting and running actual models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import resnet18

from dicom_factory import write_dicom
from split_cases import assert_refused, bad_splits, write_split
from exporter import export
from exporter.datasets import build_dataset, split_keys
from exporter.engine import SEG_WEIGHT, box_loss, seg_loss, train_one_epoch
from exporter.net import HeartBoxNet
from exporter.checkpoint import CHECKPOINT_FORMAT
import heartbatch
from heartbatch import contract as C
from heartbatch.labels import (LEGACY_SIZE, from_box_csv, from_legacy_labels, from_mask_folder,
                               load_labels)
from heartbatch.model import BoxModel
from heartbatch.images import load_image
from heartbatch.pixels import PIPELINE_VERSION, preprocess


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


# --- training -----------------------------------------------------------------

def test_a_few_steps_lower_the_loss(data_dir):
    """The whole loop (dataset, engine, net) learns: a broken gradient path would not."""
    torch.manual_seed(0)
    items = load_labels(data_dir / "cxr-ctr")
    data = build_dataset(items[:4] + items[-4:], size=64)  # Wingspan films of three sites, dark and bright
    model = HeartBoxNet(mean=data.images.mean().item(), std=data.images.std().item(), width=32)

    def loss() -> float:
        with torch.no_grad():  # train mode: BatchNorm uses batch statistics, as in training
            pred, seg = model.forward_train(data.images)
            return (box_loss(pred, data.boxes) + SEG_WEIGHT * seg_loss(seg, data.masks, data.real_masks)).item()

    before = loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(4):  # 2 steps per epoch
        stats = train_one_epoch(model, data, optimizer, None, gen, batch_size=4,
                                device=torch.device("cpu"), augment=None)
        assert math.isfinite(stats["loss"])
    after = loss()
    assert after < 0.6 * before, (before, after)


def test_heart_iou_loss_by_hand():
    """Heart boxes [0,0,.5,.5] vs [.25,.25,.75,.75]: overlap .0625, union .4375, IoU 1/7;
    the IoU term adds weight x (1 - IoU) and pulls the predicted box toward the target."""
    from exporter.engine import heart_iou

    nan4 = [math.nan] * 4
    pred = torch.tensor([[0.0, 0.0, 0.5, 0.5, *nan4]], requires_grad=True)
    target = torch.tensor([[0.25, 0.25, 0.75, 0.75, *nan4]])
    assert heart_iou(pred, target).item() == pytest.approx(1 / 7)
    plain = box_loss(pred.detach().nan_to_num(), target)
    with_iou = box_loss(pred.nan_to_num(), target, iou_weight=2.0)
    assert with_iou.item() == pytest.approx(plain.item() + 2.0 * (1 - 1 / 7), rel=1e-6)
    (box_loss(pred.nan_to_num(), target, iou_weight=1.0) - box_loss(pred.nan_to_num(), target)).backward()
    grad = pred.grad[0, :4]
    assert grad[0] < 0 and grad[1] < 0 and grad[2] < 0 and grad[3] < 0  # every edge moves toward the target


# --- export --------------------------------------------------------------------

def _trainer_checkpoint(path, size=224, mean=0.47, std=0.23, seed=1):
    torch.manual_seed(seed)
    model = HeartBoxNet(mean=mean, std=std)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval-mode export matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    metrics = {"n": 2, "heart_iou_mean": 0.8, "ctr_mae": math.nan}
    config = {"size": size, "outputs": 8, "mean": mean, "std": std, "arch": "resnet18-fpn-softargmax",
              "data": "cxr-ctr", "labels": None, "seed": 3, "epochs": 5, "batch_size": 4, "lr": 1e-3,
              "train_images": 6, "val_images": 2, "code_version": "heartbatch test"}
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": config,
                "metrics": metrics, "epoch": 4, "train_seconds": 1.0}, path)
    return model.eval()


def test_export_trainer_checkpoint(tmp_path, capsys):
    ckpt, out = tmp_path / "best.pt", tmp_path / "model.onnx"
    model = _trainer_checkpoint(ckpt)

    assert export.main([str(ckpt), "--out", str(out)]) == 0
    assert "parity: max abs difference" in capsys.readouterr().out

    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == [C.INPUT_NAME]
    assert [o.name for o in graph.output] == [C.OUTPUT_NAME]
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(graph.input[0]) == ["batch", 1, 224, 224]
    assert dims(graph.output[0]) == ["batch", 8]

    meta = _metadata(out)
    for key in C.REQUIRED_METADATA + (C.META_PIXELS_VERSION, C.META_NORMALIZATION, C.META_SOURCE):
        assert meta.get(key), key
    assert meta[C.META_INPUT_SIZE] == "224"
    assert meta[C.META_OUTPUT_LAYOUT] == C.OUTPUT_LAYOUTS[8]
    assert meta[C.META_PIXELS_VERSION] == PIPELINE_VERSION
    assert meta[C.META_CODE_VERSION] == "heartbatch test"
    assert json.loads(meta[C.META_VALIDATION]) == {"n": 2, "heart_iou_mean": 0.8, "ctr_mae": None}
    assert "6 training / 2 validation" in meta[C.META_TRAINING_DATA]
    assert meta[C.META_SOURCE].startswith("best.pt sha256:")

    session = _session(out)
    gen = torch.Generator().manual_seed(5)
    for n in (1, 4):  # dynamic batch
        x = torch.rand(n, 1, 224, 224, generator=gen)
        (got,) = session.run([C.OUTPUT_NAME], {C.INPUT_NAME: x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == (n, 8)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    info = BoxModel(out).info  # the runtime accepts it
    assert (info.input_size, info.outputs) == (224, 8)


def test_export_with_shift_averaging(tmp_path, capsys):
    """--tta-shift: the graph averages the model over the image and 4 shifted copies, each
    prediction shifted back; onnxruntime must agree with that torch computation."""
    from exporter.export import ShiftAveraged

    ckpt, out = tmp_path / "best.pt", tmp_path / "tta.onnx"
    model = _trainer_checkpoint(ckpt)
    assert export.main([str(ckpt), "--out", str(out), "--tta-shift", "4"]) == 0
    assert "in-graph average over shifts" in _metadata(out)[C.META_PREPROCESSING]
    x = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(2))
    (got,) = _session(out).run([C.OUTPUT_NAME], {C.INPUT_NAME: x.numpy()})
    with torch.no_grad():
        manual = torch.stack([model(x)] + [
            model(torch.nn.functional.pad(x, (4, 4, 4, 4), mode="replicate")[:, :, 4 - dy:228 - dy, 4 - dx:228 - dx])
            - torch.tensor([dx, dy] * 4) / 224
            for dx, dy in ((4, 0), (-4, 0), (0, 4), (0, -4))]).mean(0)
        np.testing.assert_allclose(got, manual.numpy(), atol=1e-4)
        np.testing.assert_allclose(ShiftAveraged(model, 224, 4)(x).numpy(), manual.numpy(), atol=1e-6)


def test_export_ensemble_averages_the_networks(tmp_path, capsys):
    """Two checkpoints -> one graph whose boxes are the mean of the two networks' boxes; the
    metadata names both; both heatmap heads stay float for quantization."""
    from exporter.quantize import head_nodes

    a, b, out = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "ensemble.onnx"
    net_a, net_b = _trainer_checkpoint(a, seed=1), _trainer_checkpoint(b, mean=0.5, seed=2)
    assert export.main([str(a), str(b), "--out", str(out)]) == 0
    assert "2 networks averaged" in capsys.readouterr().out

    x = torch.rand(3, 1, 224, 224, generator=torch.Generator().manual_seed(4))
    (got,) = _session(out).run([C.OUTPUT_NAME], {C.INPUT_NAME: x.numpy()})
    with torch.no_grad():
        one, two = net_a(x).numpy(), net_b(x).numpy()
    assert np.abs(one - two).max() > 1e-3  # different networks, so the average is a real test
    np.testing.assert_allclose(got, (one + two) / 2, atol=1e-4, rtol=0)

    meta = _metadata(out)
    assert meta[C.META_TRAINING_DATA].startswith("average of 2 networks")
    assert meta[C.META_SOURCE].startswith("a.pt sha256:") and " + b.pt sha256:" in meta[C.META_SOURCE]
    assert "mean=0.47" in meta[C.META_NORMALIZATION] and "mean=0.5" in meta[C.META_NORMALIZATION]
    assert json.loads(meta[C.META_VALIDATION]) == {}
    assert BoxModel(out).info.outputs == 8

    graph = onnx.load(str(out)).graph
    kept = set(head_nodes(onnx.load(str(out))))
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len([n for n in convs if n.name in kept]) == 2  # one heatmap convolution per network
    assert len(convs) > 2 * 20  # both backbones are in the graph


def test_export_ensemble_refuses_mismatched_members(tmp_path, capsys):
    a, b = tmp_path / "a.pt", tmp_path / "b256.pt"
    _trainer_checkpoint(a)
    _trainer_checkpoint(b, size=256)
    assert export.main([str(a), str(b), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "b256.pt: 256px" in err and "one input size" in err
    assert not (tmp_path / "x.onnx").exists()


class _OriginalModule(nn.Module):
    """State-dict layout of the original Lightning module: the ResNet is attribute ``model``."""

    def __init__(self):
        super().__init__()
        self.model = resnet18(weights=None)
        self.model.conv1 = nn.Conv2d(1, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=False)
        self.model.fc = nn.Linear(in_features=512, out_features=4)
        self.loss_fn = nn.MSELoss()


def test_convert_original_lightning_checkpoint(tmp_path, capsys):
    torch.manual_seed(2)
    original = _OriginalModule()
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        original.model.fc.bias.copy_(torch.tensor([80.0, 60.0, 150.0, 170.0]))  # plausible 224-px box
    ckpt, out = tmp_path / "epoch=49-step=1999.ckpt", tmp_path / "legacy.onnx"
    torch.save({"epoch": 49, "global_step": 1999, "pytorch-lightning_version": "1.5.10",
                "state_dict": original.state_dict(), "callbacks": {}, "optimizer_states": [],
                "lr_schedulers": []}, ckpt)

    # an impossible tolerance fails the parity check but keeps the file for inspection
    assert export.main([str(ckpt), "--out", str(out), "--tolerance", "1e-12"]) == 1
    assert out.is_file() and "kept for inspection" in capsys.readouterr().err
    assert export.main([str(ckpt), "--out", str(out)]) == 0  # detected without --legacy
    assert "parity:" in capsys.readouterr().out

    x = torch.rand(3, 1, 224, 224, generator=torch.Generator().manual_seed(7))
    original.eval()
    with torch.no_grad():
        expected = original.model((x - 0.494) / 0.252).numpy() / 224
    (got,) = _session(out).run([C.OUTPUT_NAME], {C.INPUT_NAME: x.numpy()})
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got * 224, expected * 224, atol=1e-3, rtol=0)  # within 0.001 px

    meta = _metadata(out)
    assert meta[C.META_OUTPUT_LAYOUT] == C.OUTPUT_LAYOUTS[4]
    assert meta[C.META_INPUT_SIZE] == "224"
    assert meta[C.META_VALIDATION] == "{}"
    assert meta[C.META_TRAINING_DATA] == "original project checkpoint (RSNA heart detection)"
    assert "mean=0.494,std=0.252" in meta[C.META_NORMALIZATION]
    assert "1.5.10" in meta[C.META_CODE_VERSION]
    assert BoxModel(out).info.outputs == 4


def test_export_errors_are_short(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert export.main([str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert export.main([str(tmp_path / "junk.pt"), "--out", str(out)]) == 2
    torch.save({"format": "heartbatch-checkpoint/99"}, tmp_path / "future.pt")
    assert export.main([str(tmp_path / "future.pt"), "--out", str(out)]) == 2
    torch.save({"weights": {}}, tmp_path / "other.pt")
    assert export.main([str(tmp_path / "other.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "not supported" in err and "unknown checkpoint layout" in err
    assert "Traceback" not in err and not out.exists()


# --- label formats -------------------------------------------------------------

def _png(path, rows, cols, boxes=(), value=255):
    """A greyscale PNG with filled rectangles given as exclusive-edge (x0, y0, x1, y1)."""
    img = np.zeros((rows, cols), np.uint8)
    for x0, y0, x1, y1 in boxes:
        img[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return img


def test_mask_folder_boxes_and_expert_ctr(tmp_path):
    root, rows, cols = tmp_path / "cxr", 40, 50
    for name in ("a.png", "b.png"):
        folder = root / "site"
        _png(folder / "png" / name, rows, cols, [(0, 0, cols, rows)], value=90)
        heart = _png(folder / "mask" / "heart" / name, rows, cols, [(15, 10, 30, 25)])
        heart[0, 0] = 100  # anti-aliased edge below the threshold is not heart
        Image.fromarray(heart).save(folder / "mask" / "heart" / name)
        _png(folder / "mask" / "left_lung" / name, rows, cols, [(5, 5, 20, 35)])
        _png(folder / "mask" / "right_lung" / name, rows, cols, [(30, 6, 45, 36)])
    (root / "ctr_ground_truth.csv").write_text("id,ctr\na.png,0.42\n")

    items = {i.key: i for i in load_labels(root)}
    assert set(items) == {"site/a.png", "site/b.png"}
    a = items["site/a.png"]
    assert a.heart == (15 / cols, 10 / rows, 30 / cols, 25 / rows)
    assert a.thorax == (5 / cols, 5 / rows, 45 / cols, 36 / rows)
    assert a.expert_ctr == 0.42
    assert math.isnan(items["site/b.png"].expert_ctr)
    assert a.image_path == root / "site" / "png" / "a.png"
    assert from_mask_folder(root)[0].boxes.shape == (8,)


def test_original_label_file(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_dicom(images / "0a1b-patient.dcm", np.full((64, 64), 100, np.uint16), bits_stored=12)
    _png(images / "other.png", 32, 32)
    labels = tmp_path / "rsna_heart_detection.csv"
    labels.write_text("label,x0,y0,w,h,name,img_shape_x,img_shape_y\n"
                      "heart,91,71,77,102,0a1b-patient,1024,1024\n"
                      "heart,80.5,60,90,100.25,other,1024,1024\n")

    items = load_labels(images, labels)
    assert items == from_legacy_labels(labels, images)
    assert [i.image_path.name for i in items] == ["0a1b-patient.dcm", "other.png"]
    assert items[0].heart == (91 / LEGACY_SIZE, 71 / LEGACY_SIZE, 168 / LEGACY_SIZE, 173 / LEGACY_SIZE)
    assert items[1].heart == (80.5 / 224, 60 / 224, 170.5 / 224, 160.25 / 224)
    assert all(math.isnan(v) for i in items for v in i.thorax)
    assert all(math.isnan(i.expert_ctr) for i in items)


def test_box_csv_pixels_non_square(tmp_path):
    _png(tmp_path / "img" / "wide.png", 40, 60)            # rows 40, columns 60
    write_dicom(tmp_path / "img" / "tall.dcm", np.zeros((80, 50), np.uint16), bits_stored=12)
    full = tmp_path / "boxes.csv"
    full.write_text("path,heart_x0,heart_y0,heart_x1,heart_y1,thorax_x0,thorax_y0,thorax_x1,thorax_y1\n"
                    "img/wide.png,12,8,30,20,6,4,54,36\n"
                    "img/tall.dcm,10,40,25,60,,,,\n")
    wide, tall = load_labels(full)
    assert wide.heart == (12 / 60, 8 / 40, 30 / 60, 20 / 40)
    assert wide.thorax == (6 / 60, 4 / 40, 54 / 60, 36 / 40)
    assert tall.heart == (10 / 50, 40 / 80, 25 / 50, 60 / 80)  # size from the DICOM header
    assert all(math.isnan(v) for v in tall.thorax)

    heart_only = tmp_path / "heart.csv"
    heart_only.write_text("path,heart_x0,heart_y0,heart_x1,heart_y1\nwide.png,12,8,30,20\n")
    (item,) = load_labels(tmp_path / "img", heart_only)  # relative to the data folder
    assert item.heart == wide.heart and all(math.isnan(v) for v in item.thorax)
    assert from_box_csv(heart_only, base=tmp_path / "img")[0].heart == wide.heart


#: the fixture source the tiny training folders link (the only one in tests/fixtures/data: JSRT may not be
#: redistributed, and quantize-onnx records probe films of a redistributable source in the model it writes)
_TINY_SOURCE = "wingspan"
#: a key of every tiny folder: its first film
_TINY_FIRST = f"{_TINY_SOURCE}/" + min(
    (p.name for p in (Path(__file__).parent / "fixtures" / "data" / "cxr-ctr" / _TINY_SOURCE / "png").glob("*.png")),
    default="fixtures-missing.png")


def _tiny_mask_folder(data_dir, tmp_path, n=6):
    """A cxr-ctr-layout folder of links to the first ``n`` fixture Wingspan films and their masks
    (no expert CTR file: box labels only)."""
    src = data_dir / "cxr-ctr" / _TINY_SOURCE
    root = tmp_path / "cxr" / _TINY_SOURCE
    for sub in ("png", "mask/heart", "mask/left_lung", "mask/right_lung"):
        (root / sub).mkdir(parents=True)
        for image in sorted((src / "png").glob("*.png"))[:n]:
            (root / sub / image.name).symlink_to(src / sub / image.name)
    return tmp_path / "cxr"


def test_weight_averaging_run(data_dir, tmp_path):
    """--average-from: constant lr from epoch K, the average saved with exact BatchNorm statistics."""
    from exporter import train

    out = tmp_path / "run"
    rc = train.main(["--data", str(_tiny_mask_folder(data_dir, tmp_path)), "--out", str(out),
                     "--size", "64", "--epochs", "3", "--batch-size", "4", "--val-fraction", "0.34",
                     "--average-from", "2", "--average-lr", "3e-4", "--threads", "1"])
    assert rc == 0
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[1:] == [3e-4, 3e-4] and lrs[0] != 3e-4
    last = torch.load(out / "last.pt", weights_only=False)
    avg = torch.load(out / "averaged.pt", weights_only=False)
    assert avg["averaged_epochs"] == 2 and last["averaged"]["n_averaged"].item() == 2
    assert math.isfinite(avg["metrics"]["heart_iou_mean"])

    # The stem's BatchNorm mean is the exact mean of conv1's output over the training images.
    net = HeartBoxNet(mean=avg["config"]["mean"], std=avg["config"]["std"])
    net.load_state_dict(avg["model"])
    items = {i.key: i for i in load_labels(tmp_path / "cxr")}
    images = build_dataset([items[k] for k in avg["split"]["train"]], 64).images
    with torch.no_grad():
        conv = net.stem[0]((images - net.mean) / net.std)
    np.testing.assert_allclose(net.stem[1].running_mean.numpy(), conv.mean((0, 2, 3)).numpy(), atol=1e-5)
    assert not torch.allclose(avg["model"]["stem.1.running_mean"], last["model"]["stem.1.running_mean"])

    # Resuming a finished averaged run keeps the average it had.
    assert train.main(["--data", str(tmp_path / "cxr"), "--out", str(out), "--size", "64", "--epochs", "3",
                       "--batch-size", "4", "--average-from", "2", "--resume", str(out / "last.pt")]) == 0



def test_augmentation_strength_flags(data_dir, tmp_path, monkeypatch):
    """--aug-* reach the augmentation of every epoch and are recorded in the checkpoint."""
    from exporter import engine, train

    seen = []
    real = engine.train_one_epoch

    def spy(model, data, optimizer, scheduler, gen, batch_size, device, augment, **kw):
        seen.append(augment)
        return real(model, data, optimizer, scheduler, gen, batch_size, device, augment, **kw)

    monkeypatch.setattr(engine, "train_one_epoch", spy)
    out = tmp_path / "run"
    assert train.main(["--data", str(_tiny_mask_folder(data_dir, tmp_path, n=4)), "--out", str(out),
                       "--size", "64", "--epochs", "2", "--batch-size", "4", "--threads", "1",
                       "--aug-scale", "0.8", "1.2", "--aug-rotate", "12", "--aug-translate", "0.1"]) == 0
    assert [(a.scale, a.rotate_deg, a.translate) for a in seen] == [((0.8, 1.2), 12.0, 0.1)] * 2
    config = torch.load(out / "last.pt", weights_only=False)["config"]
    assert config["augment"] == {"scale": [0.8, 1.2], "rotate_deg": 12.0, "translate": 0.1}

    seen.clear()
    assert train.main(["--data", str(tmp_path / "cxr"), "--out", str(tmp_path / "plain"), "--size", "64",
                       "--epochs", "1", "--batch-size", "4", "--threads", "1", "--no-augment"]) == 0
    assert seen == [None]
    assert torch.load(tmp_path / "plain" / "last.pt", weights_only=False)["config"]["augment"] is None


def test_ward_flag_reaches_the_training_batches(data_dir, tmp_path, monkeypatch, capsys):
    """--ward P: every training sample (P = 1) gets corrupt.ward on its image and masks, from a generator
    seeded by seed, epoch and image, before the affine; recorded in the checkpoint; off by default."""
    from exporter import corrupt, train

    calls = []
    real_ward = corrupt.ward

    def spy(image, masks, rng, n=None):
        out = real_ward(image, masks, rng, n)
        calls.append((image.shape, masks.shape, out[0].copy()))
        return out

    monkeypatch.setattr(corrupt, "ward", spy)
    data = _tiny_mask_folder(data_dir, tmp_path, n=4)
    common = ["--data", str(data), "--size", "64", "--epochs", "2", "--batch-size", "4", "--threads", "1"]
    assert train.main([*common, "--out", str(tmp_path / "a"), "--ward", "1"]) == 0
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    n_train = len(state["split"]["train"])
    assert len(calls) == 2 * n_train and all(c[:2] == ((64, 64), (3, 64, 64)) for c in calls)
    assert state["config"]["ward"] == 1.0
    assert state["config"]["augment"] == {"scale": [0.9, 1.1], "rotate_deg": 7.0, "translate": 0.05}
    first = calls[:]

    calls.clear()  # the same seed: the same corrupted films, epoch by epoch
    assert train.main([*common, "--out", str(tmp_path / "b"), "--ward", "1"]) == 0
    assert len(calls) == len(first)
    assert sorted(c[2].tobytes() for c in calls) == sorted(c[2].tobytes() for c in first)

    calls.clear()  # default: off, nothing corrupted, recorded as 0
    assert train.main([*common, "--out", str(tmp_path / "c"), "--epochs", "1"]) == 0
    assert calls == [] and torch.load(tmp_path / "c" / "last.pt", weights_only=False)["config"]["ward"] == 0.0

    for bad in (["--ward", "1.5"], ["--ward", "0.5", "--no-augment"]):
        assert train.main([*common, "--out", str(tmp_path / "d"), *bad]) == 2
        assert "--ward" in " ".join(capsys.readouterr().err.split())
    assert calls == []



def test_shared_split_across_seeds(data_dir, tmp_path, capsys):
    """--split: a second seed holds out the same images; a conflicting or foreign split is refused."""
    from exporter import train

    data = _tiny_mask_folder(data_dir, tmp_path, n=6)
    common = ["--data", str(data), "--size", "64", "--epochs", "1", "--batch-size", "4", "--threads", "1",
              "--val-fraction", "0.34"]
    assert train.main([*common, "--out", str(tmp_path / "a"), "--seed", "0"]) == 0
    first = json.loads((tmp_path / "a" / "split.json").read_text())
    assert train.main([*common, "--out", str(tmp_path / "b"), "--seed", "5",
                       "--split", str(tmp_path / "a" / "split.json")]) == 0
    assert json.loads((tmp_path / "b" / "split.json").read_text()) == first
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["split"] == first

    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps({"train": first["val"], "val": first["train"]}))
    assert train.main([*common, "--out", str(tmp_path / "b"), "--split", str(swapped)]) == 2
    assert "different split" in " ".join(capsys.readouterr().err.split())
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"train": [f"{_TINY_SOURCE}/NOPE.png"], "val": first["val"]}))
    assert train.main([*common, "--out", str(tmp_path / "c"), "--split", str(foreign)]) == 2
    assert "not in the data" in " ".join(capsys.readouterr().err.split())
    foreign.write_text("[1, 2]")
    assert train.main([*common, "--out", str(tmp_path / "c"), "--split", str(foreign)]) == 2
    assert "not a split file" in " ".join(capsys.readouterr().err.split())



def test_shipped_split_is_the_seed_0_split(full_data_dir):
    """The model card's validation split is the one heartbatch-train --seed 0 draws, so it can be remade."""
    shipped = json.loads((Path(heartbatch.__file__).parent / "models" / "heartbox.split.json").read_text())
    keys = [item.key for item in load_labels(full_data_dir / "cxr-ctr")]
    assert shipped == split_keys(keys, 0.15, 0)
    assert len(shipped["val"]) == 67 and len(shipped["train"]) == 379
    assert not set(shipped["val"]) & set(shipped["train"])


# --- int8 quantization ----------------------------------------------------------

def test_quantize_exported_model(data_dir, tmp_path, capsys):
    """export-onnx then quantize-onnx: int8 convolutions, float head, same contract,
    calibrated on training images only, and the accuracy gate refuses a loss."""
    from exporter import quantize

    ckpt, float_path, int8_path = tmp_path / "best.pt", tmp_path / "model.onnx", tmp_path / "int8.onnx"
    _trainer_checkpoint(ckpt)
    assert export.main([str(ckpt), "--out", str(float_path)]) == 0
    data = _tiny_mask_folder(data_dir, tmp_path, n=8)
    keys = sorted(i.key for i in load_labels(data))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": keys[:5], "val": keys[5:]}))

    args = [str(float_path), "--data", str(data), "--split", str(split), "--calibration-images", "4",
            "--out", str(int8_path)]
    assert quantize.main(args) == 0
    assert "heart error change" in capsys.readouterr().out

    graph = onnx.load(str(int8_path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 20  # the backbone's convolutions
    from exporter.saturation import SAFE_WEIGHT, saturation_risks

    assert saturation_risks(onnx.load(str(int8_path))) == []  # 7-bit weights: no CPU's kernels saturate
    assert max(int(np.abs(onnx.numpy_helper.to_array(i).astype(int)).max()) for i in int8_weights) <= SAFE_WEIGHT
    produced_by = {o: n for n in graph.node for o in n.output}
    head = [n for n in graph.node if n.op_type == "Conv"][-1]
    assert head.input[1] not in produced_by or produced_by[head.input[1]].op_type != "DequantizeLinear"

    meta, source_meta = _metadata(int8_path), _metadata(float_path)
    assert meta[C.META_SOURCE] == source_meta[C.META_SOURCE]
    assert "calibrated on 4 training images" in meta[quantize.META_QUANTIZATION]
    assert json.loads(meta[C.META_VALIDATION])["n"] == 3

    images = np.stack([preprocess(load_image(data / k.replace("/", "/png/")), 224) for k in keys])
    a, b = BoxModel(float_path).predict(images), BoxModel(int8_path).predict(images)
    assert np.abs(a - b).max() * 224 < 3.0  # px at 224

    refused = tmp_path / "refused.onnx"
    assert quantize.main(args[:-1] + [str(refused), "--max-loss-px", "-1"]) == 1
    assert "should not be shipped" in capsys.readouterr().err


# --- non-finite losses, split files, the metrics log ------------------------------

def test_non_finite_loss_stops_before_any_step(data_dir):
    """A NaN loss raises before optimizer.step() and scheduler.step(): the weights, Adam's
    moments and the schedule are still those of the last good step (a NaN step poisons them)."""
    from exporter.engine import NonFiniteLoss

    torch.manual_seed(0)
    data = build_dataset(load_labels(data_dir / "cxr-ctr")[:4], size=64)
    data.images[2, 0, 10, 10] = math.nan  # one bad pixel: the whole batch's loss is NaN
    model = HeartBoxNet(mean=0.5, std=0.25, width=32)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=10)
    with pytest.raises(NonFiniteLoss, match="not finite"):
        train_one_epoch(model, data, optimizer, scheduler, torch.Generator().manual_seed(0), batch_size=4,
                        device=torch.device("cpu"), augment=None)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name]), f"{name} was stepped on a NaN loss"
    assert optimizer.state_dict()["state"] == {}, "the optimizer stepped"
    assert scheduler.last_epoch == 0, "the schedule advanced"


def _open_paths() -> list[str]:
    paths = []
    for fd in Path("/proc/self/fd").iterdir() if Path("/proc/self/fd").is_dir() else []:
        try:
            paths.append(str(fd.readlink()))
        except OSError:
            pass
    return paths


def test_train_stops_on_a_non_finite_loss_with_a_clear_error(data_dir, tmp_path, monkeypatch, capsys):
    """Epoch 2's loss turns NaN: exit 1 with what happened and what to do on stderr, epoch 1's
    checkpoint and metrics line kept as they were, and metrics.jsonl closed."""
    from exporter import engine, train

    calls = []
    real = engine.box_loss

    def nan_from_epoch_2(pred, target, iou_weight=0.0):
        calls.append(1)
        loss = real(pred, target, iou_weight)
        return loss * math.nan if len(calls) > 1 else loss  # one step per epoch here

    monkeypatch.setattr(engine, "box_loss", nan_from_epoch_2)
    out = tmp_path / "run"
    rc = train.main(["--data", str(_tiny_mask_folder(data_dir, tmp_path, n=6)), "--out", str(out), "--size", "64",
                     "--epochs", "3", "--batch-size", "4", "--val-fraction", "0.34", "--threads", "1",
                     "--lr", "1e-3"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 1, err
    assert "epoch 2: training loss is not finite" in err and "weights were not updated" in err, err
    assert "last.pt holds epoch 1" in err and "Lower --lr" in err, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    last = torch.load(out / "last.pt", weights_only=False)
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not [p for p in _open_paths() if p.endswith("metrics.jsonl")], "metrics.jsonl left open"


def test_metrics_log_is_closed_after_training(data_dir, tmp_path):
    from exporter import train

    out = tmp_path / "run"
    assert train.main(["--data", str(_tiny_mask_folder(data_dir, tmp_path, n=4)), "--out", str(out), "--size", "64",
                       "--epochs", "1", "--batch-size", "4", "--threads", "1", "--no-augment"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not [p for p in _open_paths() if p.endswith("metrics.jsonl")], "metrics.jsonl left open"




def test_train_split_that_is_not_json_is_refused(data_dir, tmp_path, capsys):
    from exporter import train

    bad = tmp_path / "split.json"
    bad.write_text("{not json")
    assert train.main(["--data", str(_tiny_mask_folder(data_dir, tmp_path, n=4)), "--out", str(tmp_path / "run"),
                       "--split", str(bad), "--size", "64", "--epochs", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(bad) in err and "not JSON" in err, err


def test_train_refuses_a_missing_checkpoint(data_dir, tmp_path, capsys):
    """--resume or --init naming no file: exit 2 with the path, not a traceback."""
    from exporter import train

    data = _tiny_mask_folder(data_dir, tmp_path, n=4)
    for flag in ("--resume", "--init"):
        missing = tmp_path / f"{flag[2:]}.pt"
        assert train.main(["--data", str(data), "--out", str(tmp_path / "run"), "--size", "64", "--epochs", "1",
                           flag, str(missing)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{missing}: checkpoint not found" in err, err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("content, says", bad_splits(_TINY_FIRST))
def test_quantize_refuses_a_bad_split_file(data_dir, tmp_path, capsys, content, says):
    """Exit 2, the file and what is wrong on stderr, nothing written: never 'internal error'."""
    import onnx_models as M
    from exporter import quantize

    model = M.constant_box_model(tmp_path / "const.onnx")
    split = write_split(tmp_path / "split.json", content)
    out = tmp_path / "int8.onnx"
    rc = quantize.main([str(model), "--data", str(_tiny_mask_folder(data_dir, tmp_path, n=4)), "--split", str(split),
                        "--out", str(out)])
    assert_refused(rc, capsys, split, says)
    assert not out.exists()
