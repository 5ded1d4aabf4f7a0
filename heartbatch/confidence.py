"""How sure a measurement is: the content check, the CTR's uncertainty and the review rules.

A model may carry the optional outputs of the contract (``chest_score``,
``uncertainty``, and heartbatch's ``content`` class probabilities) and, in
its metadata (``heartbatch.trust``), the thresholds its model card
recommends.  From them and from the boxes themselves this module decides, per
image: refuse it (not a frontal chest film by its content), or measure it and
say whether a person should look (``review``) and why.

The box rules hold for any model: they are the anatomical ranges of the 446
training films (CTR 0.35-0.83, thorax box 61-98 % of the film width, heart box
height / width 0.51-1.47, heart centre 0.02-0.31 thorax widths right of the
thorax midline for all but one film), widened by a margin.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from . import contract


CONTENT_REASON = "not a frontal chest radiograph by its content"
#: a measured film whose content score is between the refusal and the review cut
UNSURE_REASON = "unsure it is a frontal chest film"
#: a measured film far from every training film: flagged, never refused for it alone
UNLIKE_REASON = "unlike the films the model was trained on"
#: the silhouette sign: a lung as white as the heart beside it hides the border the CTR is measured at
HIDDEN_BORDER_REASON = "heart border hidden: the lung beside it is as white as the heart (effusion, consolidation?)"


def is_content_reason(reason: str) -> bool:
    """A skipped row's reason says the content check refused it (the CSV keeps the reason, not its code)."""
    return reason.startswith(CONTENT_REASON)


#: what a refused film most looks like, by the content classifier's most likely wrong class
WRONG_KIND_REASONS = {
    "negative": "looks like a negative (inverted display?)",
    "turned": "turned 90 degrees?",
    "upside_down": "upside down?",
    "cropped": "only part of a chest film (cropped?)",
}

CTR_RANGE = (0.33, 0.85)
MIN_THORAX_WIDTH = 0.55   # of the film width; below it the boxes have likely collapsed
MIN_THORAX_HEIGHT = 0.30
HEART_ASPECT = (0.45, 1.6)
HEART_OUTSIDE = 0.03      # of the film width: the heart box may poke out of the thorax box this much
MIRRORED_OFFSET = 0.0     # heart centre left of the thorax midline, in thorax widths


@dataclass(frozen=True)
class Prediction:
    """One image's model outputs (normalized units); None where the model has no such output."""
    boxes: np.ndarray
    chest_score: float | None = None
    uncertainty: np.ndarray | None = None   # [8] one standard deviation per coordinate
    content: np.ndarray | None = None       # [K] class probabilities
    distance: float | None = None           # how far the film's features lie from the training films'
    masks: np.ndarray | None = None         # [3, H, W] heart, right lung, left lung probabilities (model grid)
    border_contrast: float | None = None    # :func:`heart_border_contrast` of the model's input and boxes


@dataclass(frozen=True)
class Policy:
    """What to do with the predictions: thresholds, fixed for a run (they key the ledger)."""
    threshold: float = 0.5                  # CTR above it: enlarged
    content_check: bool = True
    min_chest_score: float = 0.5            # below: skipped by the content check
    review_chest_score: float = 0.8         # below (and measured): review
    review_uncertainty: float = 0.02        # CTR standard deviation above it: review
    mirrored_probability: float = 0.5       # content class "mirrored" above it: review
    review_distance: float | None = None    # chest_distance above it: review ("unlike the training films")
    min_border_contrast: float | None = None  # heart_border_contrast below it: review (the heart border is hidden)
    classes: tuple[str, ...] = ()           # the content output's class names

    @classmethod
    def for_model(cls, metadata: dict[str, str], threshold: float = 0.5, content_check: bool = True,
                  min_chest_score: float | None = None) -> "Policy":
        """The model card's recommended thresholds (from the model's metadata), the user's overrides."""
        try:
            trust = json.loads(metadata.get(contract.META_TRUST, "{}"))
        except ValueError:
            trust = {}
        defaults = cls()
        recommended = trust.get("min_chest_score", defaults.min_chest_score)
        return cls(threshold=threshold, content_check=content_check,
                   min_chest_score=recommended if min_chest_score is None else min_chest_score,
                   review_chest_score=trust.get("review_chest_score", defaults.review_chest_score),
                   review_uncertainty=trust.get("review_uncertainty", defaults.review_uncertainty),
                   mirrored_probability=trust.get("mirrored_probability", defaults.mirrored_probability),
                   review_distance=trust.get("review_distance", defaults.review_distance),
                   min_border_contrast=trust.get("min_border_contrast", defaults.min_border_contrast),
                   classes=tuple(trust.get("classes", ())))

    def key(self) -> str:
        """What of this policy shapes a row (the ledger re-measures a file when it changes)."""
        return (f"threshold={self.threshold:g};content={'on' if self.content_check else 'off'}"
                f";min_chest={self.min_chest_score:g};review={self.review_chest_score:g},"
                f"{self.review_uncertainty:g},{self.mirrored_probability:g}"
                + ("" if self.review_distance is None else f",{self.review_distance:g}")
                + ("" if self.min_border_contrast is None else f";border={self.min_border_contrast:g}"))


def refusal(prediction: Prediction, policy: Policy) -> str | None:
    """The reason this image is not measured by its content, or None."""
    if not policy.content_check or prediction.chest_score is None:
        return None
    if prediction.chest_score >= policy.min_chest_score:
        return None
    detail = WRONG_KIND_REASONS.get(_likely_class(prediction, policy) or "")  # said only when it is the likeliest
    return f"{CONTENT_REASON}: {detail}" if detail else CONTENT_REASON


def _likely_class(prediction: Prediction, policy: Policy) -> str | None:
    if prediction.content is None or len(policy.classes) != len(prediction.content):
        return None
    return policy.classes[int(np.argmax(prediction.content))]


def ctr_uncertainty(boxes: np.ndarray, sd: np.ndarray) -> float | None:
    """One standard deviation of heart width / thorax width, from the coordinates' (first order)."""
    if sd is None or len(boxes) < 8:
        return None
    heart_w, thorax_w = boxes[2] - boxes[0], boxes[6] - boxes[4]
    if not thorax_w > 0:
        return None
    ratio = heart_w / thorax_w
    variance = (sd[0] ** 2 + sd[2] ** 2 + ratio ** 2 * (sd[4] ** 2 + sd[6] ** 2)) / thorax_w ** 2
    return float(math.sqrt(variance))


def heart_border_contrast(image: np.ndarray, boxes: np.ndarray) -> float | None:
    """How much brighter the heart is than the lung beside it, on the side where it is least so.

    ``image``: the model's input ``[S, S]``; ``boxes``: normalized heart + thorax boxes. On the heart's
    rows, the median of the heart box minus the median of the strip between it and the thorax edge,
    in units of the thorax's 5-95 % intensity range. Below 0 on either side the heart's edge there
    is not visible (the silhouette sign), so the CTR rests on a guessed border. None where the boxes
    leave no strip to compare.
    """
    if len(boxes) < 8 or not np.isfinite(boxes[:8]).all():
        return None
    s = image.shape[0]
    hx0, hy0, hx1, hy1, tx0, ty0, tx1, ty1 = np.clip(np.round(np.asarray(boxes[:8]) * s), 0, s).astype(int)
    heart = image[hy0:hy1, hx0:hx1]
    thorax = image[ty0:ty1:2, tx0:tx1:2]  # a quarter of the pixels: the percentiles are the cost here
    if heart.size == 0 or thorax.size == 0:
        return None
    low, high = np.percentile(thorax, (5, 95))
    sides = [image[hy0:hy1, a:b] for a, b in ((tx0, hx0), (hx1, tx1)) if b - a > 2]
    if len(sides) < 2 or high - low <= 1e-3:
        return None
    centre = np.median(heart)
    return float(min(centre - np.median(side) for side in sides) / (high - low))


def box_problems(boxes: np.ndarray, aspect: float = 1.0) -> list[str]:
    """What is anatomically implausible about a heart + thorax box pair (normalized; ``aspect``:
    the film's rows / columns, for the heart box's shape in pixels)."""
    if len(boxes) < 8:
        return []
    hx0, hy0, hx1, hy1, tx0, ty0, tx1, ty1 = (float(v) for v in boxes[:8])
    heart_w, heart_h, thorax_w, thorax_h = hx1 - hx0, hy1 - hy0, tx1 - tx0, ty1 - ty0
    problems = []
    if thorax_w < MIN_THORAX_WIDTH or thorax_h < MIN_THORAX_HEIGHT:
        problems.append("thorax box covers little of the film (collapsed boxes?)")
    if hx0 < tx0 - HEART_OUTSIDE or hx1 > tx1 + HEART_OUTSIDE or hy0 < ty0 - HEART_OUTSIDE:
        problems.append("heart box outside the thorax box")
    if heart_w > 0 and not HEART_ASPECT[0] <= heart_h * aspect / heart_w <= HEART_ASPECT[1]:
        problems.append("heart box of an unusual shape")
    if thorax_w > 0:
        ratio = heart_w / thorax_w
        if not CTR_RANGE[0] <= ratio <= CTR_RANGE[1]:
            problems.append(f"CTR outside {CTR_RANGE[0]:.2f}-{CTR_RANGE[1]:.2f}, the range of the training films")
        if ((hx0 + hx1) - (tx0 + tx1)) / 2 / thorax_w < MIRRORED_OFFSET:
            problems.append("heart on the image left (mirrored film or dextrocardia?)")
    return problems


def review_reasons(prediction: Prediction, policy: Policy, ctr_sd: float | None, aspect: float = 1.0) -> list[str]:
    """Why a person should check this measurement (empty: no reason found)."""
    reasons = []
    if prediction.chest_score is not None and prediction.chest_score < policy.review_chest_score:
        detail = WRONG_KIND_REASONS.get(_likely_class(prediction, policy) or "")  # what the reader should check
        reasons.append(f"{UNSURE_REASON}: {detail}" if detail else UNSURE_REASON)
    if (prediction.content is not None and "mirrored" in policy.classes
            and len(policy.classes) == len(prediction.content)
            and prediction.content[policy.classes.index("mirrored")] > policy.mirrored_probability):
        reasons.append("mirrored film or dextrocardia?")
    if (prediction.distance is not None and policy.review_distance is not None
            and prediction.distance > policy.review_distance):
        reasons.append(UNLIKE_REASON)
    if ctr_sd is not None and ctr_sd > policy.review_uncertainty:
        reasons.append("uncertain heart or thorax borders")
    if (prediction.border_contrast is not None and policy.min_border_contrast is not None
            and prediction.border_contrast < policy.min_border_contrast):
        reasons.append(HIDDEN_BORDER_REASON)
    for problem in box_problems(prediction.boxes, aspect):
        if problem.startswith("heart on the image left") and "mirrored film or dextrocardia?" in reasons:
            continue
        reasons.append(problem)
    if prediction.masks is not None:
        from .masks import mask_problems

        reasons.extend(mask_problems(prediction.masks, prediction.boxes))
    return reasons
