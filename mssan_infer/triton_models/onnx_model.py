"""Triton Python-backend model: one MSSAN graph (``model.onnx`` beside this file) on ONNX Runtime.

The ``python`` flavour of a generated repository, for servers without the
onnxruntime backend (e.g. the tritonserver bundled with nvidia-pytriton).
Requests of a dynamic batch whose inputs agree on every non-batch dimension
are concatenated and run as one batch. Needs numpy and onnxruntime in the
Python environment of the backend stub.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tooling, tests)
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import onnxruntime as ort

        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        self.batching = int(cfg.get("max_batch_size", 0)) > 0
        path = os.path.join(args["model_repository"], str(args["model_version"]), "model.onnx")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        threads = int(params.get("intra_op_threads") or 0)
        if threads > 0:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16}
        self.inputs = {i.name: types.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        feeds = {}
        for name, dtype in self.inputs.items():
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
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
                continue
            key = tuple((n, a.shape[1:]) for n, a in feeds.items()) if self.batching else ("single", i)
            groups.setdefault(key, []).append((i, feeds))
        for members in groups.values():
            try:
                if len(members) == 1:
                    outs = self.session.run(self.outputs, members[0][1])
                else:
                    batch = {n: np.concatenate([f[n] for _, f in members]) for n in self.inputs}
                    outs = self.session.run(self.outputs, batch)
                start = 0
                for i, feeds in members:
                    n = next(iter(feeds.values())).shape[0] if len(members) > 1 else None
                    part = [o[start : start + n] if n is not None else o for o in outs]
                    start += n or 0
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(o)) for name, o in zip(self.outputs, part)]
                    )
            except Exception as e:  # noqa: BLE001 - reported to the client
                for i, _ in members:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
        return responses

    def finalize(self) -> None:
        self.session = None
