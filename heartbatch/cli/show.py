"""`heartbatch show`: one film measured as `run` measures it, drawn with its boxes and CTR."""

from __future__ import annotations

import json
from pathlib import Path

from ..argtypes import positive_int, ratio
from ..errors import ExitCode, UsageError
from .common import add_content_check, fail, load_model


def add_parser(sub) -> None:
    p = sub.add_parser(
        "show", help="draw the boxes, widths and CTR on one image (optionally with an occlusion map)",
        description="Measure one DICOM file and write a PNG with the heart box (red), the thorax box (blue), "
                    "the heart and thoracic widths and the CTR drawn on the image (and, for a model with masks, "
                    "the outlines of the heart and both lungs; with its uncertainty, the "
                    "content check's chest score and the review flag when the model gives them; printed "
                    "too). --explain blends an "
                    "occlusion-sensitivity map on top: how far the predicted heart box moves when each "
                    "region of the image is covered.")
    p.add_argument("file", type=Path, metavar="FILE", help="a DICOM file")
    p.add_argument("--out", required=True, type=Path, help="PNG to write (e.g. overlay.png)")
    p.add_argument("--model", type=Path, help="ONNX model (default: the model shipped with heartbatch)")
    p.add_argument("--explain", action="store_true",
                   help="blend an occlusion-sensitivity map (runs the model about 200 more times)")
    p.add_argument("--size", type=positive_int, default=1024,
                   help="longer side of the PNG in pixels, never above the original (1024)")
    p.add_argument("--ctr-threshold", type=ratio, default=0.5, help="CTR above this is 'enlarged' (0.50)")
    add_content_check(p)
    p.add_argument("--threads", type=positive_int, help="onnxruntime threads (default: one per core)")
    p.set_defaults(func=cmd_show)


def cmd_show(args) -> int:
    from rich.console import Console

    from ..confidence import Policy
    from ..dicom import read_dicom
    from ..overlay import Marks, draw_marks, to_rgb
    from ..pixels import display
    from ..workers import measure_one

    console = Console(stderr=True)
    if not args.file.is_file():
        raise UsageError(f"no such file: {args.file}")
    model = load_model(args.model, args.threads, console)
    info = model.info
    policy = Policy.for_model(info.metadata, args.ctr_threshold, args.content_check, args.min_chest_score)
    record, model_input = measure_one(str(args.file), model, policy)
    if not record.ok:
        fail(console, f"{args.file}: {record.reason}", "error" if model_input is not None else str(record.status))
        return ExitCode.NOTHING
    dicom = read_dicom(args.file)  # the whole image, for the picture; the record is the report's
    rows, columns = dicom.image.shape
    image = to_rgb(display(dicom.image, args.size))
    note = ""
    if args.explain:
        from ..explain import blend, occlusion_map

        heat = occlusion_map(model, model_input, rows, columns)
        image = blend(image, heat)
        note = (f"occlusion map: covering a region moves the heart box by "
                f"{heat.min():.0f}-{heat.max():.0f} px (red: most)")
    draw_marks(image, rows, columns, Marks.from_record(record), note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, format="PNG")
    print(json.dumps({"file": str(args.file), "out": str(args.out), "model_id": info.model_id,
                      "heart": [round(v, 3) for v in record.heart],
                      "thorax": [round(v, 3) for v in record.thorax] if record.thorax else None,
                      "ctr": None if record.ctr is None else round(record.ctr, 4), "enlarged": record.enlarged,
                      "chest_score": None if record.chest_score is None else round(record.chest_score, 3),
                      "uncertainty": None if record.uncertainty is None else round(record.uncertainty, 4),
                      "review": bool(record.review), "review_reason": record.review_reason,
                      **({"explain_max_shift_px": round(float(heat.max()), 3)} if args.explain else {})}))
    if record.review:  # the JSON line is for scripts; a person reading the terminal must see this too
        from rich.markup import escape

        console.print(f"[bold yellow]review:[/] {escape(record.review_reason or 'check this measurement')}",
                      highlight=False)
    return ExitCode.OK

