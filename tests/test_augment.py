"""Ward-film corruptions as training augmentation: image and masks move together, seeded runs
repeat, `--show-augmentations` draws them, `--holdout-source` splits by source folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from exporter import corrupt
from exporter.augment import AugmentConfig, augment_batch, photometric, random_affine, warp, ward_batch
from exporter.datasets import box_mask, holdout_split, load_or_make_split, split_keys
from heartbatch.labels import load_labels
from heartbatch.masks import boxes_from_masks

S = 224
HEART = (0.30, 0.35, 0.62, 0.70)
THORAX = (0.10, 0.10, 0.90, 0.85)
#: the corruptions that move the anatomy (masks moved with the image); the others leave the masks as they are
GEOMETRIC = {"ap_geometry", "tight_crop", "mirrored"}
ALL = {**corrupt.WARD, "mirrored": corrupt.mirrored}


def _film():
    """A synthetic film whose bright square is exactly the heart mask."""
    heart = box_mask(HEART, S)
    thorax = box_mask(THORAX, S)
    masks = np.stack([heart, thorax, thorax])  # heart, right lung, left lung (the thorax box in both)
    return (0.1 + 0.8 * heart).astype(np.float32), masks


def _bright_box(image: np.ndarray) -> np.ndarray:
    """The pixel box of the bright region (normalized)."""
    threshold = (np.percentile(image, 99.5) + np.median(image)) / 2
    ys, xs = np.nonzero(image > threshold)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / image.shape[-1]


def _boxes(masks: np.ndarray) -> np.ndarray:
    return boxes_from_masks(np.asarray(masks)[None])[0]


def test_every_ward_corruption_is_tested():
    assert set(corrupt.WARD) == {"devices", "haze", "contrast", "noise", "resample", "jpeg", "grid", "ap_geometry",
                                 "collimation", "tight_crop", "whiteout", "sitting", "text"}
    assert GEOMETRIC <= set(ALL)


@pytest.mark.parametrize("name", sorted(ALL))
def test_image_and_masks_move_together(name):
    image, masks = _film()
    for seed in range(4):
        out, moved = ALL[name](image.copy(), masks.copy(), np.random.default_rng(seed))
        assert out.shape == (S, S) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        assert moved is not None and moved.shape == masks.shape
        if name not in GEOMETRIC:  # photometric, devices, collimation: the anatomy stays where it was
            np.testing.assert_array_equal(moved, masks)
            continue
        assert not np.array_equal(moved, masks)
        bright = out > (np.percentile(out, 99.5) + np.median(out)) / 2
        heart = moved[0] > 0.5
        assert (bright & heart).sum() / (bright | heart).sum() > 0.97, (name, seed)
        # the box the trainer takes from the moved masks is the box of the moved bright square
        np.testing.assert_allclose(_boxes(moved)[:4], _bright_box(out), atol=1.0 / S)


def test_mirrored_and_tight_crop_boxes_are_exact():
    """Sub-pixel: the moved masks give the analytically moved boxes."""
    image, masks = _film()
    _, moved = corrupt.mirrored(image, masks, np.random.default_rng(0))
    x0, y0, x1, y1 = HEART
    np.testing.assert_allclose(_boxes(moved)[:4], [1 - x1, y0, 1 - x0, y1], atol=1e-4)
    for seed in range(3):
        rng = np.random.default_rng(seed)  # tight_crop's own draws, in its order
        left, right = rng.uniform(0, 0.08), 1 - rng.uniform(0, 0.08)
        top, bottom = rng.uniform(0, 0.05), 1 - rng.uniform(0.08, 0.2)
        _, moved = corrupt.tight_crop(image, masks, np.random.default_rng(seed))
        expected = [(x0 - left) / (right - left), (y0 - top) / (bottom - top),
                    (x1 - left) / (right - left), (y1 - top) / (bottom - top)]
        np.testing.assert_allclose(_boxes(moved)[:4], expected, atol=0.25 / S)


@pytest.mark.parametrize("name", sorted(ALL))
def test_corruptions_are_seeded(name):
    image, masks = _film()
    a = ALL[name](image, masks, corrupt.seeded(3, "k", name))
    b = ALL[name](image, masks, corrupt.seeded(3, "k", name))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0] is not image  # the input is never written to
    np.testing.assert_array_equal(image, _film()[0])


def test_ward_batch_and_augment_batch():
    """ward_batch: seeded, all samples corrupted at p=1, none at p=0; augment_batch's boxes are the moved masks'."""
    image, masks = _film()
    images = torch.from_numpy(np.stack([image, image[:, ::-1].copy(), image]))[:, None]
    masks_t = torch.from_numpy(np.stack([masks, masks[:, :, ::-1].copy(), masks]))
    rngs = lambda epoch: [corrupt.seeded(0, "ward", epoch, k) for k in ("a", "b", "c")]  # noqa: E731

    x1, m1 = ward_batch(images, masks_t, 1.0, rngs(0))
    x2, m2 = ward_batch(images, masks_t, 1.0, rngs(0))
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    assert x1.dtype == torch.float32 and x1.shape == images.shape and m1.shape == masks_t.shape
    assert all(not torch.equal(x1[i], images[i]) for i in range(3))
    assert not torch.equal(ward_batch(images, masks_t, 1.0, rngs(1))[0], x1)  # another epoch, other films
    x0, m0 = ward_batch(images, masks_t, 0.0, rngs(0))
    assert torch.equal(x0, images) and torch.equal(m0, masks_t)

    cfg = AugmentConfig(ward=1.0)
    out, moved, boxes = augment_batch(images, masks_t, cfg, torch.Generator().manual_seed(1), rngs(0))
    # the training targets are the runtime's own boxes of the moved masks (heartbatch.masks: one implementation)
    np.testing.assert_array_equal(boxes.numpy(), boxes_from_masks(moved.numpy()).astype(np.float32))
    again = augment_batch(images, masks_t, cfg, torch.Generator().manual_seed(1), rngs(0))
    assert all(torch.equal(a, b) for a, b in zip((out, moved, boxes), again))
    with pytest.raises(ValueError, match="generator"):
        augment_batch(images, masks_t, cfg, torch.Generator(), None)

    # ward 0 (the default): exactly the affine + photometric augmentation as before, generators or not
    plain = AugmentConfig()
    gen = torch.Generator().manual_seed(2)
    warped_images, warped_masks = warp(images, masks_t, random_affine(3, plain, gen))
    expected = photometric(warped_images, plain, gen)
    for extra in (None, rngs(0)):
        got, got_masks, _ = augment_batch(images, masks_t, plain, torch.Generator().manual_seed(2), extra)
        assert torch.equal(got, expected) and torch.equal(got_masks, warped_masks)


# --- heartbatch-train --show-augmentations, --holdout-source -------------------------------

def _two_source_folder(full_data_dir, tmp_path, n_jsrt=5, n_wingspan=3):
    """A cxr-ctr-layout folder in tmp_path linking the first films of both sources of the full shared data
    set, with their masks: the fixture set has Wingspan films only (JSRT films may not be redistributed)."""
    root = tmp_path / "two-sources"
    for source, n in (("jsrt", n_jsrt), ("wingspan", n_wingspan)):
        src = full_data_dir / "cxr-ctr" / source
        names = sorted(p.name for p in (src / "png").glob("*.png"))[:n]
        assert len(names) == n, f"{src}: fewer than {n} films"
        for sub in ("png", "mask/heart", "mask/left_lung", "mask/right_lung"):
            (root / source / sub).mkdir(parents=True)
            for name in names:
                (root / source / sub / name).symlink_to(src / sub / name)
    return root


def test_show_augmentations_writes_the_grid_without_training(data_dir, tmp_path, capsys):
    from exporter import train

    png = tmp_path / "sheet" / "aug.png"
    assert train.main(["--data", str(data_dir / "cxr-ctr"), "--show-augmentations", str(png), "--size", "64"]) == 0
    with Image.open(png) as sheet:
        assert sheet.mode == "RGB"
        assert sheet.size == (len(train.SHOW_COLUMNS) * 64, train.SHOW_LABEL_PX + train.SHOW_FILMS * 64)
        pixels = np.asarray(sheet)
    assert set(corrupt.WARD) <= set(train.SHOW_COLUMNS) and train.SHOW_COLUMNS[0] == "plain"
    # heart boxes in red, thorax boxes in blue, on every tile
    tiles = pixels[train.SHOW_LABEL_PX:].reshape(train.SHOW_FILMS, 64, len(train.SHOW_COLUMNS), 64, 3)
    red = (tiles[..., 0] > 200) & (tiles[..., 1] < 80) & (tiles[..., 2] < 80)
    blue = (tiles[..., 2] > 200) & (tiles[..., 0] < 100)
    assert red.any(axis=(1, 3)).all() and blue.any(axis=(1, 3)).all()
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/split.json"))
    assert "nothing trained" in " ".join(capsys.readouterr().err.split())
    # training films only (the fixture set is one source: sources in turn is the next test)
    items = load_labels(data_dir / "cxr-ctr")
    args = train.parse_args(["--data", str(data_dir / "cxr-ctr"), "--show-augmentations", str(png)])
    shown = [i.key for i in train._show_films(args, items)]
    training = split_keys([i.key for i in items], 0.15, 0)["train"]
    assert len(shown) == train.SHOW_FILMS and set(shown) <= set(training)
    assert shown == sorted(training)[:train.SHOW_FILMS]


def test_show_augmentations_takes_training_films_of_each_source_in_turn(full_data_dir, tmp_path):
    """Two sources (JSRT and Wingspan, from the full data set): the films alternate between them,
    are training films only, and --holdout-source leaves only the other source's films."""
    from exporter import train

    data = _two_source_folder(full_data_dir, tmp_path, n_jsrt=8, n_wingspan=8)
    items = load_labels(data)
    args = train.parse_args(["--data", str(data), "--show-augmentations", str(tmp_path / "aug.png")])
    shown = [i.key for i in train._show_films(args, items)]
    assert [k.split("/")[0] for k in shown] == ["jsrt", "wingspan"] * 2
    assert not set(shown) & set(split_keys([i.key for i in items], 0.15, 0)["val"])
    args.holdout_source = "wingspan"
    held = [i.key for i in train._show_films(args, items)]
    assert len(held) == train.SHOW_FILMS and all(k.startswith("jsrt/") for k in held)


def test_holdout_source_split_is_exactly_by_source(tmp_path):
    keys = [f"east/E{i}.png" for i in range(5)] + [f"west/W{i}.png" for i in range(3)]
    split = holdout_split(keys, "west")
    assert split["val"] == sorted(k for k in keys if k.startswith("west/"))
    assert split["train"] == sorted(k for k in keys if k.startswith("east/"))
    assert holdout_split(keys, "east/")["val"] == split["train"]
    with pytest.raises(ValueError, match="sources are: east, west"):
        holdout_split(keys, "nih")
    with pytest.raises(ValueError, match="none would be left"):
        holdout_split([k for k in keys if k.startswith("east/")], "east")
    path = tmp_path / "split.json"
    assert load_or_make_split(path, keys, 0.15, 0, holdout_source="west")["val"] == split["val"]
    assert json.loads(path.read_text())["holdout_source"] == "west"
    assert load_or_make_split(path, keys, 0.15, 7, holdout_source="west")["val"] == split["val"]  # resumable
    with pytest.raises(ValueError, match="different split"):
        load_or_make_split(path, keys, 0.15, 0, holdout_source="east")
    with pytest.raises(ValueError, match="give one"):
        load_or_make_split(tmp_path / "other.json", keys, 0.15, 0, source=path, holdout_source="east")


def test_holdout_source_training_run(full_data_dir, tmp_path, capsys):
    """Train on JSRT, validate on Wingspan (films of the full data set): one command; --split with it,
    or an unknown source, exit 2."""
    from exporter import train

    data = _two_source_folder(full_data_dir, tmp_path, n_jsrt=5, n_wingspan=3)
    common = ["--data", str(data), "--size", "64", "--epochs", "1", "--batch-size", "8", "--threads", "1"]
    out = tmp_path / "jsrt-to-wingspan"
    assert train.main([*common, "--out", str(out), "--holdout-source", "wingspan"]) == 0
    split = json.loads((out / "split.json").read_text())
    assert split["val"] == sorted(f"wingspan/{p.name}" for p in (data / "wingspan" / "png").glob("*.png"))
    assert split["train"] == sorted(f"jsrt/{p.name}" for p in (data / "jsrt" / "png").glob("*.png"))
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["split"] == split and state["config"]["holdout_source"] == "wingspan"
    assert (state["config"]["train_images"], state["config"]["val_images"]) == (5, 3)
    assert "every wingspan image" in " ".join(capsys.readouterr().err.split())

    assert train.main([*common, "--out", str(tmp_path / "b"), "--holdout-source", "jsrt",
                       "--split", str(out / "split.json")]) == 2
    assert "--split and --holdout-source" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "b").exists()
    assert train.main([*common, "--out", str(tmp_path / "c"), "--holdout-source", "nih"]) == 2
    assert "sources are: jsrt, wingspan" in " ".join(capsys.readouterr().err.split())
    assert train.main([*common, "--out", str(out), "--holdout-source", "jsrt"]) == 2  # the folder's split differs
    assert "different split" in " ".join(capsys.readouterr().err.split())
