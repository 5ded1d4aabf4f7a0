"""trust-onnx: the graph surgery and the fit, on the shipped model and the fixture films."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from dicom_factory import shared_png
from exporter import surgery, trust
from heartbatch import contract as C
from heartbatch.model import BoxModel, default_model_path
from heartbatch.pixels import preprocess



@pytest.fixture(scope="module")
def shipped() -> onnx.ModelProto:
    return onnx.load(str(default_model_path()))


def _run(model: onnx.ModelProto, images: np.ndarray, names: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {C.INPUT_NAME: images[:, None].astype(np.float32)})


def _films(data_dir, n: int = 3) -> np.ndarray:
    return np.stack([preprocess(shared_png(data_dir, i).astype(np.float32), 224) for i in range(n)])


def test_without_trust_is_the_box_network(shipped, data_dir):
    bare = surgery.without_trust(shipped)
    assert [o.name for o in bare.graph.output] == [C.OUTPUT_NAME]
    assert not any(n.name.startswith(surgery.PREFIX) for n in bare.graph.node)
    films = _films(data_dir)
    np.testing.assert_array_equal(_run(bare, films, [C.OUTPUT_NAME])[0], _run(shipped, films, [C.OUTPUT_NAME])[0])


def test_uncertainty_is_the_spread_of_each_heatmap(shipped, data_dir):
    """The added output equals the standard deviation of each soft-argmax distribution, computed
    here with numpy from the softmax itself."""
    model = surgery.add_uncertainty(surgery.with_features(shipped), factor=2.0)
    softmax = surgery._softmax(model.graph).output[0]
    model.graph.output.append(helper.make_tensor_value_info(softmax, TensorProto.FLOAT, None))
    boxes, sd, prob = _run(model, _films(data_dir), [C.OUTPUT_NAME, "uncertainty", softmax])
    side = 224 // 8
    prob = prob.reshape(len(prob), 8, side, side)
    grid = (np.arange(side) + 0.5) / side
    for summed, coords in ((2, slice(0, 8, 2)), (3, slice(1, 8, 2))):  # x: over rows; y: over columns
        marginal = prob.sum(axis=summed)[:, coords]
        mean = (marginal * grid).sum(-1)
        np.testing.assert_allclose(mean, boxes[:, coords], atol=1e-5)  # the same distribution as the boxes
        expected = 2.0 * np.sqrt((marginal * grid ** 2).sum(-1) - mean ** 2)
        np.testing.assert_allclose(sd[:, coords], expected, rtol=1e-3, atol=1e-6)


def test_features_are_the_pooled_stages(shipped, data_dir):
    model = surgery.with_features(shipped)
    films = _films(data_dir)
    features = _run(model, films, [surgery.FEATURES])[0]
    assert features.shape == (len(films), 512 + 128 * 16 + 256)
    thumbs = films.reshape(len(films), 16, 14, 16, 14).mean(axis=(2, 4)).reshape(len(films), -1)
    np.testing.assert_allclose(features[:, -256:], thumbs, atol=1e-5)


def test_trust_onnx_end_to_end(shipped, data_dir, tmp_path, capsys):
    """Fitted on the fixture films (12 training, 4 validation): the model has the outputs, its
    boxes are the input model's, and the thresholds are in its metadata."""
    data = data_dir / "cxr-ctr"
    keys = sorted(f"{p.parent.parent.name}/{p.name}" for p in data.glob("*/png/*.png"))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": keys[:6] + keys[10:], "val": keys[6:10]}))
    ward = tmp_path / "ward" / "films"  # stand-ins for real ward films: chest films, with patients
    ward.mkdir(parents=True)
    for i, png in enumerate(sorted(data.glob("*/png/*.png"))[:8]):
        (ward / f"w{i}.png").symlink_to(png)
    ward.with_suffix(".csv").write_text("file,patient,view\n" + "".join(
        f"w{i}.png,P{i // 2},{'AP' if i % 2 else 'PA'}\n" for i in range(8)))
    out, report = tmp_path / "trusted.onnx", tmp_path / "trust.json"
    assert trust.main([str(default_model_path()), "--data", str(data), "--split", str(split), "--out", str(out),
                       "--report", str(report), "--ward", str(ward)]) == 0
    printed = capsys.readouterr().out
    assert "negative" in printed and "uncertainty factor" in printed and "the ward films' cut" in printed
    model = BoxModel(out)
    assert model.info.has_trust and "chest_distance" in model.info.optional
    policy = json.loads(model.info.metadata[C.META_TRUST])
    assert policy["classes"][0] == "chest" and policy["review_uncertainty"] > 0
    assert policy["review_distance"] == policy["distance_cut"] > 0
    assert policy["min_chest_score"] == trust.MIN_CHEST_SCORE < policy["review_chest_score"]
    evaluation = json.loads(report.read_text())
    assert evaluation["uncertainty"]["review_cut"] >= evaluation["uncertainty"]["ward_cut"]
    held = {k for k in evaluation["by_kind"] if k.startswith("ward_held_")}
    assert held and "held-out ward patients: P" in policy["fit"]  # the patients kept out are named
    films = _films(data_dir, 4)
    np.testing.assert_allclose(model.predict(films), BoxModel().predict(films), atol=1e-6)
    # the chest score is the classifier's alone: distance flags a film, it never refuses one
    content, score = _run(onnx.load(str(out)), films, ["content", C.CHEST_SCORE])
    chest = [policy["classes"].index(c) for c in ("chest", "mirrored")]
    np.testing.assert_allclose(score, content[:, chest].sum(1), atol=1e-5)
    assert set(evaluation["by_kind"]) >= {"chest", "negative", "turned_90", "mirrored"}


def test_the_ward_cut_holds_for_each_view():
    """AP films spread wider: the cut is the larger of the views' cuts, so an archive of AP films is not
    flagged more than the fitting patients' PA-heavy mix would suggest; a view of few films does not set it."""
    pa, ap = np.linspace(0.010, 0.020, 10), np.linspace(0.020, 0.060, 10)
    views = ["PA"] * 10 + ["ap"] * 10
    cut = trust.ward_review_cut(np.concatenate([pa, ap]), views, 0.10)
    assert cut == pytest.approx(np.quantile(ap, 0.9))
    assert np.mean(ap > cut) <= 0.10 and np.mean(np.concatenate([pa, ap]) > cut) < 0.10
    lone = trust.ward_review_cut(np.concatenate([pa, [0.5]]), views[:10] + ["LL"], 0.10)
    assert lone == pytest.approx(np.quantile(pa, 0.9))  # one film of its view: not a cut of its own
    assert trust.ward_review_cut(ap[:4], [""] * 4, 0.25) == pytest.approx(np.quantile(ap[:4], 0.75))


def test_a_graph_with_two_networks_is_refused(shipped, tmp_path):
    doubled = surgery.without_trust(shipped)
    extra = helper.make_node("Softmax", [C.OUTPUT_NAME], ["second"], name="another_softmax")
    doubled.graph.node.append(extra)
    with pytest.raises(surgery.SurgeryError, match="one soft-argmax"):
        surgery.with_features(doubled)


def test_the_border_cut_is_zero_unless_clean_films_fall_below_it():
    """0 (the heart no brighter than the lung beside it), lowered only as far as the training films as
    they are need so that at most 1 % of them are flagged."""
    image = np.full((224, 224), 0.6, np.float32)
    image[30:200, 20:100] = 0.15
    image[30:200, 124:200] = 0.15
    image[100:180, 100:168] = 0.85
    boxes = np.array([[0.45, 0.45, 0.75, 0.8, 0.1, 0.15, 0.9, 0.9]])
    assert trust.border_review_cut([image] * 50, np.repeat(boxes, 50, 0)) == 0.0
    dull = image.copy()
    dull[30:200, 168:200] = 0.9  # a film whose lung beside the heart is whiter than the heart
    cut = trust.border_review_cut([image] * 49 + [dull] * 2, np.repeat(boxes, 51, 0))
    from heartbatch.confidence import heart_border_contrast

    assert heart_border_contrast(dull, boxes[0]) <= cut < 0  # the 1 % quantile: at most 1 % below it
