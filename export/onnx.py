"""``torch.onnx.export`` of one graph wrapper, driven by its spec, and the static ONNX checks.

The legacy (TorchScript) exporter is used on purpose: it exports the masked
Bi-GRU (two ``nn.GRU`` and a gather reversal) with dynamic batch and length and
matches PyTorch to ~1e-7; the dynamo exporter fails on it.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from mssan_infer.spec import GraphSpec

from .errors import ExportError
from .inputs import Feeds
from .runners import to_torch

__all__ = ["DEFAULT_OPSET", "export_graph", "check_onnx"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 14  # older opsets are not tested


def export_graph(
    module: nn.Module,
    spec: GraphSpec,
    example: Feeds,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Trace ``module`` on ``example`` and write a single-file ONNX graph to ``path``.

    Args:
        module: a wrapper from ``export.graphs`` (eval mode).
        spec: its ``GraphSpec``; gives input/output names and, by default, dynamic axes.
        example: the tracing inputs, keyed by the spec's input names.
        dynamic_axes: override of ``spec.dynamic_axes()`` (tests use it to export a broken graph).
    Raises:
        ExportError: bad opset, missing example inputs, or an exporter/checker failure.
    """
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(
            f"opset must be an integer >= {MIN_OPSET}, got {opset!r}; the default is {DEFAULT_OPSET}"
        )
    missing = [n for n in spec.input_names if n not in example]
    if missing:
        raise ExportError(f"example inputs for {spec.name} lack {missing}")
    out = Path(path)
    args = tuple(to_torch(example)[n] for n in spec.input_names)
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            # Batch-size warning of RNN export: dynamic B and L are checked by parity at B=1 and B>example.
            warnings.filterwarnings("ignore", message=".*batch_size other than 1.*GRU.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                module,
                args,
                str(out),
                dynamo=False,
                export_params=True,
                opset_version=opset,
                do_constant_folding=True,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes() if dynamic_axes is None else dynamic_axes,
            )
    except Exception as e:  # the exporter raises many types
        raise ExportError(f"torch.onnx.export failed for {spec.name} (opset {opset}): {e}") from e
    check_onnx(out)
    log.info("exported %s (opset %d, %.1f KiB)", out.name, opset, out.stat().st_size / 1024)
    return out


def check_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """``onnx.checker`` (full) and strict shape inference; returns the shape-inferred model.

    Raises:
        ExportError: the graph is not valid ONNX or its types/shapes do not infer.
    """
    p = Path(path)
    try:
        onnx.checker.check_model(str(p), full_check=True)
        model = onnx.load(str(p))
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # onnx raises ValidationError, InferenceError, ...
        raise ExportError(f"{p.name} failed the ONNX checker / shape inference: {e}") from e
    return inferred
