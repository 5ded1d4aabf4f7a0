"""Reference boxes for training and evaluation, from the three supported layouts.

* a mask folder in the layout of the cxr-ctr data set (``png/``, ``mask/heart/``,
  ``mask/left_lung/``, ``mask/right_lung/``, optional ``ctr_ground_truth.csv``);
  boxes are mask bounding boxes, the thorax box bounds both lungs;
* the original project's label file ``label,x0,y0,w,h,name,img_shape_x,img_shape_y``
  with heart boxes in 224-pixel coordinates and ``name`` a DICOM file stem;
* a plain CSV ``path,heart_x0,heart_y0,heart_x1,heart_y1[,thorax_x0,...]`` in pixels.

Every layout becomes a list of :class:`LabeledImage` with normalized boxes, so
training and evaluation never care where labels came from.  :func:`read_split`
reads and checks the train/validation split files that training writes
(``split.json``), for every command that takes ``--split``.
"""

from __future__ import annotations

import csv
import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import LabelError, SplitError
from .geometry import box_from_mask
from .images import image_size

MASK_THRESHOLD = 127  # masks are anti-aliased 0..255; half-way is the edge
LEGACY_SIZE = 224
NAN_BOX = (math.nan,) * 4


@dataclass
class LabeledImage:
    image_path: Path
    heart: tuple[float, float, float, float]          # normalized
    thorax: tuple[float, float, float, float] = NAN_BOX  # normalized, NaN when unknown
    expert_ctr: float = math.nan
    source: str = ""
    mask_paths: dict[str, Path] = field(default_factory=dict)
    name: str = ""  # unique within a data set: folder/file, or the path relative to the labels

    @property
    def key(self) -> str:
        if self.name:
            return self.name
        return f"{self.source}/{self.image_path.name}" if self.source else self.image_path.name

    @property
    def boxes(self) -> np.ndarray:
        return np.array(self.heart + self.thorax, dtype=np.float64)


def _read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > MASK_THRESHOLD


def _normalize(box, rows: int, columns: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return (x0 / columns, y0 / rows, x1 / columns, y1 / rows)


def _mask_dirs(root: Path) -> list[Path]:
    """Folders under ``root`` (or root itself) that hold ``png/`` and ``mask/heart/``."""
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    return [p for p in candidates if (p / "png").is_dir() and (p / "mask" / "heart").is_dir()]


def _expert_ctr(root: Path) -> dict[str, float]:
    found: dict[str, float] = {}
    for csv_path in [root / "ctr_ground_truth.csv", root.parent / "ctr_ground_truth.csv"]:
        if csv_path.is_file():
            with open(csv_path, newline="") as fh:
                for row in csv.DictReader(fh):
                    found[row["id"]] = float(row["ctr"])
            break
    return found


def from_mask_folder(root: Path) -> list[LabeledImage]:
    dirs = _mask_dirs(root)
    if not dirs:
        raise LabelError(f"{root}: no 'png/' + 'mask/heart/' folders found (cxr-ctr layout expected)")
    expert = _expert_ctr(root)
    items = []
    for folder in dirs:
        for image_path in sorted((folder / "png").glob("*.png")):
            masks = {name: folder / "mask" / name / image_path.name
                     for name in ("heart", "left_lung", "right_lung")}
            if not masks["heart"].is_file():
                continue
            heart_mask = _read_mask(masks["heart"])
            rows, columns = heart_mask.shape
            heart = box_from_mask(heart_mask)
            if heart is None:
                continue
            thorax = NAN_BOX
            if masks["left_lung"].is_file() and masks["right_lung"].is_file():
                lungs = _read_mask(masks["left_lung"]) | _read_mask(masks["right_lung"])
                box = box_from_mask(lungs)
                thorax = _normalize(box, rows, columns) if box else NAN_BOX
            items.append(LabeledImage(
                image_path=image_path, heart=_normalize(heart, rows, columns), thorax=thorax,
                expert_ctr=expert.get(image_path.name, math.nan),
                source=folder.name if folder != root else "", mask_paths=masks))
    return items


def _find_image(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.dcm", folder / f"{stem}.png"):
        if candidate.is_file():
            return candidate
    matches = sorted(folder.glob(f"{glob.escape(stem)}.*"))
    if not matches:
        raise LabelError(f"no image named '{stem}' in {folder}")
    return matches[0]


def from_legacy_labels(label_csv: Path, image_dir: Path) -> list[LabeledImage]:
    """The original project's ``rsna_heart_detection.csv``: heart boxes at 224 x 224."""
    items = []
    with open(label_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            x0, y0 = float(row["x0"]), float(row["y0"])
            x1, y1 = x0 + float(row["w"]), y0 + float(row["h"])
            heart = (x0 / LEGACY_SIZE, y0 / LEGACY_SIZE, x1 / LEGACY_SIZE, y1 / LEGACY_SIZE)
            items.append(LabeledImage(image_path=_find_image(image_dir, row["name"]), heart=heart,
                                      name=row["name"]))
    return items


BOX_COLUMNS = [f"{part}_{c}" for part in ("heart", "thorax") for c in ("x0", "y0", "x1", "y1")]


def from_box_csv(box_csv: Path, base: Path | None = None) -> list[LabeledImage]:
    """``path`` + heart box (+ optional thorax box) in pixels of the image.

    Relative paths are resolved against ``base`` (default: the CSV's folder).
    """
    base = box_csv.parent if base is None else base
    items = []
    with open(box_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", *BOX_COLUMNS[:4]} - set(reader.fieldnames or [])
        if missing:
            raise LabelError(f"{box_csv}: missing columns {sorted(missing)}; "
                             f"expected path,{','.join(BOX_COLUMNS)} (thorax optional)")
        for line, row in enumerate(reader, start=2):
            path = Path(row["path"])
            path = path if path.is_absolute() else base / path
            thorax_cells = [(row.get(c, "") or "").strip() for c in BOX_COLUMNS[4:]]
            if any(thorax_cells) and not all(thorax_cells):
                raise LabelError(f"{box_csv}:{line}: thorax box partly filled; give all four or none")
            try:
                heart_px = [float(row[c]) for c in BOX_COLUMNS[:4]]
                thorax_px = [float(v) for v in thorax_cells] if all(thorax_cells) else None
            except ValueError as exc:
                raise LabelError(f"{box_csv}:{line}: {exc}") from None
            rows, columns = image_size(path)
            thorax = _normalize(thorax_px, rows, columns) if thorax_px else NAN_BOX
            items.append(LabeledImage(image_path=path, heart=_normalize(heart_px, rows, columns),
                                      thorax=thorax, name=row["path"]))
    return items


def load_labels(data: str | Path, labels: str | Path | None = None) -> list[LabeledImage]:
    """Labels for ``data``: a cxr-ctr style folder, or a folder plus a label CSV.

    ``labels`` may be the original project's label file (images looked up in
    ``data`` by stem) or a box CSV; ``data`` alone may also be a box CSV.
    """
    data = Path(data)
    if labels is None and data.is_file():
        return from_box_csv(data)
    if labels is None:
        if not data.is_dir():
            raise LabelError(f"{data}: not found")
        return from_mask_folder(data)
    labels = Path(labels)
    with open(labels, newline="") as fh:
        header = next(csv.reader(fh), [])
    if {"x0", "y0", "w", "h", "name"} <= set(header):
        return from_legacy_labels(labels, data)
    return from_box_csv(labels, base=data)


# --- train/validation split files ----------------------------------------------------


SPLIT_SHAPE = "a JSON object with 'train' and 'val' lists of image keys, as heartbatch-train writes to split.json"


def check_split(split, keys, source: str | Path,
                hint: str = "give the --data (and --labels) the split was made from") -> dict:
    """``split`` (parsed JSON) if it is a usable split of the images ``keys``, else :class:`SplitError`
    naming ``source`` and what is wrong.  ``keys=None`` checks the shape only."""
    if not (isinstance(split, dict) and isinstance(split.get("train"), list) and isinstance(split.get("val"), list)):
        raise SplitError(f"{source}: not a split file (needs {SPLIT_SHAPE})")
    not_text = [k for k in split["train"] + split["val"] if not isinstance(k, str)]
    if not_text:
        raise SplitError(f"{source}: not a split file: image keys must be strings such as 'jsrt/JPCLN001.png' "
                         f"(found {not_text[0]!r})")
    both = set(split["train"]) & set(split["val"])
    if both:
        raise SplitError(f"{source}: {len(both)} images are in both 'train' and 'val' (e.g. {sorted(both)[0]}); "
                         "a validation image must never be trained on")
    if keys is not None:
        unknown = set(split["train"] + split["val"]) - set(keys)
        if unknown:
            raise SplitError(f"{source}: {len(unknown)} split entries are not in the data "
                             f"(e.g. {sorted(unknown)[0]}); {hint}")
    return split


def read_split(path: str | Path, keys=None, hint: str = "give the --data (and --labels) the split was made from"
               ) -> dict:
    """The split in the JSON file ``path``, checked with :func:`check_split`; :class:`SplitError`
    (a ``ValueError``) with the file named and what is wrong otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SplitError(f"{path}: cannot read the split file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise SplitError(f"{path}: not a split file (not UTF-8 text; needs {SPLIT_SHAPE})") from None
    try:
        split = json.loads(text)
    except ValueError as exc:
        raise SplitError(f"{path}: not a split file (not JSON: {exc}; needs {SPLIT_SHAPE})") from None
    return check_split(split, keys, path, hint)
