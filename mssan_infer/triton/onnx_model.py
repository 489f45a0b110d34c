"""Triton Python-backend model: one MSSAN graph (``model.onnx`` beside this file) on ONNX Runtime.

Used two ways:

- the ``python`` flavour of a generated repository (``<model>/1/model.py``);
- the Python-based backend named ``onnxruntime`` that ``python -m mssan_infer serve``
  gives the tritonserver of nvidia-pytriton (``backends/onnxruntime/model.py``), which
  has no ONNX Runtime backend of its own: the default (``onnxruntime``) flavour then
  loads unchanged, and NVIDIA's containers run the same repository on their C++ backend.

Requests of a dynamic batch whose inputs agree on every non-batch dimension are
concatenated and run as one batch. The graph runs in
:class:`mssan_infer.backends.onnxruntime.OnnxGraph` (the runtime package is copied beside this
file, see :mod:`mssan_infer.triton`). Parameters: ``intra_op_thread_count``
(the name Triton's onnxruntime backend uses; 0 = ONNX Runtime's default).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from mssan_infer.backends.onnxruntime import OnnxGraph

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tooling, tests)
    pb_utils = None


def thread_count(params: dict[str, str]) -> int:
    """Intra-op threads from a model's parameters (``intra_op_thread_count``)."""
    return int(params.get("intra_op_thread_count") or 0)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        self.batching = int(cfg.get("max_batch_size", 0)) > 0
        path = os.path.join(args["model_repository"], str(args["model_version"]), "model.onnx")
        self.graph = OnnxGraph(path, threads=thread_count(params))

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        feeds = {}
        for name, dtype in self.graph.inputs.items():
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                raise ValueError(f"missing input {name}")
            feeds[name] = np.ascontiguousarray(t.as_numpy(), dtype=dtype)
        return feeds

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[Any, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            try:
                feeds = self._feeds(request)
            except Exception as e:  # noqa: BLE001 - reported to the client
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                )
                continue
            key = tuple((n, a.shape[1:]) for n, a in feeds.items()) if self.batching else ("single", i)
            groups.setdefault(key, []).append((i, feeds))
        for members in groups.values():
            try:
                if len(members) == 1:
                    outs = self.graph.run(members[0][1])
                else:
                    outs = self.graph.run(
                        {n: np.concatenate([f[n] for _, f in members]) for n in self.graph.inputs}
                    )
                start = 0
                for i, feeds in members:
                    n = next(iter(feeds.values())).shape[0] if len(members) > 1 else None
                    part = {name: o[start : start + n] if n is not None else o for name, o in outs.items()}
                    start += n or 0
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor(name, np.ascontiguousarray(o)) for name, o in part.items()
                        ]
                    )
            except Exception as e:  # noqa: BLE001 - reported to the client
                for i, _ in members:
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(str(e))
                    )
        return responses

    def finalize(self) -> None:
        del self.graph
