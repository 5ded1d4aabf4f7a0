"""Loading an ONNX box model, checking it against the contract, and running it.

A model that does not fit the contract is refused here, with what is wrong,
before any DICOM file is read.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from . import arithmetic, contract
from .confidence import Prediction, heart_border_contrast
from .errors import ContractError, WorkerModelError
from .files import sha256_file
from .pixels import PIPELINE_VERSION, RUNS_MODELS_OF

DEFAULT_MODEL_NAME = "heartbox.onnx"


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_id: str            # short content hash, recorded in every report row
    input_size: int
    outputs: int             # 8 (heart + thorax) or 4 (heart only: no CTR)
    metadata: dict[str, str] = field(default_factory=dict)
    optional: tuple[str, ...] = ()  # the contract's optional outputs this model has

    @property
    def has_trust(self) -> bool:
        """Content check and uncertainty: a model without them still runs, with empty cells."""
        return contract.CHEST_SCORE in self.optional and contract.UNCERTAINTY in self.optional

    @property
    def has_thorax(self) -> bool:
        return self.outputs == 8

    @property
    def has_masks(self) -> bool:
        """The optional ``masks`` output: the runtime measures from the masks (:mod:`heartbatch.masks`)."""
        return contract.MASKS in self.optional

    @property
    def quantized(self) -> bool:
        return "heartbatch.quantization" in self.metadata

    @property
    def validation_metrics(self) -> dict:
        try:
            return json.loads(self.metadata.get(contract.META_VALIDATION, "{}"))
        except ValueError:
            return {}


def default_model_path() -> Path:
    return Path(str(resources.files("heartbatch") / "models" / DEFAULT_MODEL_NAME))


def file_id(path: Path) -> str:
    return sha256_file(path)[:12]


def _session(path: Path, threads: int | None, mode: str = arithmetic.FUSED):
    import onnxruntime as ort

    options = arithmetic.session_options(mode, threads)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        from . import sanitize  # (imports pydicom: only on this path)

        raise ContractError(f"{path}: not a loadable ONNX model ({sanitize.message(exc, 300)})") from None


def _check(session, path: Path) -> tuple[ModelInfo, arithmetic.Probe | None, dict[str, np.ndarray]]:
    """The model's contract, checked on a sample batch run once: its arithmetic probe where it has
    one (so that the probe costs nothing more), else a batch of 2 blank images. Returns the model's
    info, its probe and every output for the sample."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    where = f"{path}"
    if len(inputs) != 1 or inputs[0].name != contract.INPUT_NAME:
        raise ContractError(f"{where}: expected one input named '{contract.INPUT_NAME}', "
                            f"found {[i.name for i in inputs]}")
    shape = inputs[0].shape
    if inputs[0].type != "tensor(float)" or len(shape) != 4 or shape[1] != 1:
        raise ContractError(f"{where}: input must be float32 [N, 1, S, S], found {inputs[0].type} {shape}")
    if len(outputs) < 1 or outputs[0].name != contract.OUTPUT_NAME:
        raise ContractError(f"{where}: expected an output named '{contract.OUTPUT_NAME}', "
                            f"found {[o.name for o in outputs]}")
    missing = [k for k in contract.REQUIRED_METADATA if k not in meta]
    if missing:
        raise ContractError(f"{where}: metadata lacks {', '.join(missing)}; "
                            f"export the model with `export-onnx` so it records them")
    if meta[contract.META_FORMAT] != contract.FORMAT_VERSION:
        raise ContractError(f"{where}: contract format {meta[contract.META_FORMAT]!r} is not supported "
                            f"(this heartbatch reads format {contract.FORMAT_VERSION})")
    try:
        size = int(meta[contract.META_INPUT_SIZE])
    except ValueError:
        raise ContractError(f"{where}: input size {meta[contract.META_INPUT_SIZE]!r} is not an integer") from None
    if size < contract.MIN_INPUT_SIZE:
        raise ContractError(f"{where}: input size {size} is below the contract's {contract.MIN_INPUT_SIZE}")
    for dim in shape[2:]:
        if isinstance(dim, int) and dim != size:
            raise ContractError(f"{where}: graph input is {shape} but metadata says S={size}")
    pixels = meta.get(contract.META_PIXELS_VERSION)
    if pixels is not None and pixels not in RUNS_MODELS_OF:
        raise ContractError(f"{where}: trained with pixel pipeline v{pixels}, this heartbatch has "
                            f"v{PIPELINE_VERSION} (and runs models of v{', v'.join(RUNS_MODELS_OF)}); "
                            f"use a matching heartbatch version or retrain")
    probe = _probe(meta, where, size)
    sample = probe.inputs if probe is not None and len(probe.images) >= 2 else np.zeros((2, 1, size, size), np.float32)
    n = len(sample)
    names = [o.name for o in outputs]
    values = dict(zip(names, session.run(names, {contract.INPUT_NAME: sample})))
    boxes = values[contract.OUTPUT_NAME]
    width = boxes.shape[-1] if boxes.ndim == 2 else None
    if boxes.ndim != 2 or boxes.shape[0] != n or width not in contract.OUTPUT_LAYOUTS:
        raise ContractError(f"{where}: output '{contract.OUTPUT_NAME}' must be [N, 8] or [N, 4] with a "
                            f"dynamic batch; a batch of {n} gave shape {list(boxes.shape)}")
    if meta[contract.META_OUTPUT_LAYOUT] != contract.OUTPUT_LAYOUTS[width]:
        raise ContractError(f"{where}: output layout {meta[contract.META_OUTPUT_LAYOUT]!r} does not match "
                            f"its {width} outputs (expected {contract.OUTPUT_LAYOUTS[width]!r})")
    optional = _check_optional(values, where, n)
    if contract.MASKS in optional:
        _check_masks(values[contract.MASKS], outputs, where, n, size, width)
    info = ModelInfo(path=path, model_id=file_id(path), input_size=size, outputs=width, metadata=meta,
                     optional=optional)
    return info, probe, values


def _check_optional(values: dict[str, np.ndarray], where: str, n: int) -> tuple[str, ...]:
    """The optional outputs present, each checked for its shape on the sample batch of ``n``."""
    names = [name for name in values if name in contract.OPTIONAL_OUTPUTS or name == contract.MASKS]
    for name in names:
        if name not in contract.OPTIONAL_OUTPUTS:
            continue
        value, expected = values[name], contract.OPTIONAL_OUTPUTS[name]
        if value.ndim != len(expected) or value.shape[0] != n or \
                any(want is not None and got != want for got, want in zip(value.shape[1:], expected[1:])):
            raise ContractError(f"{where}: optional output '{name}' must be {_shape_text(expected)}; "
                                f"a batch of {n} gave shape {list(value.shape)}")
    return tuple(names)


def _check_masks(masks: np.ndarray, outputs, where: str, n: int, size: int, width: int) -> None:
    """The optional ``masks`` output: float32 ``[N, 3, H, W]`` (heart, right lung, left lung), H and W at
    most S, on the sample batch of ``n``; it measures the thorax too, so the boxes must be [N, 8]."""
    declared = next(o for o in outputs if o.name == contract.MASKS)
    channels = ", ".join(contract.MASK_CHANNELS)
    if declared.type != "tensor(float)" or masks.dtype != np.float32:
        raise ContractError(f"{where}: optional output '{contract.MASKS}' must be float32 probabilities, "
                            f"found {declared.type}; export the masks after a Sigmoid as float")
    if masks.ndim != 4 or masks.shape[0] != n or masks.shape[1] != len(contract.MASK_CHANNELS):
        raise ContractError(f"{where}: optional output '{contract.MASKS}' must be [N, 3, H, W] ({channels}) "
                            f"with a dynamic batch; a batch of {n} gave shape {list(masks.shape)}")
    if not (1 <= masks.shape[2] <= size and 1 <= masks.shape[3] <= size):
        raise ContractError(f"{where}: optional output '{contract.MASKS}' is {masks.shape[2]} x {masks.shape[3]}; "
                            f"its grid must be at most the input's {size} x {size} (the model input's grid, "
                            f"or coarser)")
    if width != 8:
        raise ContractError(f"{where}: a model with '{contract.MASKS}' measures the thorax too: its "
                            f"'{contract.OUTPUT_NAME}' output must be [N, 8], not [N, {width}]")


def _shape_text(shape: tuple) -> str:
    return "[" + ", ".join("N" if i == 0 else "K" if d is None else str(d) for i, d in enumerate(shape)) + "]"


def _probe(meta: dict[str, str], where: str, size: int) -> arithmetic.Probe | None:
    text = meta.get(arithmetic.META_PROBE)
    if text is None:
        return None
    try:
        probe = arithmetic.Probe.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise ContractError(f"{where}: its arithmetic probe cannot be read ({exc}); write the model again "
                            f"with quantize-onnx or trust-onnx") from None
    if probe.images.ndim != 3 or probe.images.shape[1:] != (size, size) or not len(probe.images):
        raise ContractError(f"{where}: its arithmetic probe has images of shape {list(probe.images.shape)}, "
                            f"not [K, {size}, {size}]")
    return probe


class BoxModel:
    """An onnxruntime session that honours the contract, in an arithmetic that gives the model's
    recorded outputs on this CPU (see :mod:`heartbatch.arithmetic`)."""

    def __init__(self, path: str | Path | None = None, threads: int | None = None,
                 start: str = arithmetic.FUSED):
        path = Path(path) if path is not None else default_model_path()
        if not path.is_file():
            hint = ("the package was installed without its default model; reinstall heartbatch"
                    if path == default_model_path() else "check the --model path")
            raise ContractError(f"{path}: model file not found ({hint})")
        self._session = _session(path, threads, start)
        self.info, probe, sample = _check(self._session, path)
        self.arithmetic = self._verify(probe, sample, threads, start)

    def _verify(self, probe: arithmetic.Probe | None, sample: dict, threads: int | None,
                start: str) -> arithmetic.ArithmeticCheck:
        """Compare the outputs for the probe with the recorded ones; on disagreement, move to the
        next slower, exact arithmetic and run the probe again."""
        if probe is None:
            return arithmetic.ArithmeticCheck(start)
        tried = [arithmetic.compare_outputs(sample, probe, start)]
        for mode in arithmetic.MODES[arithmetic.MODES.index(start) + 1:]:
            if tried[-1].passed:
                break
            self._session = _session(self.info.path, threads, mode)
            tried.append(arithmetic.compare(self._session, probe, mode))
        if tried[-1].passed:
            return arithmetic.ArithmeticCheck(tried[-1].mode, tuple(tried))
        raise ContractError(
            f"{self.info.path}: no arithmetic of onnxruntime {arithmetic.onnxruntime_version()} on this CPU "
            f"({arithmetic.cpu().describe()}) reproduces the outputs recorded in the model "
            f"({'; '.join(c.describe() for c in tried)}); refusing to write rows that differ from the "
            f"model card's. Try the onnxruntime version the model records ({probe.recorded_with or 'unknown'})")

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``[N, S, S]`` preprocessed images -> ``[N, 4|8]`` normalized boxes (float64): with ``masks``,
        the masks' boxes (:func:`heartbatch.masks.boxes_from_masks`), as every row is measured."""
        batch = np.ascontiguousarray(images, dtype=np.float32)[:, None]
        if self.info.has_masks:
            from .masks import boxes_from_masks

            return boxes_from_masks(self._session.run([contract.MASKS], {contract.INPUT_NAME: batch})[0])
        out = self._session.run([contract.OUTPUT_NAME], {contract.INPUT_NAME: batch})[0]
        return out.astype(np.float64)

    def infer(self, images: np.ndarray) -> list[Prediction]:
        """``[N, S, S]`` preprocessed images -> every output the model has, per image."""
        batch = np.ascontiguousarray(images, dtype=np.float32)[:, None]
        names = [contract.OUTPUT_NAME, *self.info.optional]
        values = dict(zip(names, self._session.run(names, {contract.INPUT_NAME: batch})))
        boxes = values[contract.OUTPUT_NAME].astype(np.float64)
        masks = values.get(contract.MASKS)
        if masks is not None:  # the runtime measures from the masks; `boxes` is fetched and checked as before
            from .masks import boxes_from_masks

            boxes = np.where(np.isfinite(boxes).all(axis=1, keepdims=True), boxes_from_masks(masks), np.nan)
        scores = values.get(contract.CHEST_SCORE)
        sds = values.get(contract.UNCERTAINTY)
        content = values.get(contract.CONTENT)
        distance = values.get(contract.CHEST_DISTANCE)
        border = [heart_border_contrast(image, b) for image, b in zip(images, boxes)]
        return [Prediction(boxes[i],
                           chest_score=None if scores is None else float(scores[i]),
                           uncertainty=None if sds is None else sds[i].astype(np.float64),
                           content=None if content is None else content[i].astype(np.float64),
                           distance=None if distance is None else float(distance[i]),
                           masks=None if masks is None else masks[i], border_contrast=border[i])
                for i in range(len(boxes))]


# --- the same model in worker processes ---------------------------------------------

@dataclass(frozen=True)
class ModelRef:
    """What a worker process needs to load the client's model: its path and content hash."""
    path: str
    model_id: str
    default: bool = False  # the shipped model: a worker may find it in its own installation
    arithmetic_mode: str = arithmetic.FUSED  # where the client's probe led; a worker starts there and checks again

    @classmethod
    def of(cls, model: BoxModel) -> "ModelRef":
        path = Path(model.info.path).resolve()
        return cls(str(path), model.info.model_id, path == default_model_path().resolve(), model.arithmetic.mode)


class _Loaded:
    """The models this process has loaded, by a key that changes with the file: the one cache for
    worker processes, the client's own copy and the Python API. Bounded (least recently used
    goes), so a long-lived process (watch, a Dask worker, a notebook) does not pin every model
    it ever used."""

    def __init__(self, size: int = 4):
        self.size = size
        self.lock = threading.Lock()
        self.models: OrderedDict[tuple, BoxModel] = OrderedDict()

    def get(self, key: tuple, load) -> BoxModel:
        """The model under ``key``, from ``load()`` (kept) the first time."""
        with self.lock:
            model = self.models.get(key)
            if model is None:
                model = self.models[key] = load()
            self.models.move_to_end(key)
            while len(self.models) > self.size:
                self.models.popitem(last=False)
            return model


_LOADED = _Loaded()


def shared_model(path: str | Path | None = None) -> BoxModel:
    """The model at ``path`` (default: the shipped one), loaded once while its file is unchanged
    (the key is its size and mtime: hashing 13 MB on every API call would cost more than a film)."""
    path = Path(path).resolve() if path is not None else default_model_path().resolve()
    try:
        stat = path.stat()
    except OSError:
        return BoxModel(path)  # let BoxModel say what is wrong with the path
    return _LOADED.get(("file", str(path), stat.st_size, stat.st_mtime_ns), lambda: BoxModel(path))


def _where() -> str:
    try:
        from distributed import get_worker

        return f"worker {get_worker().address}"
    except (ImportError, ValueError):
        return f"process {os.getpid()} on {socket.gethostname()}"


def remember(model: BoxModel) -> ModelRef:
    """Register an already loaded model, so this process never loads its file twice."""
    ref = ModelRef.of(model)
    _LOADED.get((ref.path, ref.model_id), lambda: model)
    return ref


def worker_model(ref: ModelRef, threads: int | None = None) -> BoxModel:
    """The model, loaded once per process and kept; refused unless it is the client's file."""
    return _LOADED.get((ref.path, ref.model_id), lambda: _load_model(ref, threads))


def _load_model(ref: ModelRef, threads: int | None) -> BoxModel:
    path = Path(ref.path)
    if ref.default and not path.is_file():
        path = default_model_path()  # the shipped model, from this worker's own installation
    if not path.is_file():
        raise WorkerModelError(f"{_where()}: model file {path} not found; workers read the model by path, "
                               f"so it must be on a filesystem the workers share with the client")
    try:
        model = BoxModel(path, threads=threads, start=ref.arithmetic_mode)
    except WorkerModelError:
        raise
    except ContractError as exc:
        raise WorkerModelError(f"{_where()}: model refused: {exc}") from None
    if model.info.model_id != ref.model_id:
        raise WorkerModelError(f"{_where()}: model file {path} is not the client's model (hash "
                               f"{model.info.model_id}, the client's is {ref.model_id}); workers must see "
                               f"the same file (shared filesystem)")
    return model
