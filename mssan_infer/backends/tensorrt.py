"""TensorRT backend: runs the bundle's ``tensorrt/*.plan`` engines on a CUDA GPU.

One engine per graph, built by ``python -m export ... --tensorrt`` with ``P``
identical optimisation profiles. Each profile backs one execution slot (an
execution context bound to that profile, a CUDA stream and device buffers); a
call takes a free slot, so a context is never used by two threads at once and
up to ``P`` threads run concurrently. Shapes are set per call with
``set_input_shape``; device memory comes from cuda-python (``cudart``) and the
engine runs with ``execute_async_v3`` after ``set_tensor_address``. Inputs
larger than the profile maximum along a batch-like axis (``B``, ``Ni``,
``Nt``) are split into chunks; other axes (``R``, ``L``) past the maximum are
an ``InputError``.

Engines are specific to a TensorRT version and a GPU: the bundle manifest
records both, and loading refuses a mismatch with a clear message (unless the
engines were built version-compatible / hardware-compatible).

``tensorrt`` and ``cuda-python`` are imported only when the backend is made.
The chunking helpers (``split_axes``, ``run_chunked``) are plain numpy.
"""
from __future__ import annotations

import logging
import queue
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..bundle import Bundle
from ..errors import BackendUnavailableError, BundleError, InputError, MssanError
from ..spec import GRAPHS, GraphSpec

__all__ = [
    "TensorRTBackend",
    "TensorRTEngineMismatchError",
    "import_tensorrt",
    "import_cudart",
    "gpu_info",
    "split_axes",
    "axis_sizes",
    "run_chunked",
    "plan_name",
    "MANIFEST_KEY",
]

log = logging.getLogger(__name__)

MANIFEST_KEY = "tensorrt"
RunFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class TensorRTEngineMismatchError(BackendUnavailableError):
    """The bundle's engines were built for another TensorRT version or GPU than this machine's."""


def plan_name(graph: str, precision: str) -> str:
    """Bundle-relative file of an engine: ``tensorrt/<graph>.plan`` (fp32) or ``tensorrt/<graph>.fp16.plan``."""
    return f"tensorrt/{graph}.plan" if precision == "fp32" else f"tensorrt/{graph}.{precision}.plan"


# ---- optional packages ---------------------------------------------------------
def import_tensorrt() -> Any:
    """``import tensorrt``, or a ``BackendUnavailableError`` saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailableError(
            "backend 'tensorrt' needs the tensorrt Python package and an NVIDIA GPU with its driver: "
            "`pip install tensorrt` (TensorRT 10 or 11, matching your CUDA), or use backend='onnxruntime' "
            f"(import failed: {e})"
        ) from e
    return trt


def import_cudart() -> Any:
    """cuda-python's runtime API (``cuda.bindings.runtime``, or ``cuda.cudart`` in older releases)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # cuda-python < 12.6
        except ImportError as e:
            raise BackendUnavailableError(
                "backend 'tensorrt' needs cuda-python for device memory: `pip install cuda-python` "
                f"(matching your CUDA major version), or use backend='onnxruntime' (import failed: {e})"
            ) from e
    return cudart


def _check(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising on an error code."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendUnavailableError(
            f"CUDA call {what} failed: {err}. Check that an NVIDIA GPU and a driver matching cuda-python are present "
            "(nvidia-smi), or use backend='onnxruntime'"
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _handle(obj: Any) -> int:
    """An integer address/handle of a cuda-python object (pointer or stream)."""
    try:
        return int(obj)
    except TypeError:
        return int(obj.getPtr())


def gpu_info(device: int = 0) -> dict[str, Any]:
    """Name and compute capability of CUDA device ``device`` (via cuda-python).

    Raises:
        BackendUnavailableError: cuda-python missing, no driver or no such device.
    """
    cudart = import_cudart()
    count = _check(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if device >= int(count):
        raise BackendUnavailableError(f"CUDA device {device} requested but only {count} device(s) are visible")
    props = _check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return {"name": str(name), "compute_capability": f"{props.major}.{props.minor}", "device": device}


# ---- chunking along batch-like axes ---------------------------------------------
def split_axes(spec: GraphSpec) -> dict[str, tuple[dict[str, int], dict[str, int]]]:
    """Axes a graph's inputs can be split along, and where each output concatenates.

    An axis is splittable when every input carrying it carries it at position 0
    and every output carries it at most once (``B`` of the encoders, ``Ni`` and
    ``Nt`` of the scorer). Returns ``{axis: ({input: 0}, {output: position})}``.
    """
    out: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
    axes = {a for t in spec.inputs for a in t.dynamic_axes().values()}
    for axis in sorted(axes):
        ins = {t.name: t.axes.index(axis) for t in spec.inputs if axis in t.axes}
        if any(pos != 0 for pos in ins.values()) or any(t.axes.count(axis) > 1 for t in spec.inputs):
            continue
        if any(t.axes.count(axis) > 1 for t in spec.outputs):
            continue
        outs = {t.name: t.axes.index(axis) for t in spec.outputs if axis in t.axes}
        out[axis] = (ins, outs)
    return out


def axis_sizes(spec: GraphSpec, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The size of every dynamic axis in ``feeds``.

    Raises:
        InputError: missing/extra feeds, wrong rank, or one axis with two sizes.
    """
    if set(feeds) != set(spec.input_names):
        raise InputError(f"graph {spec.name!r} takes inputs {sorted(spec.input_names)}, got {sorted(feeds)}")
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        shape = np.shape(feeds[t.name])
        if len(shape) != len(t.axes):
            raise InputError(f"{spec.name}.{t.name} must be [{', '.join(t.axes)}], got shape {tuple(shape)}")
        for axis, n in zip(t.axes, shape):
            if sizes.setdefault(axis, int(n)) != int(n):
                raise InputError(f"{spec.name}: axis {axis} is {sizes[axis]} in one input and {n} in {t.name}")
    return sizes


def run_chunked(
    spec: GraphSpec,
    feeds: Mapping[str, np.ndarray],
    limits: Mapping[str, int],
    run: RunFn,
) -> dict[str, np.ndarray]:
    """Run ``run`` on ``feeds``, split into chunks wherever a splittable axis exceeds ``limits[axis]``.

    Args:
        spec: the graph.
        feeds: its inputs.
        limits: the largest size each axis may have in one call (axes not listed: unlimited).
        run: runs one chunk (all axes within limits).
    Raises:
        InputError: an axis that cannot be split (``R``, ``L``) exceeds its limit.
    """
    sizes = axis_sizes(spec, feeds)
    splittable = split_axes(spec)
    for axis, n in sizes.items():
        lim = limits.get(axis)
        if lim is not None and n > lim and axis not in splittable:
            raise InputError(
                f"{spec.name}: axis {axis} is {n}, above the engine's profile maximum {lim}; rebuild the engines "
                f"with a larger profile (python -m export ... --tensorrt --trt-profile {axis}=MIN,OPT,MAX)"
            )
    for axis, (ins, outs) in splittable.items():
        lim = limits.get(axis)
        n = sizes.get(axis, 0)
        if lim is None or n <= lim:
            continue
        parts: list[dict[str, np.ndarray]] = []
        for a in range(0, n, lim):
            sub = {k: (v[a : a + lim] if k in ins else v) for k, v in feeds.items()}
            parts.append(run_chunked(spec, sub, limits, run))
        return {
            name: (np.concatenate([p[name] for p in parts], axis=outs[name]) if name in outs else parts[0][name])
            for name in parts[0]
        }
    return run(feeds)


# ---- engines ----------------------------------------------------------------------
class _Slot:
    """One execution context bound to one optimisation profile, with its stream and device buffers."""

    def __init__(self, context: Any, profile: int, stream: Any) -> None:
        self.context = context
        self.profile = profile
        self.stream = stream
        self.buffers: dict[str, tuple[int, int]] = {}      # tensor -> (device pointer, capacity in bytes)


class _Engine:
    def __init__(self, trt: Any, cudart: Any, runtime: Any, graph: str, path: Path, num_slots: int | None) -> None:
        self.trt, self.cudart, self.graph, self.path = trt, cudart, graph, path
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise TensorRTEngineMismatchError(
                f"TensorRT could not deserialize {path} (see the TensorRT log above): it was built by another "
                "TensorRT version or for another GPU, or the file is damaged. Rebuild the engines on this machine: "
                "python -m export --checkpoint CKPT --out BUNDLE --tensorrt"
            )
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        spec = GRAPHS[graph]
        if set(self.inputs) != set(spec.input_names) or not set(spec.output_names) <= set(self.outputs):
            raise BundleError(
                f"{path} has inputs {self.inputs} and outputs {self.outputs}; graph {graph!r} must take "
                f"{spec.input_names} and give {spec.output_names}. Rebuild the engines."
            )
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        profiles = int(engine.num_optimization_profiles)
        n_slots = profiles if num_slots is None else max(1, min(int(num_slots), profiles))
        # per axis: the smallest maximum over inputs (profile 0; all profiles are identical)
        self.limits: dict[str, int] = {}
        self.minimum: dict[str, int] = {}
        for t in spec.inputs:
            mn, _opt, mx = engine.get_tensor_profile_shape(t.name, 0)
            for pos, axis in enumerate(t.axes):
                if axis in t.dynamic_axes().values():
                    self.limits[axis] = min(self.limits.get(axis, 1 << 30), int(mx[pos]))
                    self.minimum[axis] = max(self.minimum.get(axis, 0), int(mn[pos]))
        self._slots: "queue.Queue[_Slot]" = queue.Queue()
        self._all: list[_Slot] = []
        for p in range(n_slots):
            context = engine.create_execution_context()
            if context is None:
                raise BackendUnavailableError(f"TensorRT could not create an execution context for {path} (GPU memory?)")
            stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
            if p:
                context.set_optimization_profile_async(p, _handle(stream))
            slot = _Slot(context, p, stream)
            self._all.append(slot)
            self._slots.put(slot)

    def _buffer(self, slot: _Slot, name: str, nbytes: int) -> int:
        ptr, cap = slot.buffers.get(name, (0, 0))
        if cap >= nbytes and ptr:
            return ptr
        if ptr:
            _check(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")
        size = max(nbytes, 256)
        ptr = _handle(_check(self.cudart, self.cudart.cudaMalloc(size), "cudaMalloc"))
        slot.buffers[name] = (ptr, size)
        return ptr

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, h2d, d2h = self.cudart, self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, \
            self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        slot = self._slots.get()
        try:
            ctx, stream = slot.context, slot.stream
            host_in: list[np.ndarray] = []
            for name in self.inputs:
                arr = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
                host_in.append(arr)                                   # alive until the stream syncs
                if not ctx.set_input_shape(name, tuple(int(s) for s in arr.shape)):
                    raise InputError(f"TensorRT rejected shape {arr.shape} for {self.graph}.{name} (outside the profile)")
                ptr = self._buffer(slot, name, arr.nbytes)
                if arr.nbytes:
                    _check(cudart, cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, stream), "cudaMemcpyAsync")
                ctx.set_tensor_address(name, ptr)
            host_out: dict[str, np.ndarray] = {}
            for name in self.outputs:
                shape = tuple(int(s) for s in ctx.get_tensor_shape(name))
                if any(s < 0 for s in shape):
                    raise MssanError(f"TensorRT could not infer the shape of {self.graph}.{name} ({shape})")
                out = np.empty(shape, self.dtypes[name])
                host_out[name] = out
                ctx.set_tensor_address(name, self._buffer(slot, name, out.nbytes))
            if not ctx.execute_async_v3(_handle(stream)):
                raise MssanError(f"TensorRT execute_async_v3 failed for {self.graph} (see the TensorRT log)")
            for name, out in host_out.items():
                if out.nbytes:
                    ptr = slot.buffers[name][0]
                    _check(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, stream), "cudaMemcpyAsync")
            _check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            del host_in
            return {n: (a.astype(np.float32) if a.dtype != np.float32 and a.dtype.kind == "f" else a)
                    for n, a in host_out.items()}
        finally:
            self._slots.put(slot)

    def close(self) -> None:
        for slot in self._all:
            for ptr, _ in slot.buffers.values():
                self.cudart.cudaFree(ptr)
            slot.buffers.clear()
            self.cudart.cudaStreamDestroy(slot.stream)
        self._all.clear()


def _check_record(record: Mapping[str, Any], trt_version: str, gpu: Mapping[str, Any] | None) -> None:
    """Refuse engines built for another TensorRT version or GPU (per the manifest record)."""
    built = str(record.get("tensorrt_version", "?"))
    settings = record.get("settings") or {}
    if built != trt_version and not settings.get("version_compatible"):
        raise TensorRTEngineMismatchError(
            f"the bundle's TensorRT engines were built with TensorRT {built}, but this machine has TensorRT "
            f"{trt_version}; engines only load in the TensorRT version that built them. Rebuild them here "
            "(python -m export --checkpoint CKPT --out BUNDLE --tensorrt), export with --trt-version-compatible, "
            "or use backend='onnxruntime'"
        )
    built_gpu = record.get("gpu") or {}
    if gpu is None or not built_gpu:
        return
    level = str(settings.get("hardware_compatibility", "none")).lower()
    cc_built, cc_here = str(built_gpu.get("compute_capability")), str(gpu.get("compute_capability"))
    if level in ("none", "same_compute_capability") and cc_built != cc_here:
        raise TensorRTEngineMismatchError(
            f"the bundle's TensorRT engines were built for {built_gpu.get('name')} (compute capability {cc_built}), "
            f"but this GPU is {gpu.get('name')} (compute capability {cc_here}). Rebuild them on this GPU, export with "
            "--trt-hardware-compatibility ampere_plus, or use backend='onnxruntime'"
        )
    if level == "none" and built_gpu.get("name") != gpu.get("name"):
        warnings.warn(
            f"TensorRT engines were built on {built_gpu.get('name')} and run on {gpu.get('name')} (same compute "
            "capability); TensorRT allows it but performance may differ. Rebuild on this GPU for best results.",
            RuntimeWarning,
            stacklevel=3,
        )


class TensorRTBackend:
    """Runs the bundle's TensorRT engines.

    Args:
        engines: graph name -> ``.plan`` path, for each of ``spec.GRAPHS``.
        record: the manifest's ``tensorrt`` entry (TensorRT version, GPU, settings),
            checked against this machine before any engine is deserialized.
        device: CUDA device index.
        slots: concurrent execution contexts per engine (default: one per profile in the engine).

    Raises:
        BackendUnavailableError: tensorrt or cuda-python missing, no GPU/driver.
        TensorRTEngineMismatchError: engines built for another TensorRT version or GPU.
        BundleError: an engine's inputs/outputs differ from the spec.
    """

    name = "tensorrt"

    def __init__(
        self,
        engines: Mapping[str, str | Path],
        *,
        record: Mapping[str, Any] | None = None,
        device: int = 0,
        slots: int | None = None,
    ) -> None:
        trt = import_tensorrt()
        cudart = import_cudart()
        gpu = gpu_info(device)
        if record is not None:
            _check_record(record, str(trt.__version__), gpu)
        _check(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if record is not None and (record.get("settings") or {}).get("version_compatible"):
            self._runtime.engine_host_code_allowed = True     # version-compatible plans embed a lean runtime
        self.device = device
        self.gpu = gpu
        self._engines: dict[str, _Engine] = {}
        self._lock = threading.Lock()
        try:
            for graph, path in engines.items():
                self._engines[graph] = _Engine(trt, cudart, self._runtime, graph, Path(path), slots)
        except BaseException:
            self.close()
            raise
        log.info("tensorrt backend ready on %s: %s", gpu.get("name"), sorted(self._engines))

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        *,
        device: str = "cuda",
        precision: str = "fp32",
        threads: int | None = None,
        **options: Any,
    ) -> "TensorRTBackend":
        """The engines of ``bundle`` at ``precision`` ("fp32" or "fp16").

        ``device`` is ``"cuda"``/``"cuda:N"`` (``"cpu"``, the Retriever default, means ``cuda:0``:
        TensorRT only runs on a GPU). ``threads`` is ignored. Options: ``slots``.

        Raises:
            BundleError: the bundle has no TensorRT engines at that precision.
            InputError: bad device, precision or option.
        """
        unknown = set(options) - {"slots"}
        if unknown:
            raise InputError(f"unknown tensorrt options {sorted(unknown)}; known: ['slots']")
        if precision not in ("fp32", "fp16"):
            raise InputError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        kind, _, idx = str(device).lower().partition(":")
        if kind not in ("cpu", "cuda") or (idx and not idx.isdigit()) or (kind == "cpu" and idx):
            raise InputError(f"device must be 'cuda' or 'cuda:N' for backend='tensorrt', got {device!r}")
        import_tensorrt()                      # missing packages first: they are the first thing to fix
        import_cudart()
        record = bundle.manifest.get(MANIFEST_KEY)
        if not isinstance(record, dict) or not record.get("engines"):
            raise BundleError(
                f"bundle {bundle.root} has no TensorRT engines; export with "
                "`python -m export --checkpoint CKPT --out BUNDLE --tensorrt` on a machine with TensorRT and a GPU"
            )
        table = record["engines"].get(precision)
        if not table:
            raise BundleError(
                f"bundle {bundle.root} has no {precision} TensorRT engines (has {sorted(record['engines'])}); "
                f"re-export with --tensorrt{' --fp16' if precision == 'fp16' else ''}"
            )
        missing = [g for g in GRAPHS if g not in table]
        if missing:
            raise BundleError(f"bundle {bundle.root} lacks TensorRT engines for {missing}; re-export with --tensorrt")
        engines = {g: bundle.path(table[g]["file"]) for g in GRAPHS}
        return cls(engines, record=record, device=int(idx or 0), slots=options.get("slots"))

    @property
    def graphs(self) -> list[str]:
        return sorted(self._engines)

    def limits(self, graph: str) -> dict[str, int]:
        """Largest size of each dynamic axis one engine call accepts (the profile maximum)."""
        return dict(self._engine(graph).limits)

    def _engine(self, graph: str) -> _Engine:
        try:
            return self._engines[graph]
        except KeyError:
            raise InputError(f"unknown graph {graph!r}; this backend has {self.graphs}") from None

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``graph``; batch-like axes beyond the profile are chunked, outputs are float32.

        Raises:
            InputError: unknown graph, wrong feeds, or ``R``/``L`` beyond the profile maximum.
        """
        eng = self._engine(graph)
        return run_chunked(GRAPHS[graph], feeds, eng.limits, eng.run)

    def close(self) -> None:
        with self._lock:
            for eng in self._engines.values():
                eng.close()
            self._engines.clear()


def engines_summary(record: Mapping[str, Any]) -> Sequence[str]:
    """One line per engine of a manifest ``tensorrt`` record (for ``mssan_infer info``)."""
    lines = []
    for precision, table in (record.get("engines") or {}).items():
        for graph, entry in table.items():
            lines.append(f"{precision} {graph}: {entry.get('file')}")
    return lines
