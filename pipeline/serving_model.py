"""The registered model, as MLflow "models from code": this file plus a safetensors checkpoint.

``registry.log_serving_model`` logs this file with
``mlflow.pyfunc.log_model(python_model=<this path>, artifacts={"checkpoint": dir}, ...)``.
MLflow copies the file into the model and, on load, executes it and takes the object
passed to ``set_model`` — the model object itself is never cloudpickled, and the
weights are read with safetensors after the checkpoint's digests and signature have
been verified (``checkpoint.load_local_for_inference``). Loading in another
environment needs the ``pipeline`` package (logged as ``code_paths``) and the same
signing key as the producer.

Input: a DataFrame of raw rows with the contract's feature columns (the feature
spec inside the checkpoint does the preprocessing). Output: a DataFrame with one
probability column per class, ``proba_<class>``.

This module is meant to be executed by MLflow, not imported by the pipeline: its
last line registers the model object with MLflow.
"""

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class CheckpointModel(PythonModel):
    """Verified safetensors checkpoint behind the pyfunc interface."""

    def load_context(self, context) -> None:
        from pathlib import Path

        from pipeline.checkpoint import load_local_for_inference

        self.model, self.spec, verification = load_local_for_inference(
            Path(context.artifacts["checkpoint"])
        )
        self.manifest_sha256 = verification.manifest_sha256

    # pd.DataFrame in, pd.DataFrame out: the hints MLflow accepts without deriving a schema
    # from them (the schema is the logged signature, inferred from the input example).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from pipeline.evaluate import predict_frame

        return predict_frame(self.model, self.spec, pd.DataFrame(model_input))


set_model(CheckpointModel())
