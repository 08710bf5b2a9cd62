"""The SavedModels of an export: ``serving_default`` for TF Serving, and the two-signature one the
TFLite converter reads.

``serving_default`` holds the whole chain (localiser -> in-graph level crops -> grader ->
probabilities): one float32 input per view ``[None, S, S, 3]`` (0-255) named by the view, outputs
``grade_probs``, ``threshold_probs``, ``presence`` and ``level_xy``. ``presence`` follows the flag the
model carries (`models.end_to_end.StudyGrades`): P(>=1) when its training labels knew grades 0/1,
else P(>=2). A ``metadata`` signature returns the version's metadata.json (`write_saved_model`).

An axial model (``preprocess.axial`` set) has no single-call signature: its axial crops are cut
around the localiser's own ``level_xy``. Its SavedModel has ``localize`` (localiser view ->
``level_xy``) and ``grade`` (views + ``ax_t2`` ``[None, 5, C, C, 2n+1]`` -> the contract's outputs;
also ``serving_default``); the client projects with `lumbar_tf.axial` between them (contract
`AXIAL_SIGNATURES`, docs/architecture.md "Axial projection").
"""

from __future__ import annotations

from lumbar_tf.core.contract import (
    GRADE,
    LEVEL_INDEX,
    LEVEL_XY,
    LOCALIZE,
    METADATA_INPUT,
    METADATA_OUTPUT,
    METADATA_SIGNATURE,
    OUTPUT_SPECS,
    SERVING_SIGNATURE,
    THRESHOLD_PROBS,
)

# The SavedModel must reproduce Keras to float rounding (graph vs eager kernels: ~2e-5 measured on a
# trained demo-sized model, whose grader is steep); more than this means a broken export.
SAVED_MODEL_TOLERANCE = 1e-3


def write_saved_model(model, cfg, path, metadata: dict | None = None) -> None:
    """The end-to-end model as a SavedModel with the ``serving_default`` signature of the contract,
    and, given ``metadata``, a ``metadata`` signature returning it as JSON (contract
    `METADATA_SIGNATURE`), so clients take the preprocessing from the model they call."""
    import keras
    import tensorflow as tf

    size = cfg.view_size
    # No archive.track(model): add_endpoint tracks every variable the endpoint uses, and track() would
    # store each weight a second time (keras-team/keras#23553: 2x SavedModel size and serving memory).
    archive = keras.export.ExportArchive()
    specs = {name: tf.TensorSpec([None, size, size, 3], tf.float32, name=name) for name in cfg.view_names}

    def serve(views):
        outputs = model(views, training=False)
        return {key: outputs[key] for key in OUTPUT_SPECS}

    if cfg.axial is None:
        archive.add_endpoint(SERVING_SIGNATURE, serve, input_signature=[specs])
    else:
        # The first endpoint is also serving_default (ExportArchive.write_out): grade, the one that
        # returns the contract's outputs; a views-only request to it names the missing ax_t2.
        c, a = cfg.crop_size, cfg.axial
        specs[a.name] = tf.TensorSpec([None, 5, c, c, a.channels], tf.float32, name=a.name)
        archive.add_endpoint(GRADE, serve, input_signature=[specs])
        localizer = model.get_layer("localizer")

        def localize(view):
            return {LEVEL_XY: localizer(view, training=False)}

        archive.add_endpoint(
            LOCALIZE,
            localize,
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name=cfg.localizer_view)],
        )
    if metadata is not None:
        import json

        text = json.dumps(metadata, sort_keys=True, allow_nan=False)

        def served_metadata(rows):
            return {METADATA_OUTPUT: tf.fill(tf.shape(rows), tf.constant(text))}

        archive.add_endpoint(
            METADATA_SIGNATURE,
            served_metadata,
            input_signature=[tf.TensorSpec([None], tf.float32, name=METADATA_INPUT)],
        )
    archive.write_out(str(path), verbose=False)


def write_edge_saved_model(model, cfg, path) -> None:
    """A SavedModel with the two TFLite signatures: ``localize`` and ``grade`` (probabilities); an
    axial model's ``grade`` also takes the axial crops ``[N, C, C, 2n+1]``, one per level crop."""
    import keras
    import tensorflow as tf

    localizer = model.get_layer("localizer")
    grader = model.get_layer("grader")
    s, c = cfg.view_size, cfg.crop_size
    archive = keras.export.ExportArchive()  # not track(): see write_saved_model

    def localize(view):
        return {LEVEL_XY: localizer(view, training=False)}

    def grade(crops):
        return {THRESHOLD_PROBS: keras.ops.sigmoid(grader(crops, training=False))}

    archive.add_endpoint(
        LOCALIZE,
        localize,
        input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32, name=cfg.localizer_view)],
    )
    grade_specs = {name: tf.TensorSpec([None, c, c, 3], tf.float32, name=name) for name in cfg.view_names}
    if cfg.axial is not None:
        a = cfg.axial
        grade_specs[a.name] = tf.TensorSpec([None, c, c, a.channels], tf.float32, name=a.name)
    grade_specs[LEVEL_INDEX] = tf.TensorSpec([None], tf.int32, name=LEVEL_INDEX)
    archive.add_endpoint(GRADE, grade, input_signature=[grade_specs])
    archive.write_out(str(path), verbose=False)
