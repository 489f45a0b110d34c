"""Checkpoint -> bundle: ONNX graphs (fp32, optional fp16), vocabulary and a verified manifest.

``python -m export --checkpoint CKPT --out DIR`` or ``export.export_bundle(CKPT, DIR)``; a deployment
part added to an existing bundle: ``python -m export --out DIR --add triton`` or
``export.add_to_bundle(DIR, triton=True)``.
"""

from __future__ import annotations

from .api import add_to_bundle, export_bundle
from .errors import ExportError
from .manifest import EXPORTER_VERSION as __version__

__all__ = ["export_bundle", "add_to_bundle", "ExportError", "__version__"]
