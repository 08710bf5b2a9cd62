"""A predictor (`runtime.predictor`) that calls TF Serving, over gRPC or REST.

    predictor = ServingPredictor(GrpcClient("tf-serving:8500"))
    result = predict_study(predictor, "test_images/44036939")

The preprocessing parameters, label semantics, prior and quality bounds come from the served model
itself (its ``metadata`` signature, written by `lumbar-tf export`), and the client is then pinned to
the version that answered, so a new version can never be called with an old version's
preprocessing: build a new predictor to follow a new version. A local metadata.json is needed only
for models exported before the signature existed; given both, they must agree.

An axial model (its metadata's ``preprocess.axial``) takes two requests per study, ``localize``
then ``grade`` with the axial crops `runtime.predictor.predict_study` cuts between them; both share
one deadline (the client's ``timeout_s``, from the start of ``localize``).
"""

from __future__ import annotations

import time

import numpy as np

from lumbar_tf.core import labels
from lumbar_tf.core.contract import AXIAL_SIGNATURES, GRADE, LEVEL_XY, LOCALIZE
from lumbar_tf.core.errors import ServingError
from lumbar_tf.runtime.artifacts import load_export_metadata, preprocess_config_from_metadata


class ServingPredictor:
    """TF Serving as a predictor.

    Args:
        client: a `serving.grpc.GrpcClient` or `serving.rest.RestClient` (``predict``,
            ``served_metadata``, ``pin``, ``model_info``).
        metadata: None (the default): ask the served model. Else the export's metadata dict, or a path
            `artifacts.load_export_metadata` accepts, for a model without the ``metadata`` signature.
    """

    def __init__(self, client, metadata=None):
        self.client = client
        self.target = getattr(client, "target", "")
        local = None
        if metadata is not None:
            local = metadata if isinstance(metadata, dict) else load_export_metadata(metadata)
        served, version = self._ask_server(required=local is None)
        if served is not None and local is not None and served["preprocess"] != local.get("preprocess"):
            raise ServingError(
                f"TF Serving at {self.target}: the served model's preprocessing differs from the local "
                "metadata.json (another version?): drop --metadata to use the served one",
                code="CLIENT",
                target=self.target,
            )
        self.metadata = served if served is not None else local
        self.metadata_source = "served model" if served is not None else "local metadata.json"
        self.served_version = version
        if served is not None and version is not None:
            client.pin(version)
        self.preprocess = preprocess_config_from_metadata(self.metadata)
        self.label_semantics = labels.semantics_or_default(self.metadata.get("label_semantics"))
        self.fine_grades = self.label_semantics["fine_grades"]
        self.prior_threshold_probs = (self.metadata.get("prior") or {}).get("threshold_probs")
        self.quality_bounds = self.metadata.get("quality_bounds")
        self._deadline: float | None = None  # of the study whose localize call went out last
        if self.preprocess.axial is not None:
            order = (self.metadata.get("axial") or {}).get("call_order", list(AXIAL_SIGNATURES))
            if list(order) != list(AXIAL_SIGNATURES):
                raise ServingError(
                    f"TF Serving at {self.target}: the axial model's metadata names signatures {order}, "
                    f"this client calls {list(AXIAL_SIGNATURES)}",
                    code="CLIENT",
                    target=self.target,
                )

    def _ask_server(self, required: bool):
        try:
            return self.client.served_metadata()
        except ServingError as exc:
            if required or exc.code != "CLIENT" or "signature" not in str(exc):
                raise
            return None, None  # an older export: the local metadata.json stands in

    def predict_views(self, views: dict, axial=None) -> dict:
        """One request (``serving_default``), or an axial model's ``grade`` request with its axial
        crops ``[B, 5, S, S, C]``, within the deadline its ``localize`` request started."""
        a = self.preprocess.axial
        if a is None:
            return self.client.predict(views)
        if axial is None:
            raise ServingError(
                f"TF Serving at {self.target}: an axial model needs its axial crops (use predict_study)",
                code="CLIENT",
                target=self.target,
            )
        deadline, self._deadline = self._deadline, None
        if deadline is None:
            deadline = time.monotonic() + self.client.timeout_s
        inputs = {**{k: views[k] for k in self.preprocess.view_names}, a.name: np.asarray(axial)}
        return self.client.predict(inputs, signature=GRADE, deadline=deadline, level_inputs=(a.name,))

    def localize_views(self, views: dict) -> np.ndarray:
        """An axial model's ``localize`` request (the localiser view) -> ``level_xy [B, 5, 2]``; starts
        the study's deadline, which its ``grade`` request shares."""
        self._deadline = time.monotonic() + self.client.timeout_s
        name = self.preprocess.localizer_view
        out = self.client.predict({name: views[name]}, signature=LOCALIZE, deadline=self._deadline)
        if len(out) == 1 and LEVEL_XY not in out:  # REST: a signature's only output comes unnamed
            out = {LEVEL_XY: next(iter(out.values()))}
        if LEVEL_XY not in out:
            raise ServingError(
                f"TF Serving at {self.target}: {LOCALIZE} answered without {LEVEL_XY}",
                code="CLIENT",
                target=self.target,
            )
        return out[LEVEL_XY]

    def model_info(self) -> dict:
        info = dict(self.client.model_info())
        if info.get("version") is None:
            info["version"] = self.served_version or self.metadata.get("version")
        return info

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()
