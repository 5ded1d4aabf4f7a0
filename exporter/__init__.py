"""Training and export for heartbatch (extra ``[train]``: torch, torchvision, onnx)."""

try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - depends on the install
    raise SystemExit("heartbatch-train and export-onnx need the [train] extra: "
                     "pip install 'heartbatch[train]'") from None
