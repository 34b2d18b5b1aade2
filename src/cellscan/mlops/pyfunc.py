"""The MLflow face of a model bundle: a ``pyfunc`` whose only artifact is the bundle directory.

Every registered version holds exactly the directory :meth:`CellscanModel.save` writes (artifact
``bundle``), so the registry, ``dvc repro`` (``models/latest``) and the service serve the same
thing. The directory is opaque here: it is written by ``save`` and read by ``load_dir`` only.

``mlflow.pyfunc.load_model("models:/cellscan@champion").predict(...)`` takes image paths or
encoded bytes (a list, or a DataFrame with an ``image`` column), or a preprocessed batch
(N, size, size, C) of floats in [0, 1] or of uint8 / uint16 pixels (other integers, as JSON tensors
give, are refused: send them as uint16 or scaled),
and returns one row per image: ``is_anomaly``,
``reconstruction_error``, ``threshold`` (whatever ``ScoreResult.record`` gives).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from cellscan.core.bundle import CellscanModel

BUNDLE_ARTIFACT = "bundle"
PIP_REQUIREMENTS = [
    "tensorflow-cpu==2.21.0", "keras==3.15.1", "numpy==2.4.6", "pillow==13.0.0", "pandas==2.3.3",
    "scipy", "scikit-learn", "mlflow==3.17.2",
]


# MLflow asks for type hints on predict; they are absent on purpose (they would fix one input type).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)

    class CellscanPyfunc(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        """Loads the bundle in ``load_context`` and scores images with it."""

        model: CellscanModel | None = None

        def load_context(self, context: Any) -> None:
            self.model = CellscanModel.load_dir(Path(context.artifacts[BUNDLE_ARTIFACT]))

        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # noqa: ANN001
            import numpy as np
            import pandas as pd

            if self.model is None:
                self.load_context(context)
            assert self.model is not None
            if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
                res = self.model.score_arrays(unit_batch(model_input))
            else:
                if isinstance(model_input, pd.DataFrame):
                    sources = list(model_input["image"] if "image" in model_input else model_input.iloc[:, 0])
                elif isinstance(model_input, str | bytes | Path):
                    sources = [model_input]
                else:
                    sources = list(model_input)
                res = self.model.score_images(sources)
            return pd.DataFrame([res.record(i) for i in range(len(res.scores))])


def unit_batch(a: Any) -> Any:
    """A preprocessed batch as float32 in [0, 1]: 8- and 16-bit pixels scaled by their range, as image files
    are; floats must already be in [0, 1] (raw counts would score every scan anomalous).

    Raises:
        ImageError: another dtype, or floats outside [0, 1] or not finite.
    """
    import numpy as np

    from cellscan.errors import ImageError

    if a.dtype in (np.uint8, np.uint16):
        return a.astype(np.float32) / np.float32(np.iinfo(a.dtype).max)
    if a.dtype.kind != "f":
        msg = f"a batch of dtype {a.dtype}; expected float pixels in [0, 1], or uint8 / uint16 pixels"
        raise ImageError(msg)
    x = a.astype(np.float32)
    if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        msg = (f"a float batch with values from {np.nanmin(x):g} to {np.nanmax(x):g} (or not finite); "
               "expected pixels in [0, 1]: divide 16-bit counts by 65535, or pass image files")
        raise ImageError(msg)
    return x


def log_bundle(bundle_dir: Path, registered_model_name: str | None) -> Any:
    """Log ``bundle_dir`` as the pyfunc model ``model`` of the active run (and register it)."""
    with warnings.catch_warnings():  # MLflow nags about predict's (deliberately absent) type hints
        warnings.simplefilter("ignore", UserWarning)
        return _log(bundle_dir, registered_model_name)


def _log(bundle_dir: Path, registered_model_name: str | None) -> Any:
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=CellscanPyfunc(),
        artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=registered_model_name,
    )


def load_bundle(model_uri: str) -> CellscanModel:
    """Load a logged or registered pyfunc (``models:/...``, ``runs:/...``) back into a CellscanModel."""
    with warnings.catch_warnings():  # the same type-hint notice, again on loading
        warnings.simplefilter("ignore", UserWarning)
        pm = mlflow.pyfunc.load_model(model_uri)
    from mlflow.exceptions import MlflowException

    from cellscan.errors import ModelError

    try:
        inner = pm.unwrap_python_model()
    except MlflowException:
        inner = None
    if not isinstance(inner, CellscanPyfunc) or inner.model is None:
        msg = (f"{model_uri} is not a cellscan bundle model (logged by an older cellscan?): "
               "train again, or register its bundle directory with `cellscan models register DIR`")
        raise ModelError(msg)
    return inner.model
