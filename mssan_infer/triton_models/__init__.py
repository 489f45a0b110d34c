"""Triton Python-backend models shipped into a generated model repository (``export.triton``).

These files are copied as ``<model>/1/model.py`` (and ``onnx_model.py`` as the
Python-based ``onnxruntime`` backend of ``python -m mssan_infer serve``), each with
the search core beside it as ``mssan_core`` (:func:`copy_core`). They run inside
Triton's Python backend and import only numpy and the core (and onnxruntime to run
graphs), never mssan_infer or torch, so the repository works in NVIDIA's stock
``tritonserver`` containers. Outside Triton they import fine (``pb_utils`` is then
``None``), so tooling and tests can load them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..core.layout import CORE_PACKAGE

__all__ = ["ONNX_MODEL", "RETRIEVER_MODEL", "copy_core"]

_HERE = Path(__file__).resolve().parent
_CORE = _HERE.parent / "core"
ONNX_MODEL = _HERE / "onnx_model.py"            # one graph on ONNX Runtime inside the Python backend
RETRIEVER_MODEL = _HERE / "retriever_model.py"  # two-stage search over a saved index


def copy_core(folder: Path) -> Path:
    """Copy the search core (``mssan_infer/core/*.py``, self-contained) into ``folder/mssan_core``; returns it."""
    dest = Path(folder) / CORE_PACKAGE
    dest.mkdir(parents=True)
    for src in sorted(_CORE.glob("*.py")):
        shutil.copyfile(src, dest / src.name)
    return dest
