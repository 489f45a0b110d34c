"""ONNX Runtime backend: one InferenceSession per graph, made once, with checked providers."""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Mapping

import numpy as np

from ..bundle import PRECISIONS, Bundle
from ..errors import BackendUnavailableError, BundleError, InputError
from ..spec import GRAPHS
from .base import ALL_GRAPHS, Backend, Device, declared_dims, parse_device

__all__ = ["OnnxRuntimeBackend", "select_providers", "OPT_LEVELS"]

log = logging.getLogger(__name__)

OPT_LEVELS = ("disable", "basic", "extended", "all")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
_ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16"}


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise BackendUnavailableError(
            "backend 'onnxruntime' needs the onnxruntime package: `pip install onnxruntime` "
            "(or onnxruntime-gpu for device='cuda')"
        ) from e
    return ort


def select_providers(device: str | Device, available: list[str]) -> list[Any]:
    """ORT providers for ``device`` among ``available`` (``ort.get_available_providers()``).

    ``"cuda"`` asks for CUDA with CPU fallback; when CUDA is not available a
    warning is issued and CPU is used.

    Raises:
        InputError: ``device`` is not ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    """
    dev = parse_device(device)
    if dev.kind == "cpu":
        return [_CPU]
    if _CUDA not in available:
        warnings.warn(
            f"device={device!r} asked for CUDA but onnxruntime offers only {available}; running on CPU. "
            "Install onnxruntime-gpu with a matching CUDA to use the GPU.",
            RuntimeWarning,
            stacklevel=3,
        )
        return [_CPU]
    return [(_CUDA, {"device_id": dev.ordinal}), _CPU]


class OnnxRuntimeBackend(Backend):
    """Runs bundle graphs in ONNX Runtime.

    Args:
        graphs: graph name -> ``.onnx`` path, or the serialized model (``bytes``); names of
            ``spec.GRAPHS`` / ``spec.OPTIONAL_GRAPHS``.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: intra-op threads per session (``None``: ORT's default).
        inter_op_threads: inter-op threads per session (``None``: ORT's default).
        graph_optimization: one of ``OPT_LEVELS``.
        providers: explicit ORT providers, overriding ``device``.
        graph_threads: intra-op threads for some graphs, overriding ``threads`` (e.g.
            ``{"text_encoder": 1}``: the Bi-GRU's per-step barriers stall when another
            process takes a core, so one thread is faster on a busy CPU).
        allow_spinning: let idle ORT workers spin-wait after a run (ORT's own default). Off by
            default here: a query runs three sessions and numpy's stage 1 back to back, and a
            worker still spinning for the previous one holds the core the next one needs (on 2
            cores, text->image at rerank 100 over 5K images: 26.7 ms spinning, 12.4 ms not;
            ``python -m bench`` times both).
        session_config: extra ONNX Runtime session config entries for every session (e.g.
            ``{"session.force_spinning_stop": "1"}`` with ``allow_spinning=True``: spin during a
            run, stop when it returns).

    Raises:
        BackendUnavailableError: onnxruntime is not installed.
        BundleError: a graph cannot be loaded or its inputs/outputs differ from the spec.
        InputError: bad device, thread count or optimisation level.
    """

    name = "onnxruntime"

    def __init__(
        self,
        graphs: Mapping[str, str | os.PathLike[str] | bytes],
        *,
        device: str | Device = "cpu",
        threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization: str = "all",
        providers: list[Any] | None = None,
        graph_threads: Mapping[str, int] | None = None,
        allow_spinning: bool = False,
        session_config: Mapping[str, str] | None = None,
    ) -> None:
        ort = _import_ort()
        super().__init__(device)
        graph_threads = dict(graph_threads or {})
        unknown_graphs = set(graph_threads) - set(graphs)
        if unknown_graphs:
            raise InputError(f"graph_threads names unknown graphs {sorted(unknown_graphs)}; graphs: {sorted(graphs)}")
        if not isinstance(allow_spinning, bool):
            raise InputError(f"allow_spinning must be True or False, got {allow_spinning!r}")
        if session_config is not None and (
            not isinstance(session_config, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in session_config.items())
        ):
            raise InputError(
                "session_config must map ONNX Runtime session config keys to string values, "
                f"e.g. {{'session.force_spinning_stop': '1'}}; got {session_config!r}"
            )
        checks = [("threads", threads), ("inter_op_threads", inter_op_threads)]
        checks += [(f"graph_threads[{g!r}]", n) for g, n in graph_threads.items()]
        for label, n in checks:
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
                raise InputError(f"{label} must be a positive int or None, got {n!r}")
        if graph_optimization not in OPT_LEVELS:
            raise InputError(f"graph_optimization must be one of {OPT_LEVELS}, got {graph_optimization!r}")
        if providers is None:
            providers = select_providers(self.device, list(ort.get_available_providers()))
        self.providers = providers
        level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        self._sessions: dict[str, Any] = {}
        self._outputs: dict[str, list[str]] = {}
        wanted_cuda = any((p[0] if isinstance(p, tuple) else p) == _CUDA for p in providers)
        for gname, path in graphs.items():
            opts = ort.SessionOptions()
            opts.graph_optimization_level = level
            n_threads = graph_threads.get(gname, threads)
            if n_threads is not None:
                opts.intra_op_num_threads = n_threads
            if not allow_spinning:
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
            for key, value in (session_config or {}).items():
                opts.add_session_config_entry(key, value)
            if inter_op_threads is not None:
                opts.inter_op_num_threads = inter_op_threads
                opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            opts.log_severity_level = 3
            where = f"<{gname} graph in memory>" if isinstance(path, bytes) else str(path)
            try:
                sess = ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=opts,
                                            providers=providers)
            except Exception as e:  # ORT raises its own exception types
                raise BundleError(f"onnxruntime cannot load {where}: {e}. Re-export the bundle.") from e
            if wanted_cuda and _CUDA not in sess.get_providers():
                warnings.warn(
                    f"CUDA was asked for but the {gname} session runs on {sess.get_providers()}; "
                    "check the CUDA/cuDNN install that onnxruntime-gpu needs",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._check_io(gname, sess, where)
            self._sessions[gname] = sess
        log.info("onnxruntime backend ready: graphs %s on %s", sorted(self._sessions), self.providers)

    def _check_io(self, gname: str, sess: Any, path: str) -> None:
        """Register ``gname`` after checking the session's inputs/outputs against its spec."""
        spec = ALL_GRAPHS.get(gname)
        if spec is None:
            raise BundleError(f"{path}: unknown graph {gname!r}; graphs are {sorted(ALL_GRAPHS)}")
        inputs = {i.name: i for i in sess.get_inputs()}
        outputs = [o.name for o in sess.get_outputs()]
        if set(inputs) != set(spec.input_names) or not set(spec.output_names) <= set(outputs):
            raise BundleError(
                f"{path} has inputs {sorted(inputs)} and outputs {outputs}, but graph {gname!r} must take "
                f"{spec.input_names} and give {spec.output_names}; re-export the bundle with this mssan version"
            )
        for t in spec.inputs:
            if _ORT_TYPES.get(inputs[t.name].type) != t.dtype:
                raise BundleError(f"{path}: input {t.name} is {inputs[t.name].type}, the spec says {t.dtype}; "
                                  "re-export the bundle with this mssan version")
        self._add_graph(gname, declared_dims(spec, {n: list(i.shape) for n, i in inputs.items()}, path))
        self._outputs[gname] = outputs

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        *,
        device: str | Device = "cpu",
        precision: str = "fp32",
        threads: int | None = None,
        **options: Any,
    ) -> "OnnxRuntimeBackend":
        """A backend for ``bundle``'s graphs at ``precision`` ("fp32", "fp16", or "int8": the
        dynamically quantized text encoder of an ``--int8`` export with the fp32 image encoder and scorer).

        Raises:
            BundleError: the bundle has no graphs at that precision.
            InputError: unknown precision or option.
        """
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        allowed = {"inter_op_threads", "graph_optimization", "providers", "graph_threads", "allow_spinning",
                   "session_config"}
        unknown = set(options) - allowed
        if unknown:
            raise InputError(f"unknown onnxruntime options {sorted(unknown)}; known: {sorted(allowed)}")
        graphs = {g: bundle.graph_path(g, precision) for g in GRAPHS}
        return cls(graphs, device=device, threads=threads, **options)

    def active_providers(self, graph: str = "scorer") -> list[str]:
        """Providers the session of ``graph`` actually runs on."""
        self.spec(graph)
        return list(self._sessions[graph].get_providers())

    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One session run on checked feeds; fp16/fp64 outputs come back as float32."""
        outs = self._sessions[graph].run(None, dict(feeds))
        return {
            n: (o.astype(np.float32) if o.dtype in (np.float16, np.float64) else o)
            for n, o in zip(self._outputs[graph], outs)
        }

    def _close(self) -> None:
        self._sessions.clear()
