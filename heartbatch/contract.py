"""The ONNX model contract shared by the exporter and the runtime.

Input ``image``: float32 ``[N, 1, S, S]`` in [0, 1], produced by
:mod:`heartbatch.pixels`; S >= 224 and recorded in metadata.  Output ``boxes``:
float32 ``[N, 8]`` (heart then thorax) or ``[N, 4]`` (heart only), each
``x0, y0, x1, y1`` normalized to the image width/height.  Normalization
(mean/std) is inside the graph.
"""

from __future__ import annotations

INPUT_NAME = "image"
OUTPUT_NAME = "boxes"
FORMAT_VERSION = "1"
MIN_INPUT_SIZE = 224

HEART_COLUMNS = ("heart_x0", "heart_y0", "heart_x1", "heart_y1")
THORAX_COLUMNS = ("thorax_x0", "thorax_y0", "thorax_x1", "thorax_y1")
OUTPUT_LAYOUTS = {
    8: ",".join(HEART_COLUMNS + THORAX_COLUMNS),
    4: ",".join(HEART_COLUMNS),
}

# optional outputs: name -> shape (None: any size), see :mod:`heartbatch.confidence`
CHEST_SCORE = "chest_score"      # [N] in [0, 1]: a frontal chest film, upright, not a negative
UNCERTAINTY = "uncertainty"      # [N, 8]: one standard deviation of each box coordinate (normalized)
CONTENT = "content"              # [N, K]: content class probabilities, class names in META_TRUST
CHEST_DISTANCE = "chest_distance"  # [N]: distance of the film's features from the training films'
OPTIONAL_OUTPUTS = {CHEST_SCORE: ("N",), UNCERTAINTY: ("N", 8), CONTENT: ("N", None), CHEST_DISTANCE: ("N",)}
# [N, 3, H, W], H and W at most S: probabilities of heart, right lung, left lung (the patient's) on the
# model input's grid; with it the runtime measures from the masks (:mod:`heartbatch.masks`)
MASKS = "masks"
MASK_CHANNELS = ("heart", "right_lung", "left_lung")

# metadata_props keys
META_FORMAT = "heartbatch.format_version"
META_INPUT_SIZE = "heartbatch.input_size"
META_OUTPUT_LAYOUT = "heartbatch.output_layout"
META_PREPROCESSING = "heartbatch.preprocessing"
META_PIXELS_VERSION = "heartbatch.pixels_version"
META_NORMALIZATION = "heartbatch.normalization"
META_TRAINING_DATA = "heartbatch.training_data"
META_VALIDATION = "heartbatch.validation_metrics"
META_CODE_VERSION = "heartbatch.code_version"
META_SOURCE = "heartbatch.source_checkpoint"
META_TRUST = "heartbatch.trust"  # JSON: content classes and the thresholds the model card recommends

REQUIRED_METADATA = (META_FORMAT, META_INPUT_SIZE, META_OUTPUT_LAYOUT, META_PREPROCESSING,
                     META_TRAINING_DATA, META_VALIDATION, META_CODE_VERSION)
