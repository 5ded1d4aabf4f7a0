"""heartbatch-train --mask-head: a decoder trained on the data's three masks, exported as the model's
``masks`` output that `heartbatch run` measures from; --train-only masks leaves the rest untouched."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from exporter import checkpoint, engine, export, train
from exporter.net import HeartBoxNet
from heartbatch import contract as C
from heartbatch.masks import boxes_from_masks
from heartbatch.model import BoxModel
from test_exporter import _tiny_mask_folder, _trainer_checkpoint


def _train(data, out, *extra):
    return train.main(["--data", str(data), "--out", str(out), "--size", "224", "--epochs", "1",
                       "--batch-size", "4", "--threads", "1", "--val-fraction", "0.34", "--lr", "1e-2", *extra])


@pytest.fixture(scope="module")
def frozen_run(data_dir, tmp_path_factory):
    """A network without a mask head, then one epoch of --mask-head --train-only masks from it."""
    tmp = tmp_path_factory.mktemp("maskhead")
    base = tmp / "base.pt"
    _trainer_checkpoint(base)
    data = _tiny_mask_folder(data_dir, tmp)
    assert _train(data, tmp / "run", "--init", str(base), "--mask-head", "--train-only", "masks") == 0
    return base, tmp / "run" / "last.pt", tmp


def test_train_only_masks_changes_the_decoder_alone(frozen_run):
    base, trained, _ = frozen_run
    before = torch.load(base, weights_only=False)["model"]
    state = torch.load(trained, weights_only=False)
    assert state["config"]["mask_head"] is True and state["config"]["train_only"] == "masks"
    after = state["model"]
    decoder = [k for k in after if k.startswith("decoder.")]
    assert decoder and not set(decoder) & set(before)  # the head started fresh
    for key, value in before.items():  # weights and BatchNorm statistics of the rest: exactly as they were
        assert torch.equal(after[key], value), key
    # the metrics are the masks' boxes', with the regressed boxes' beside them
    assert "regressed" in state["metrics"] and "heart_iou_mean" in state["metrics"]["regressed"]


def test_the_exported_masks_are_what_the_runtime_measures(frozen_run, capsys):
    import onnxruntime as ort

    _, trained, tmp = frozen_run
    out = tmp / "masks.onnx"
    assert export.main([str(trained), "--out", str(out)]) == 0
    assert "parity" in capsys.readouterr().out
    assert [o.name for o in onnx.load(str(out)).graph.output] == [C.OUTPUT_NAME, C.MASKS]
    ckpt = checkpoint.load(trained, trust_pickle=True)
    net = checkpoint.network(ckpt, checkpoint.network_spec(ckpt, trained), trained).eval()
    images = np.random.default_rng(0).uniform(0, 1, (2, 224, 224)).astype(np.float32)
    with torch.no_grad():
        regressed, masks = net(torch.from_numpy(images)[:, None])
    assert masks.shape == (2, 3, 56, 56) and 0 <= float(masks.min()) and float(masks.max()) <= 1
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run([C.MASKS], {C.INPUT_NAME: images[:, None]})[0]
    np.testing.assert_allclose(got, masks.numpy(), atol=1e-4)

    # masks that cover the heart's and the lungs' known cells: the runtime reports their boxes, not
    # the regressed ones
    with torch.no_grad():
        net.decoder.logits.weight.zero_()
        net.decoder.logits.bias.fill_(-12.0)
    ckpt["model"] = net.state_dict()
    shaped = tmp / "shaped.pt"
    torch.save(ckpt, shaped)
    model_file = tmp / "shaped.onnx"
    assert export.main([str(shaped), "--out", str(model_file)]) == 0
    proto = onnx.load(str(model_file))
    _paint_masks(proto)
    onnx.save(proto, str(model_file))
    model = BoxModel(model_file)
    assert model.info.has_masks
    (prediction,) = model.infer(images[:1])
    np.testing.assert_allclose(prediction.boxes, [0.25, 0.25, 0.5, 0.75, 0.125, 0.125, 0.875, 0.875], atol=1e-6)
    assert not np.allclose(prediction.boxes, regressed[0].numpy(), atol=0.01)


def _paint_masks(proto) -> None:
    """The graph's mask logits times 0 plus constant logits: heart cells 14-27 x 14-41 of 56, right
    lung 7-27 x 7-48, left lung 28-48 x 7-48 (x by y), so the boxes are known exactly."""
    from onnx import helper, numpy_helper

    logits = np.full((1, 3, 56, 56), -12.0, np.float32)
    logits[0, 0, 14:42, 14:28] = 12.0
    logits[0, 1, 7:49, 7:28] = 12.0
    logits[0, 2, 7:49, 28:49] = 12.0
    index, sigmoid = next((i, n) for i, n in enumerate(proto.graph.node) if n.op_type == "Sigmoid")
    proto.graph.initializer.extend([numpy_helper.from_array(logits, "painted_logits"),
                                    numpy_helper.from_array(np.zeros((), np.float32), "painted_zero")])
    nodes = [helper.make_node("Mul", [sigmoid.input[0], "painted_zero"], ["painted_none"]),
             helper.make_node("Add", ["painted_none", "painted_logits"], ["painted"])]
    for offset, node in enumerate(nodes):
        proto.graph.node.insert(index + offset, node)
    sigmoid.input[0] = "painted"


def test_mask_head_options_are_checked(data_dir, tmp_path):
    data = _tiny_mask_folder(data_dir, tmp_path)
    assert _train(data, tmp_path / "a", "--train-only", "masks") == 2  # no head, nothing to train it from
    with pytest.raises(ValueError, match="no mask head"):
        engine.trainable_parameters(HeartBoxNet(), "masks")
    with_head = HeartBoxNet(mask_head=True)
    assert {id(p) for p in engine.trainable_parameters(with_head, "masks")} == {id(p) for p in with_head.decoder.parameters()}
    assert not with_head.layer1[0].conv1.weight.requires_grad


def test_seg_loss_reads_three_masks_or_two(data_dir):
    masks = torch.zeros(2, 3, 32, 32)
    masks[:, 0, 8:20, 10:22] = 1
    masks[:, 1, 4:28, 2:12] = 1
    masks[:, 2, 4:28, 20:30] = 1
    real = torch.tensor([True, False])
    good = torch.logit(torch.nn.functional.adaptive_avg_pool2d(masks, (8, 8)).clamp(1e-4, 1 - 1e-4))
    assert engine.seg_loss(good, masks, real) < engine.seg_loss(-good, masks, real)
    two = torch.zeros(2, 2, 8, 8)
    assert torch.isfinite(engine.seg_loss(two, masks, real))  # the training-only head: heart and both lungs
    assert engine.seg_loss(good, masks, torch.tensor([False, False])) == 0
