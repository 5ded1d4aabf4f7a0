"""Adapting the network to real ward films: a checkpoint rebuilt from a shipped ONNX model
(checkpoint-from-onnx), consistency training on unlabeled ward films (--ward-films), and the
corruptions that leave the anatomy in place."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exporter import corrupt, engine, export, quantize, recover, train
from exporter.augment import AugmentConfig, consistency_views, random_affine, warp
from exporter.datasets import build_dataset, heart_and_lungs
from heartbatch.labels import load_labels
from heartbatch.model import BoxModel
from test_exporter import _tiny_mask_folder, _trainer_checkpoint
from test_ward import _ward_folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_dir):
    """A trainer checkpoint with non-trivial BatchNorm, its float export, its int8 export, and
    training films to rebuild it on."""
    tmp = tmp_path_factory.mktemp("recover")
    ckpt, float_path, int8_path = tmp / "best.pt", tmp / "model.onnx", tmp / "int8.onnx"
    model = _trainer_checkpoint(ckpt)
    assert export.main([str(ckpt), "--out", str(float_path)]) == 0
    data = _tiny_mask_folder(data_dir, tmp, n=8)
    keys = sorted(i.key for i in load_labels(data))
    split = tmp / "split.json"
    split.write_text(json.dumps({"train": keys[:6], "val": keys[6:]}))
    assert quantize.main([str(float_path), "--data", str(data), "--split", str(split), "--calibration-images", "4",
                          "--max-loss-px", "1000", "--out", str(int8_path)]) == 0
    films = build_dataset(load_labels(data), 224)
    return {"model": model, "float": float_path, "int8": int8_path, "data": data, "split": split, "films": films}


def test_rebuilt_network_computes_the_exported_graph(exported):
    """Float export -> HeartBoxNet: eval mode gives the graph's boxes; BatchNorm's statistics are those
    of the films it was rebuilt on, so train mode on those films gives the same boxes too."""
    films = exported["films"]
    rebuilt = recover.rebuild(exported["float"], films.images, films.masks)
    with torch.no_grad():
        expected = exported["model"].eval()(films.images)
        got = rebuilt.eval()(films.images)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=2e-5)
        trained = rebuilt.train()(films.images)  # batch statistics = the stored ones
    np.testing.assert_allclose(trained.numpy(), expected.numpy(), atol=2e-4)
    norms = [m for m in rebuilt.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 22 and all(float(m.running_var.min()) > 0 for m in norms)


def test_mask_head_is_fitted_on_the_frozen_features(exported):
    films = exported["films"]
    rebuilt = recover.rebuild(exported["float"], films.images, films.masks)
    fresh = recover.HeartBoxNet(mean=float(rebuilt.mean), std=float(rebuilt.std))
    with torch.no_grad():
        feats = rebuilt.eval().features(films.images)
        target = torch.nn.functional.adaptive_avg_pool2d(heart_and_lungs(films.masks), feats.shape[-2:])
        bce = lambda head: torch.nn.functional.binary_cross_entropy_with_logits(head(feats), target).item()  # noqa: E731
        assert bce(rebuilt.segment) < 0.5 * bce(fresh.segment)


def test_rebuilt_from_int8_is_within_its_quantization(exported):
    """An int8 QDQ model's dequantized weights give its boxes to within the quantization error."""
    films = exported["films"]
    rebuilt = recover.rebuild(exported["int8"], films.images, films.masks).eval()
    with torch.no_grad():
        got = rebuilt(films.images).numpy()
        floating = exported["model"].eval()(films.images).numpy()
    int8 = BoxModel(exported["int8"]).predict(films.images[:, 0].numpy())
    assert np.abs(got - int8).max() * 224 < 3.0
    assert np.abs(got - int8).max() <= np.abs(floating - int8).max() + 2 / 224


def test_checkpoint_from_onnx_then_fine_tune(exported, tmp_path, capsys):
    """The command writes a checkpoint heartbatch-train --init accepts and export-onnx reads."""
    out = tmp_path / "shipped.pt"
    assert recover.main([str(exported["int8"]), "--data", str(exported["data"]), "--split",
                         str(exported["split"]), "--out", str(out)]) == 0
    assert "validation heart IoU" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    assert state["config"]["recovered_from"] == str(exported["int8"]) and state["config"]["size"] == 224
    run = tmp_path / "run"
    assert train.main(["--data", str(exported["data"]), "--out", str(run), "--split", str(exported["split"]),
                       "--init", str(out), "--epochs", "1", "--batch-size", "3", "--threads", "1"]) == 0
    assert "rebuilt from" in capsys.readouterr().err
    assert export.main([str(run / "last.pt"), "--out", str(tmp_path / "again.onnx")]) == 0


def test_checkpoint_from_onnx_refuses_a_foreign_model(tmp_path, exported, capsys):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["image"], ["boxes"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 1, 4, 4])])
    foreign = helper.make_model(graph)
    foreign.metadata_props.add(key="heartbatch.input_size", value="224")
    onnx.save(foreign, tmp_path / "foreign.onnx")
    assert recover.main([str(tmp_path / "foreign.onnx"), "--data", str(exported["data"]), "--split",
                         str(exported["split"]), "--out", str(tmp_path / "x.pt")]) == 2
    assert "not a HeartBoxNet export" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


# --- consistency training ---------------------------------------------------------

def test_corruptions_that_keep_the_boxes_are_the_non_geometric_ones():
    assert set(corrupt.SAME_BOXES) == set(corrupt.WARD) - {"ap_geometry", "tight_crop"}
    image = np.full((64, 64), 0.5, np.float32)
    image[20:40, 24:44] = 0.9
    for name in corrupt.SAME_BOXES:  # without masks too (unlabeled films)
        out, masks = corrupt.WARD[name](image.copy(), None, np.random.default_rng(3))
        assert masks is None and out.shape == image.shape and 0 <= out.min() and out.max() <= 1


def test_consistency_views_share_their_geometry(monkeypatch):
    """The weak view is the affine alone; the strong view the same affine, then corruptions and
    photometry: a bright square stays where the weak view has it (corruptions that add bright
    things of their own left out, so the square is what the centroid finds)."""
    monkeypatch.setattr(corrupt, "SAME_BOXES", ("noise", "grid", "jpeg", "resample"))
    images = torch.full((3, 1, 64, 64), 0.2)
    images[:, :, 10:30, 30:50] = 1.0
    cfg = AugmentConfig(rotate_deg=10, translate=0.1)
    gen = torch.Generator().manual_seed(4)
    rngs = [np.random.default_rng(i) for i in range(3)]
    weak, strong = consistency_views(images, cfg, gen, rngs)
    theta = random_affine(3, cfg, torch.Generator().manual_seed(4))
    np.testing.assert_allclose(weak.numpy(), warp(images, images[:, :0], theta)[0].numpy(), atol=1e-6)
    assert not torch.allclose(weak, strong)

    def centroid(batch):
        flat = batch[:, 0].flatten(1)
        cut = (flat.median(1).values + flat.amax(1)) / 2
        mask = (batch[:, 0] > cut[:, None, None]).float()
        yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        return torch.stack([(mask * xx).sum((1, 2)), (mask * yy).sum((1, 2))], 1) / mask.sum((1, 2))[:, None]

    assert (centroid(weak) - centroid(strong)).abs().max() < 4.0  # px of 64


def test_ward_films_join_training_from_the_fitting_patients_only(data_dir, tmp_path, monkeypatch, capsys):
    """--ward-films: the fitting half of the patients (trust-onnx's split) joins every step, the
    consistency loss is logged, and the checkpoint records who was seen and who was held out."""
    seen = []
    real = engine.train_one_epoch

    def spy(*args, **kwargs):
        seen.append(kwargs.get("unlabeled"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", spy)
    ward = _ward_folder(tmp_path, data_dir, n=8, per_patient=2)
    data = _tiny_mask_folder(data_dir, tmp_path, n=6)
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--size", "64", "--epochs", "2", "--batch-size", "3",
                       "--threads", "1", "--ward-films", str(ward), "--ward-films-per-step", "2"]) == 0
    assert "--ward-films from scratch" in " ".join(capsys.readouterr().err.split())  # no --init: warned
    from exporter.ward import patient_split, read_ward

    fit, held = patient_split(read_ward(ward), 0)
    assert len(seen) == 2 and all(u is not None and u.keys == [f.key for f in fit] for u in seen)
    assert seen[0].images.shape == (len(fit), 1, 64, 64)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["consistency"]) and r["consistency"] >= 0 for r in log)
    record = torch.load(out / "last.pt", weights_only=False)["config"]["ward_films"]
    assert record["patients"] == sorted({f.patient for f in fit})
    assert record["held_out_patients"] == sorted({f.patient for f in held}) and record["seed"] == 0

    assert train.main(["--data", str(data), "--out", str(tmp_path / "bad"), "--size", "64", "--epochs", "1",
                       "--ward-films", str(tmp_path / "nowhere")]) == 2
    assert "--ward" in capsys.readouterr().err

    # with a ramp-up the run from scratch is not warned about, and the checkpoint records the ramp
    assert train.main(["--data", str(data), "--out", str(tmp_path / "ramped"), "--size", "64", "--epochs", "1",
                       "--batch-size", "3", "--threads", "1", "--ward-films", str(ward), "--ward-films-per-step", "2",
                       "--ward-films-ramp", "3"]) == 0
    assert "from scratch" not in capsys.readouterr().err
    assert torch.load(tmp_path / "ramped" / "last.pt", weights_only=False)["config"]["ward_films"]["ramp_epochs"] == 3
    assert train.main(["--data", str(data), "--out", str(tmp_path / "bad"), "--size", "64", "--epochs", "1",
                       "--ward-films", str(ward), "--ward-films-ramp", "-1"]) == 2
    assert "--ward-films-ramp" in capsys.readouterr().err


def test_consistency_term_is_what_the_steps_lower(data_dir):
    """A network that reads boxes, then steps with the consistency term alone (no box labels, no
    masks): the logged gap between corrupted and plain ward films falls."""
    torch.manual_seed(0)
    items = load_labels(data_dir / "cxr-ctr")
    labeled, films = build_dataset(items[:6], size=64), build_dataset(items[-6:], size=64)
    cfg = AugmentConfig(rotate_deg=0, translate=0, scale=(1, 1))
    model = recover.HeartBoxNet(mean=labeled.images.mean().item(), std=labeled.images.std().item(), width=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    for epoch in range(6):  # learn to read boxes first
        engine.train_one_epoch(model, labeled, optimizer, None, gen, 3, cpu, cfg, epoch=epoch)
    blind = labeled.subset(list(range(len(labeled))))
    blind.boxes[:] = float("nan")
    blind.real_masks[:] = False  # nothing but the consistency term moves the weights
    unlabeled = engine.Unlabeled(films.images, films.keys, weight=1.0, per_step=3)
    gaps = [engine.train_one_epoch(model, blind, optimizer, None, gen, 3, cpu, cfg, epoch=epoch,
                                   unlabeled=unlabeled)["consistency"] for epoch in range(6, 16)]
    assert all(np.isfinite(gaps)) and np.mean(gaps[-3:]) < 0.75 * np.mean(gaps[:3]), gaps


def test_consistency_trains_the_mask_head_too(data_dir):
    """With a mask head the ward films' masks learn as well (the runtime measures from them): only
    the decoder trains, no label or mask is known, so the box term cannot move it; the mask term
    does, and the corrupted views' masks come closer to the plain views'."""
    torch.manual_seed(0)
    items = load_labels(data_dir / "cxr-ctr")
    labeled, films = build_dataset(items[:4], size=64), build_dataset(items[-6:], size=64)
    labeled.boxes[:] = float("nan")
    labeled.real_masks[:] = False
    cfg = AugmentConfig(rotate_deg=0, translate=0, scale=(1, 1))
    model = recover.HeartBoxNet(mean=0.5, std=0.25, width=32, mask_head=True)
    before = [p.detach().clone() for p in model.mask_parameters()]
    optimizer = torch.optim.AdamW(engine.trainable_parameters(model, "masks"), lr=2e-3)
    unlabeled = engine.Unlabeled(films.images, films.keys, weight=1.0, per_step=3)
    gen, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    gaps = [engine.train_one_epoch(model, labeled, optimizer, None, gen, 2, cpu, cfg, epoch=epoch,
                                   unlabeled=unlabeled, train_only="masks")["consistency"] for epoch in range(8)]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.mask_parameters()))
    assert all(np.isfinite(gaps)) and np.mean(gaps[-3:]) < np.mean(gaps[:3]), gaps

    boxes = torch.rand(2, 8)
    target = torch.full((2, 3, 16, 16), 0.9)
    near = engine.consistency_loss(boxes, boxes, torch.full((2, 3, 16, 16), 2.2), target)
    far = engine.consistency_loss(boxes, boxes, torch.full((2, 3, 16, 16), -2.2), target)
    assert far > near > 0 and engine.consistency_loss(boxes, boxes) == 0


def test_ramp_up_raises_the_consistency_weight_to_its_value():
    """From about 0.7 % of the weight at epoch 0, rising every epoch, the full weight from the end of
    the ramp; no ramp: the full weight at once."""
    ramped = engine.Unlabeled(torch.zeros(1, 1, 8, 8), ["a"], weight=2.0, ramp_epochs=10)
    weights = [ramped.weight_at(e) for e in range(13)]
    assert weights[0] == pytest.approx(2.0 * np.exp(-5.0))
    assert all(a < b for a, b in zip(weights[:11], weights[1:11])) and weights[10:] == [2.0] * 3
    assert engine.Unlabeled(torch.zeros(1, 1, 8, 8), ["a"], weight=2.0).weight_at(0) == 2.0


def test_the_steps_use_the_ramped_weight(data_dir):
    """The loss that is stepped on holds the consistency term at the epoch's ramped weight: tiny at
    epoch 0, the full weight after the ramp."""
    torch.manual_seed(0)
    items = load_labels(data_dir / "cxr-ctr")
    labeled, films = build_dataset(items[:4], size=64), build_dataset(items[-4:], size=64)
    cfg = AugmentConfig(rotate_deg=0, translate=0, scale=(1, 1))
    model = recover.HeartBoxNet(mean=0.5, std=0.25, width=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay; only the sums are read
    unlabeled = engine.Unlabeled(films.images, films.keys, weight=3.0, per_step=2, ramp_epochs=5)
    gen, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    for epoch, weight in ((0, 3.0 * np.exp(-5.0)), (7, 3.0)):
        r = engine.train_one_epoch(model, labeled, optimizer, None, gen, 2, cpu, cfg, epoch=epoch, unlabeled=unlabeled)
        assert r["consistency"] > 0
        assert r["loss"] == pytest.approx(r["box"] + engine.SEG_WEIGHT * r["seg"] + weight * r["consistency"], rel=1e-5)


# --- site adaptation: more labeled films -------------------------------------------

def test_extra_labels_are_trained_on_and_never_validated_on(exported, tmp_path, capsys):
    """--extra-labels (a box CSV, as a review export writes) joins training; a validation film in it
    is refused."""
    from heartbatch.images import image_size
    from heartbatch.labels import BOX_COLUMNS

    items = {i.key: i for i in load_labels(exported["data"])}
    split = json.loads(exported["split"].read_text())

    def labels(keys, path):
        lines = ["path," + ",".join(BOX_COLUMNS)]
        for key in keys:
            item = items[key]
            rows, columns = image_size(item.image_path)
            lines.append(f"{item.image_path}," + ",".join(f"{v:.2f}" for v in item.boxes * np.array([columns, rows] * 4)))
        path.write_text("\n".join(lines) + "\n")
        return path

    site = labels(split["train"][:2], tmp_path / "site.csv")
    run = tmp_path / "run"
    assert train.main(["--data", str(exported["data"]), "--out", str(run), "--split", str(exported["split"]),
                       "--size", "64", "--epochs", "1", "--batch-size", "4", "--threads", "1",
                       "--extra-labels", str(site)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "2 films of" in err and f"{len(split['train']) + 2} training" in err
    config = torch.load(run / "last.pt", weights_only=False)["config"]
    assert config["extra_labels"] == {"files": [str(site)], "films": 2}

    leaky = labels(split["val"][:1], tmp_path / "leaky.csv")
    assert train.main(["--data", str(exported["data"]), "--out", str(tmp_path / "bad"), "--split",
                       str(exported["split"]), "--size", "64", "--epochs", "1", "--extra-labels", str(leaky)]) == 2
    assert "validation films of this run" in " ".join(capsys.readouterr().err.split())
