"""heartbatch: heart and thorax boxes and cardiothoracic ratio on chest X-ray DICOMs.

The API is imported lazily so that the command line starts fast:
``heartbatch.predict(path)``, ``heartbatch.predict_folder(folder)``,
``heartbatch.load_model(path)``, ``heartbatch.Record``.
"""

__version__ = "0.1.0"

__all__ = ["predict", "predict_folder", "load_model", "Record", "__version__"]


def __getattr__(name):
    if name in ("predict", "predict_folder", "load_model"):
        from . import api

        return getattr(api, name)
    if name == "Record":
        from .records import Record

        return Record
    raise AttributeError(f"module 'heartbatch' has no attribute {name!r}")
