"""The one call a batch run makes per ok record, and its options: which results, and where."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..records import Record
from .capture import CAPTURE_MAX_SIDE, write_capture_from_source
from .presentation import write_presentation_state
from .output import save
from .segmentation import build_segmentation, segmentation_name
from .source import check_record, read_source_header
from .sr import write_sr


@dataclass(frozen=True)
class ResultOptions:
    """Where and what :func:`write_results` writes: the SR plus a presentation state (default) or,
    with ``capture``, the SR plus a Secondary Capture image of at most ``capture_max_side`` pixels a
    side."""
    out_dir: Path
    capture: bool = False
    capture_max_side: int = CAPTURE_MAX_SIDE

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.capture_max_side < 1:
            raise ValueError(f"capture_max_side must be positive, not {self.capture_max_side}")

    @property
    def mode(self) -> str:
        return f"sr+sc{self.capture_max_side}" if self.capture else "sr+pr"

    def key(self) -> str:
        """What the ledger stores to tell whether a row's results were written with these options:
        the mode and the absolute folder (symlinks resolved), e.g. ``sr+pr:/data/results`` or
        ``sr+sc2048:/data/results``."""
        return f"{self.mode}:{Path(self.out_dir).expanduser().resolve()}"


def write_results(record: Record, model_id: str, model_version: str, options: ResultOptions) -> tuple[str, ...]:
    """Write the SR and the presentation state (or, with ``options.capture``, the Secondary
    Capture) of an ok record into ``options.out_dir``, and for a record with masks (a model with a
    ``masks`` output) its Segmentation, which the SR references; returns the file names written
    (relative to ``out_dir``), the SR's first. Raises ValueError for a record that is not ok or whose file has
    no readable DICOM header."""
    check_record(record)
    source = read_source_header(record.path)
    out_dir = Path(options.out_dir)
    seg = None if record.masks is None else build_segmentation(source, record, model_id, model_version)
    seg_path = None if seg is None else save(seg, out_dir / segmentation_name(seg))
    sr = write_sr(source, record, model_id, model_version, out_dir, segmentation=seg)
    if options.capture:
        view = write_capture_from_source(source, record, model_id, out_dir, options.capture_max_side)
    else:
        view = write_presentation_state(source, record, model_id, out_dir)
    return (sr.name, view.name) if seg_path is None else (sr.name, view.name, seg_path.name)
