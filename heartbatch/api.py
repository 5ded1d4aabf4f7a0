"""Python API for notebooks: the same pipeline as `heartbatch run`, without a report.

    >>> import heartbatch
    >>> r = heartbatch.predict("study/image.dcm")
    >>> r.status, r.ctr, r.heart, r.header.view_position
    >>> for r in heartbatch.predict_folder("studies/"):
    ...     print(r.path, r.ctr)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .model import BoxModel, shared_model
from .pipeline import RunOptions, Runner
from .records import Record
from .scan import scan
from .workers import measure_one


def load_model(model: str | Path | BoxModel | None = None) -> BoxModel:
    """A BoxModel from a path (default: the shipped model); sessions are reused."""
    if isinstance(model, BoxModel):
        return model
    return shared_model(model)


def predict(path: str | Path, model: str | Path | BoxModel | None = None, threshold: float = 0.5) -> Record:
    """Measure one file as `heartbatch run` does.  Always returns a Record; check ``.status`` and ``.reason``."""
    box_model = load_model(model)
    return measure_one(str(path), box_model, RunOptions(threshold=threshold).policy(box_model))[0]


def predict_folder(folder: str | Path, model: str | Path | BoxModel | None = None, threshold: float = 0.5,
                   batch_size: int = 16, workers: int | None = None) -> Iterator[Record]:
    """Measure every file under ``folder`` (recursively), yielding records as they are ready."""
    options = RunOptions(batch_size=batch_size, workers=workers, threshold=threshold)
    with Runner(load_model(model), options) as runner:
        for records in runner.process(scan([folder])):
            yield from records
