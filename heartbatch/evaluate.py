"""Accuracy of a model on labeled images, with onnxruntime only (`heartbatch evaluate`, and the
exporter's checks).

    heartbatch evaluate --data ../shared/data/cxr-ctr --split runs/default/split.json

Reports heart and thorax box IoU, heart coordinate error in pixels at 224 x
224 (the original project's measure), CTR error against the mask-derived CTR
and against expert CTR where given, and agreement of the CTR > threshold call.
"""

from __future__ import annotations

import math


def predict_items(model, items, batch_size: int = 16):
    import numpy as np

    from .images import load_image
    from .pixels import preprocess

    size = model.info.input_size
    out = []
    for start in range(0, len(items), batch_size):
        batch = [preprocess(load_image(i.image_path), size) for i in items[start:start + batch_size]]
        out.append(model.predict(np.stack(batch)))
    return np.concatenate(out) if out else np.zeros((0, model.info.outputs))


def evaluate(model, items, threshold: float = 0.5, batch_size: int = 16) -> dict:
    import numpy as np

    from .metrics import box_metrics

    pred = predict_items(model, items, batch_size)
    true = np.stack([i.boxes for i in items])[:, :pred.shape[1]]
    expert = np.array([i.expert_ctr for i in items], dtype=np.float64)
    return box_metrics(pred, true, threshold, expert if np.isfinite(expert).any() else None)


def _f(value, digits=3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_metrics(m: dict, threshold: float) -> str:
    lines = [f"images                      {m['n']}",
             f"heart IoU mean / median     {_f(m['heart_iou_mean'])} / {_f(m['heart_iou_median'])}",
             f"heart MAE (px at 224)       {_f(m['heart_mae_px224'], 2)}"]
    if "thorax_iou_mean" in m:
        a = m["ctr_agreement"]
        lines += [f"thorax IoU mean / median    {_f(m['thorax_iou_mean'])} / {_f(m['thorax_iou_median'])}"
                  f"   (n={m['thorax_n']})",
                  f"thorax MAE (px at 224)      {_f(m['thorax_mae_px224'], 2)}",
                  f"CTR MAE vs masks            {_f(m['ctr_mae'], 4)}",
                  f"CTR > {threshold:.2f} vs masks        accuracy {_f(a['accuracy'])}  sensitivity "
                  f"{_f(a['sensitivity'])}  specificity {_f(a['specificity'])}  (positives {a['positives']})"]
        if "expert_ctr_mae" in m:
            e = m["expert_ctr_agreement"]
            lines += [f"CTR MAE vs expert           {_f(m['expert_ctr_mae'], 4)}   (n={m['expert_n']})",
                      f"CTR > {threshold:.2f} vs expert       accuracy {_f(e['accuracy'])}  sensitivity "
                      f"{_f(e['sensitivity'])}  specificity {_f(e['specificity'])}  (positives {e['positives']})"]
    return "\n".join(lines)
