"""Triton: the Python-backend models of a generated model repository, and a local server (:mod:`.server`).

``retriever_model.py`` and ``onnx_model.py`` are copied as ``<model>/1/model.py`` (``onnx_model.py``
also as the Python-based ``onnxruntime`` backend of ``python -m mssan_infer serve``), each with a copy
of this runtime package beside it as ``mssan_infer/`` (:func:`copy_runtime`). Triton's Python backend
appends the folder of ``model.py`` to ``sys.path``, so the models import ``mssan_infer`` as a normal
package; where ``mssan_infer`` is installed in the server's Python too, the installed copy is found first.
``import mssan_infer`` needs only numpy, so the repository runs in NVIDIA's stock ``tritonserver``
containers without torch. Outside Triton the models import fine (``pb_utils`` is then ``None``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mssan_infer.names import RUNTIME_PACKAGE

__all__ = ["ONNX_MODEL", "RETRIEVER_MODEL", "copy_runtime"]

_HERE = Path(__file__).resolve().parent
_RUNTIME = _HERE.parent
ONNX_MODEL = _HERE / "onnx_model.py"  # one graph on ONNX Runtime inside the Python backend
RETRIEVER_MODEL = _HERE / "retriever_model.py"  # two-stage search over a saved index


def copy_runtime(folder: Path) -> Path:
    """Copy the ``mssan_infer`` package (its ``.py`` files and ``py.typed``) into ``folder/mssan_infer``."""
    dest = Path(folder) / RUNTIME_PACKAGE
    shutil.copytree(_RUNTIME, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    return dest
