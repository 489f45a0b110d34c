"""Triton Python-backend models shipped into a generated model repository (``export.triton``).

These files are copied as ``<model>/1/model.py``; they run inside Triton's Python
backend and import only numpy (and onnxruntime for the ``python`` flavour of the
encoders and scorer), never mssan_infer or torch, so the repository works in
NVIDIA's stock ``tritonserver`` containers. Outside Triton they import fine
(``pb_utils`` is then ``None``), so tooling and tests can load them.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["ONNX_MODEL", "RETRIEVER_MODEL"]

_HERE = Path(__file__).resolve().parent
ONNX_MODEL = _HERE / "onnx_model.py"            # encoders / scorer on ONNX Runtime inside the Python backend
RETRIEVER_MODEL = _HERE / "retriever_model.py"  # two-stage search over a saved index, via BLS
