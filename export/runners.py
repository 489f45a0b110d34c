"""The runners export's parity check compares (Polygraphy style): each is a ``mssan_infer`` ``Backend``.

- :class:`TorchRunner`: the PyTorch graph wrappers (``export.graphs``), the reference of the
  ONNX graphs;
- :func:`onnx_runner`: ONNX graph files in ONNX Runtime on the CPU, as export checks them
  (fp16 graphs with explicit fp16 rounding), the reference of the TensorRT engines;
- ``mssan_infer.backends.tensorrt.TensorRTBackend``: the engines.

So every runner takes the same feeds, checked the same way, and gives float32 outputs
keyed by the spec's names; ``export.validate`` compares any two of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import torch
from torch import nn

from mssan_infer import OnnxRuntimeOptions
from mssan_infer.backends.base import Backend
from mssan_infer.backends.onnxruntime import OnnxRuntimeBackend
from mssan_infer.errors import BundleError

from .fp16 import with_explicit_rounding

__all__ = ["TorchRunner", "onnx_runner", "to_torch"]


def to_torch(feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


class TorchRunner(Backend):
    """PyTorch modules as a runner: ``{graph: module}`` whose ``forward`` takes the spec's inputs in order.

    Args:
        modules: e.g. ``export.graphs.build_graphs(model)`` (eval mode).
        dims: sizes of the fixed axes (``D``, ``D2``, ``Dv``, ``C``) the modules take.
    """

    name = "pytorch"

    def __init__(self, modules: Mapping[str, nn.Module], dims: Mapping[str, int]) -> None:
        super().__init__("cpu")
        self._modules = dict(modules)
        for graph in self._modules:
            spec = self._add_graph(graph)
            self._dims[graph] = {a: int(dims[a]) for t in spec.inputs for a in t.axes if a in dims}

    @torch.inference_mode()
    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.spec(graph)
        t = to_torch(feeds)
        out = self._modules[graph](*(t[n] for n in spec.input_names))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {name: o.detach().cpu().numpy() for name, o in zip(spec.output_names, outs)}


def onnx_runner(paths: Mapping[str, str | os.PathLike[str]], precision: str = "fp32") -> OnnxRuntimeBackend:
    """ONNX Runtime on the CPU over ``{graph: .onnx}``.

    fp32: as the runtime loads the graphs (default graph optimisations). fp16: on copies
    with explicit fp16 rounding (``export.fp16.with_explicit_rounding``) and graph
    optimisations off, so the check sees the error of a real fp16 device, not the fp32
    emulation of the CPU provider.

    Raises:
        BundleError: a graph ONNX Runtime cannot load, or whose inputs/outputs differ from the spec.
    """
    if precision != "fp16":
        return OnnxRuntimeBackend(dict(paths))
    models: dict[str, str | os.PathLike[str] | bytes] = {}
    for graph, path in paths.items():
        try:
            models[graph] = with_explicit_rounding(onnx.load(str(path))).SerializeToString()
        except Exception as e:  # onnx raises OSError and protobuf's DecodeError
            raise BundleError(f"cannot read {Path(path).name}: {e}") from e
    return OnnxRuntimeBackend(models, OnnxRuntimeOptions(graph_optimization="disable"))
