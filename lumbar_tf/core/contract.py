"""Names shared by training, export and every runtime: defined once so they cannot drift apart.

Signature, tensor and file names of the export contract (DESIGN.md "Export contract"), the output
specification, and the intended-use line that every report, metadata file and output carries.
"""

from __future__ import annotations

INTENDED_USE = "Research decision support only; not for diagnosis."

DEFAULT_MODEL_NAME = "lumbar_spine"

# SavedModel (TF Serving): one request per study.
SERVING_SIGNATURE = "serving_default"
SERVING_WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"  # inside each SavedModel version
OUTPUT_SPECS = {
    "grade_probs": ([None, 5, 5, 4], "P(grade) per (condition, level): none, mild, moderate, severe"),
    "threshold_probs": ([None, 5, 5, 3], "P(grade>=1), P(grade>=2), P(grade>=3) per (condition, level)"),
    "presence": ([None, 5, 5], "probability of degeneration per (condition, level); see 'label_semantics'"),
    "level_xy": ([None, 5, 2], "disc-level centres (x, y) in normalised view coordinates, L1/L2..L5/S1"),
}
OUTPUT_NAMES = tuple(OUTPUT_SPECS)
# The served model's own metadata.json (preprocessing, label semantics, quality bounds), so a client
# needs no file beside it: ``rows [B] float32`` (any values; TF Serving refuses signatures without
# inputs and its batching needs a batch axis) -> ``metadata [B]`` string, the JSON once per row.
METADATA_SIGNATURE = "metadata"
METADATA_INPUT = "rows"
METADATA_OUTPUT = "metadata"

# TFLite (tablets): two signatures, the runner crops between them.
LOCALIZE = "localize"
GRADE = "grade"
TFLITE_SIGNATURES = (LOCALIZE, GRADE)
LEVEL_INDEX = "level_index"
LEVEL_XY = "level_xy"
THRESHOLD_PROBS = "threshold_probs"
TFLITE_METADATA_NAME = "lumbar_tf_metadata"  # flatbuffer metadata entry holding the JSON metadata
# An axial model's SavedModel (issue 11): the axial crops depend on where the levels are, so a study
# takes two calls, in this order: ``localize`` (localiser view -> level_xy), the client projects the
# levels onto the Axial T2 series with `lumbar_tf.axial`, then ``grade`` (views + the axial input
# ``[B, 5, S, S, C]``, named by ``preprocess.axial.name``) -> the `OUTPUT_SPECS` tensors. ``grade`` is
# also that SavedModel's ``serving_default``. metadata.json ``axial`` describes the input.
AXIAL_SIGNATURES = (LOCALIZE, GRADE)

# Files.
MODEL_FILE = "model.keras"  # a run folder's end-to-end model
RUN_CONFIG_FILE = "config.yaml"
RUN_PRIOR_FILE = "prior.json"  # the training split's class frequencies, {"threshold_probs": [5,5,3]}
RUN_LABEL_SEMANTICS_FILE = "label_semantics.json"  # which thresholds the training labels made known
METADATA_FILE = "metadata.json"  # beside each SavedModel version, and at the export root
EXPORT_REPORT_FILE = "export_report.json"
PREDICTIONS_FILE = "predictions.json"
