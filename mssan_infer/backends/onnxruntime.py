"""ONNX Runtime backend: one InferenceSession per graph, made once, with checked providers."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Mapping

import numpy as np

from mssan_infer.backends.base import ALL_GRAPHS, Backend, declared_dims, in_one_thread
from mssan_infer.bundle import Bundle
from mssan_infer.deps import optional_import
from mssan_infer.errors import BundleError, InputError, MssanError
from mssan_infer.options import BackendOptions, Device, OnnxRuntimeOptions, parse_device
from mssan_infer.spec import GRAPHS, QUERY_SCORERS

__all__ = [
    "OnnxRuntimeBackend",
    "OnnxGraph",
    "select_providers",
    "import_onnxruntime",
    "session_options",
    "open_session",
]

log = logging.getLogger(__name__)

_CUDA = "CUDAExecutionProvider"
# Graphs that also get a one-intra-op-thread session, run inside ``base.one_thread()``: the retriever cuts
# their candidates into shares and scores each on a thread of its own (``SearchOptions.rerank_threads``).
ONE_THREAD_GRAPHS = frozenset(QUERY_SCORERS)
_CPU = "CPUExecutionProvider"
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(int64)": "int64",
    "tensor(float16)": "float16",
    "tensor(uint8)": "uint8",
}


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a :class:`BackendUnavailableError` saying what to install."""
    return optional_import("onnxruntime", "onnxruntime", "running graphs (onnxruntime-gpu for device='cuda')")


def session_options(options: OnnxRuntimeOptions, *, threads: int | None = None) -> Any:
    """ONNX Runtime ``SessionOptions`` from ``options`` (``threads`` overrides its intra-op threads).

    Workers spin between the nodes of a run (a sleeping worker is woken for every node otherwise) and stop
    when the run ends (``session.force_spinning_stop``) unless ``allow_spinning``: the sessions of a query
    run back to back, and a worker still spinning for one holds the core the next one needs.
    """
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.graph_optimization]
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    if not options.allow_spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    for key, value in (options.session_config or {}).items():
        opts.add_session_config_entry(key, value)
    if options.inter_op_threads is not None:
        opts.inter_op_num_threads = options.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    opts.log_severity_level = 3
    return opts


def open_session(path: str | os.PathLike[str] | bytes, opts: Any, providers: list[Any], where: str) -> Any:
    """An ``InferenceSession`` on ``path`` (a file or the serialized model).

    Raises:
        BundleError: ONNX Runtime cannot load it.
    """
    ort = import_onnxruntime()
    try:
        return ort.InferenceSession(
            path if isinstance(path, bytes) else str(path), sess_options=opts, providers=providers
        )
    except Exception as e:  # ORT raises its own exception types
        raise BundleError(f"onnxruntime cannot load {where}: {e}. Re-export the bundle.") from e


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
        options: :class:`~mssan_infer.options.OnnxRuntimeOptions` (device, threads, spinning...).

    Raises:
        BackendUnavailableError: onnxruntime is not installed.
        BundleError: a graph cannot be loaded or its inputs/outputs differ from the spec.
        InputError: options that do not fit the graphs.
    """

    name = "onnxruntime"

    def __init__(
        self,
        graphs: Mapping[str, str | os.PathLike[str] | bytes],
        options: OnnxRuntimeOptions | None = None,
    ) -> None:
        opts = options if options is not None else OnnxRuntimeOptions()
        if not isinstance(opts, OnnxRuntimeOptions):
            raise InputError(f"options must be OnnxRuntimeOptions, got {type(opts).__name__}")
        ort = import_onnxruntime()
        super().__init__(opts.device)
        graph_threads = dict(opts.graph_threads or {})
        unknown_graphs = set(graph_threads) - set(graphs)
        if unknown_graphs:
            raise InputError(
                f"graph_threads names unknown graphs {sorted(unknown_graphs)}; graphs: {sorted(graphs)}"
            )
        providers = opts.providers
        if providers is None:
            providers = select_providers(self.device, list(ort.get_available_providers()))
        self.providers = providers
        self._sessions: dict[str, Any] = {}
        self._single: dict[str, Any] = {}  # one-thread twins of ONE_THREAD_GRAPHS, run inside one_thread()
        self._outputs: dict[str, list[str]] = {}
        wanted_cuda = any((p[0] if isinstance(p, tuple) else p) == _CUDA for p in providers)
        for gname, path in graphs.items():
            where = f"<{gname} graph in memory>" if isinstance(path, bytes) else str(path)
            threads = graph_threads.get(gname, opts.threads)
            sess = open_session(path, session_options(opts, threads=threads), providers, where)
            if gname in ONE_THREAD_GRAPHS and threads != 1 and not wanted_cuda:
                self._single[gname] = open_session(path, session_options(opts, threads=1), providers, where)
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
                f"{spec.input_names} and give {spec.output_names}; re-export the bundle with this mssan "
                "version"
            )
        for t in spec.inputs:
            if _ORT_TYPES.get(inputs[t.name].type) != t.dtype:
                raise BundleError(
                    f"{path}: input {t.name} is {inputs[t.name].type}, the spec says {t.dtype}; "
                    "re-export the bundle with this mssan version"
                )
        types = {o.name: o.type for o in sess.get_outputs()}
        for t in spec.outputs:  # what run_prepared hands back unchecked: float, made float32 by _run
            if types[t.name] not in ("tensor(float)", "tensor(float16)", "tensor(double)"):
                raise BundleError(
                    f"{path}: output {t.name} is {types[t.name]}, the spec says {t.dtype}; "
                    "re-export the bundle with this mssan version"
                )
        self._add_graph(gname, declared_dims(spec, {n: list(i.shape) for n, i in inputs.items()}, path))
        self._outputs[gname] = outputs

    @classmethod
    def from_bundle(cls, bundle: Bundle, options: BackendOptions | None = None) -> "OnnxRuntimeBackend":
        """A backend for ``bundle``'s graphs at ``options.precision`` ("fp32", "fp16", or "int8": the
        dynamically quantized text encoder of an ``--int8`` export with the fp32 image encoder and scorer).

        Raises:
            BundleError: the bundle has no graphs at that precision.
            InputError: options of another backend.
        """
        if options is None:
            options = OnnxRuntimeOptions()
        if type(options) is BackendOptions:
            options = OnnxRuntimeOptions(
                device=options.device, precision=options.precision, threads=options.threads
            )
        if not isinstance(options, OnnxRuntimeOptions):
            raise InputError(f"backend 'onnxruntime' takes OnnxRuntimeOptions, got {type(options).__name__}")
        graphs: dict[str, str | os.PathLike[str] | bytes] = {
            g: bundle.graph_path(g, options.precision) for g in GRAPHS
        }
        if options.precision != "fp16":  # fp32 weights, any precision
            graphs.update({g: bundle.graph_path(g) for g in _current_query_scorers(bundle)})
        return cls(graphs, options)

    def active_providers(self, graph: str = "scorer") -> list[str]:
        """Providers the session of ``graph`` actually runs on."""
        self.spec(graph)
        return list(self._sessions[graph].get_providers())

    def run_prepared(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The session run alone: the runtime built ``feeds`` (names, dtypes and shapes right by
        construction), one ONNX Runtime call takes any size, and the outputs are what the session's
        graph, checked against the spec at load, declares."""
        if self._closed:
            raise MssanError(f"this {self.name} backend is closed")
        return self._run(graph, feeds)

    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One session run on checked feeds (the graph's one-thread twin inside :func:`one_thread`);
        fp16/fp64 outputs come back as float32."""
        sess = self._single.get(graph) if in_one_thread() else None
        outs = (sess or self._sessions[graph]).run(None, dict(feeds))
        return {
            n: (o.astype(np.float32) if o.dtype in (np.float16, np.float64) else o)
            for n, o in zip(self._outputs[graph], outs)
        }

    def _close(self) -> None:
        self._sessions.clear()
        self._single.clear()


_TYPES = {
    "tensor(float)": np.float32,
    "tensor(int64)": np.int64,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(double)": np.float64,
}


class OnnxGraph:
    """One ``.onnx`` file on ONNX Runtime's CPU provider, without the spec checks of a bundle graph: the
    Triton Python-backend models run their graphs with it (the same session settings as the backend).

    Args:
        path: the graph.
        threads: intra-op threads (``0``: ONNX Runtime's default, one per core).
    """

    def __init__(self, path: str, *, threads: int = 0) -> None:
        opts = session_options(OnnxRuntimeOptions(), threads=threads if threads > 0 else None)
        self.path = path
        self.session = open_session(path, opts, [_CPU], path)
        self.inputs = {i.name: np.dtype(_TYPES.get(i.type, np.float32)) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run on ``feeds`` (cast to the graph's input dtypes) -> ``{output name: array}``."""
        names = outputs or self.outputs
        cast = {n: np.ascontiguousarray(feeds[n], dtype=t) for n, t in self.inputs.items()}
        return dict(zip(names, self.session.run(names, cast)))


def _current_query_scorers(bundle: Bundle) -> list[str]:
    """The query scorers of ``bundle`` in this version's form (its manifest records their inputs). Those of
    an older form are left out with a warning that says to re-export: their candidates go to the
    all-pairs ``scorer`` (same scores, slower)."""
    entries = bundle.manifest.raw.get("graphs") or {}
    held = [g for g in QUERY_SCORERS if isinstance(entries.get(g), dict)]
    current = [g for g in held if entries[g].get("inputs") == QUERY_SCORERS[g].to_dict()["inputs"]]
    stale = sorted(set(held) - set(current))
    if stale:
        warnings.warn(
            f"{bundle.root}: its query scorers {stale} predate this mssan version's; their candidates are "
            "reranked by the all-pairs scorer (same scores, slower). Re-export the bundle (python -m "
            "export) for the query scorers.",
            RuntimeWarning,
            stacklevel=3,
        )
    return current
