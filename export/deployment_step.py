"""The ``DeploymentStep`` contract between ``export.api`` and the deployment targets.

``export.api`` resolves a target (``export.tensorrt`` / ``export.triton``) to its step and
runs it; the targets only need this type. It lives here, not in ``export.api``, so the
imports flow one way: api -> tensorrt/triton -> deployment_step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DeploymentStep"]

# A deployment step builds artefacts (tensorrt/, triton/) from the verified ONNX graphs
# in the bundle being built and returns manifest entries to merge in.
DeploymentStep = Callable[[Path, dict[str, Any]], dict[str, Any]]
