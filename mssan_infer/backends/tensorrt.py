"""TensorRT backend: runs the bundle's ``tensorrt/*.plan`` engines on a CUDA GPU.

One engine per graph, built by ``python -m export ... --tensorrt`` with ``P``
identical optimisation profiles. Each profile backs one execution slot (an
execution context bound to that profile, a CUDA stream and device buffers); a
call takes a free slot, so a context is never used by two threads at once and
up to ``P`` threads run concurrently (TensorRT: "each execution context in
concurrent use must use a separate optimization profile", ``IExecutionContext``
in ``include/NvInferRuntime.h``). Shapes are set per call with ``set_input_shape``;
device memory comes from cuda-python (``cudart``) and the engine runs with
``execute_async_v3`` after ``set_tensor_address``. Inputs larger than the profile
maximum along a batch-like axis (``B``, ``Ni``, ``Nt``) are split into chunks by
the :class:`~mssan_infer.backends.base.Backend` contract; other axes (``R``,
``L``) past the maximum are an ``InputError``.

The CUDA device is per host thread (``cudaSetDevice`` "sets device as the
current device for the calling host thread"; CUDA Runtime API, Device
Management), so every call that allocates, copies or launches -- the
constructor, each ``run`` and ``close`` -- makes the backend's device current
for its own thread and restores the caller's device afterwards.

Engines are specific to a TensorRT version and a GPU: the bundle manifest
records both, and loading refuses a mismatch with a clear message (unless the
engines were built version-compatible / hardware-compatible). The manifest's
``tensorrt.limits`` record the largest size of every dynamic axis one engine call
takes; :func:`scorer_limits` reads the scorer's for callers that chunk (the Triton
``retriever`` model).

``tensorrt`` and ``cuda-python`` are imported only when the backend is made.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from mssan_infer.backends.base import Backend, declared_dims
from mssan_infer.bundle import Bundle
from mssan_infer.deps import optional_import
from mssan_infer.errors import BackendUnavailableError, BundleError, InputError, MssanError
from mssan_infer.names import LIMITS_KEY, TENSORRT_KEY
from mssan_infer.options import BackendOptions, Device, TensorRTOptions, parse_device
from mssan_infer.spec import GRAPHS, SCORER

__all__ = [
    "TensorRTBackend",
    "TensorRTEngineMismatchError",
    "import_tensorrt",
    "import_cudart",
    "gpu_info",
    "scorer_limits",
    "cuda_device",
]

log = logging.getLogger(__name__)


class TensorRTEngineMismatchError(BackendUnavailableError):
    """The bundle's engines were built for another TensorRT version or GPU than this machine's."""


# ---- optional packages ---------------------------------------------------------
def import_tensorrt() -> Any:
    """``import tensorrt``, or a ``BackendUnavailableError`` saying how to get it."""
    return optional_import(
        "tensorrt",
        "tensorrt",
        "backend 'tensorrt' (with an NVIDIA GPU and its driver; TensorRT 10 or 11 matching your CUDA)",
        "backend='onnxruntime'",
    )


def import_cudart() -> Any:
    """cuda-python's runtime API (``cuda.bindings.runtime``, or ``cuda.cudart`` in older releases)."""
    try:
        return optional_import("cuda.bindings.runtime", "cuda-python", "backend 'tensorrt' (device memory)")
    except BackendUnavailableError:
        # cuda-python < 12.6 names it cuda.cudart
        return optional_import(
            "cuda.cudart", "cuda-python", "backend 'tensorrt' (device memory)", "backend='onnxruntime'"
        )


def _check(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising on an error code."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendUnavailableError(
            f"CUDA call {what} failed: {err}. Check that an NVIDIA GPU and a driver matching cuda-python "
            "are present "
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
        raise BackendUnavailableError(
            f"CUDA device {device} requested but only {count} device(s) are visible"
        )
    props = _check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return {"name": str(name), "compute_capability": f"{props.major}.{props.minor}", "device": device}


# ---- the engines' limits, as the manifest records them ---------------------------------------
def scorer_limits(manifest: Mapping[str, Any]) -> dict[str, int] | None:
    """Largest ``Ni``, ``Nt``, ``R``, ``L`` one call of the bundle's TensorRT scorer takes.

    Read from ``manifest["tensorrt"]["limits"]`` (written by ``python -m export --tensorrt``:
    the maximum of each axis's optimisation profile). ``None`` when the bundle has no
    TensorRT engines (ONNX Runtime has no such limits).

    Raises:
        BundleError: a ``tensorrt`` record without well-formed limits.
    """
    record = manifest.get(TENSORRT_KEY)
    if not record:
        return None
    limits = record.get(LIMITS_KEY) if isinstance(record, Mapping) else None
    axes = sorted({a for t in SCORER.inputs for a in t.dynamic_axes().values()})
    if not isinstance(limits, Mapping) or not all(
        isinstance(limits.get(a), int) and not isinstance(limits.get(a), bool) and limits[a] > 0 for a in axes
    ):
        raise BundleError(
            f"the manifest's {TENSORRT_KEY}.{LIMITS_KEY} must give a positive int for each of {axes}, got "
            f"{limits!r}; "
            "re-export with --tensorrt"
        )
    return {a: int(limits[a]) for a in axes}


# ---- engines ----------------------------------------------------------------------------------
@contextlib.contextmanager
def cuda_device(cudart: Any, index: int) -> Iterator[None]:
    """Make CUDA device ``index`` current for the calling thread; restore the previous one after."""
    prev = int(_check(cudart, cudart.cudaGetDevice(), "cudaGetDevice"))
    if prev != index:
        _check(cudart, cudart.cudaSetDevice(index), f"cudaSetDevice({index})")
    try:
        yield
    finally:
        if prev != index:
            _check(cudart, cudart.cudaSetDevice(prev), f"cudaSetDevice({prev})")


class _Slot:
    """One execution context bound to one optimisation profile, with its stream and device buffers."""

    def __init__(self, context: Any, profile: int, stream: Any) -> None:
        self.context = context
        self.profile = profile
        self.stream = stream
        self.buffers: dict[str, tuple[int, int]] = {}  # tensor -> (device pointer, capacity in bytes)


class _Engine:
    """One deserialized engine and its slots. Every method runs with the backend's device current."""

    def __init__(
        self, trt: Any, cudart: Any, runtime: Any, graph: str, path: Path, num_slots: int | None
    ) -> None:
        self.trt, self.cudart, self.graph, self.path = trt, cudart, graph, path
        self._all: list[_Slot] = []
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise TensorRTEngineMismatchError(
                f"TensorRT could not deserialize {path} (see the TensorRT log above): it was built by "
                "another "
                "TensorRT version or for another GPU, or the file is damaged. Rebuild the engines on this "
                "machine: "
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
        wrong = [
            f"{t.name} is {self.dtypes[t.name]}"
            for t in (*spec.inputs, *spec.outputs)
            if self.dtypes[t.name] != np.dtype(t.dtype)
            and not (t.dtype == "float32" and self.dtypes[t.name].kind == "f")
        ]
        if wrong:
            raise BundleError(f"{path}: {', '.join(wrong)}, not as the spec says; rebuild the engines")
        self.dims = declared_dims(
            spec, {n: [int(d) for d in engine.get_tensor_shape(n)] for n in self.inputs}, str(path)
        )
        profiles = int(engine.num_optimization_profiles)
        n_slots = profiles if num_slots is None else max(1, min(int(num_slots), profiles))
        # per axis: the smallest profile maximum over inputs and profiles (the profiles are identical)
        self.limits: dict[str, int] = {}
        for p in range(profiles):
            for t in spec.inputs:
                _mn, _opt, mx = engine.get_tensor_profile_shape(t.name, p)
                for pos, axis in t.dynamic_axes().items():
                    self.limits[axis] = min(self.limits.get(axis, 1 << 30), int(mx[pos]))
        self._slots: "queue.Queue[_Slot]" = queue.Queue()
        try:
            self._make_slots(path, n_slots, profiles)
        except BaseException:
            self.close()
            raise

    def _make_slots(self, path: Path, n_slots: int, profiles: int) -> None:
        cudart, engine = self.cudart, self.engine
        for p in range(n_slots):
            context = engine.create_execution_context()
            if context is None:
                raise BackendUnavailableError(
                    f"TensorRT could not create an execution context for {path} (GPU memory?)"
                )
            stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
            slot = _Slot(context, p, stream)
            self._all.append(slot)
            if p:  # a new context starts on profile 0 (IExecutionContext::setOptimizationProfileAsync)
                try:
                    # The Python binding raises RuntimeError where the C++ call returns false
                    # (python/src/infer/pyCore.cpp, context_set_optimization_profile_async); check both.
                    ok = context.set_optimization_profile_async(p, _handle(stream))
                except RuntimeError as e:
                    ok, why = False, f": {e}"
                else:
                    why = ""
                if not ok:
                    raise BackendUnavailableError(
                        f"TensorRT refused optimization profile {p} of {path} ({profiles} profile(s)){why}; "
                        "rebuild the engines, or pass slots=1"
                    )
            self._slots.put(slot)

    def _buffer(self, slot: _Slot, name: str, nbytes: int) -> int:
        ptr, cap = slot.buffers.get(name, (0, 0))
        if cap >= nbytes and ptr:
            return ptr
        if ptr:
            _check(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")
            del slot.buffers[name]
        size = max(nbytes, 256)
        ptr = _handle(_check(self.cudart, self.cudart.cudaMalloc(size), "cudaMalloc"))
        slot.buffers[name] = (ptr, size)
        return ptr

    def _bind(self, slot: _Slot, name: str, ptr: int) -> None:
        if not slot.context.set_tensor_address(name, ptr):
            raise MssanError(
                f"TensorRT refused the device address of {self.graph}.{name} (see the TensorRT log)"
            )

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        slot = self._slots.get()
        try:
            ctx, stream = slot.context, slot.stream
            host_in: list[np.ndarray] = []
            for name in self.inputs:
                arr = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
                host_in.append(arr)  # alive until the stream syncs
                if not ctx.set_input_shape(name, tuple(int(s) for s in arr.shape)):
                    raise InputError(
                        f"TensorRT rejected shape {arr.shape} for {self.graph}.{name} (outside the profile)"
                    )
                ptr = self._buffer(slot, name, arr.nbytes)
                if arr.nbytes:
                    _check(
                        cudart,
                        cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, stream),
                        "cudaMemcpyAsync",
                    )
                self._bind(slot, name, ptr)
            host_out: dict[str, np.ndarray] = {}
            for name in self.outputs:
                shape = tuple(int(s) for s in ctx.get_tensor_shape(name))
                if any(s < 0 for s in shape):
                    raise MssanError(f"TensorRT could not infer the shape of {self.graph}.{name} ({shape})")
                out = np.empty(shape, self.dtypes[name])
                host_out[name] = out
                self._bind(slot, name, self._buffer(slot, name, out.nbytes))
            if not ctx.execute_async_v3(_handle(stream)):
                raise MssanError(f"TensorRT execute_async_v3 failed for {self.graph} (see the TensorRT log)")
            for name, out in host_out.items():
                if out.nbytes:
                    ptr = slot.buffers[name][0]
                    _check(
                        cudart,
                        cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, stream),
                        "cudaMemcpyAsync",
                    )
            _check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            del host_in
            return {
                n: (a.astype(np.float32) if a.dtype != np.float32 and a.dtype.kind == "f" else a)
                for n, a in host_out.items()
            }
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
            "(python -m export --checkpoint CKPT --out BUNDLE --tensorrt), export with "
            "--trt-version-compatible, "
            "or use backend='onnxruntime'"
        )
    built_gpu = record.get("gpu") or {}
    if gpu is None or not built_gpu:
        return
    level = str(settings.get("hardware_compatibility", "none")).lower()
    cc_built, cc_here = str(built_gpu.get("compute_capability")), str(gpu.get("compute_capability"))
    if level in ("none", "same_compute_capability") and cc_built != cc_here:
        raise TensorRTEngineMismatchError(
            f"the bundle's TensorRT engines were built for {built_gpu.get('name')} (compute capability "
            f"{cc_built}), "
            f"but this GPU is {gpu.get('name')} (compute capability {cc_here}). Rebuild them on this GPU, "
            "export with "
            "--trt-hardware-compatibility ampere_plus, or use backend='onnxruntime'"
        )
    if level == "none" and built_gpu.get("name") != gpu.get("name"):
        warnings.warn(
            f"TensorRT engines were built on {built_gpu.get('name')} and run on {gpu.get('name')} (same "
            "compute "
            "capability); TensorRT allows it but performance may differ. Rebuild on this GPU for best "
            "results.",
            RuntimeWarning,
            stacklevel=3,
        )


class TensorRTBackend(Backend):
    """Runs the bundle's TensorRT engines.

    Args:
        engines: graph name -> ``.plan`` path, for each of ``spec.GRAPHS``.
        record: the manifest's ``tensorrt`` entry (TensorRT version, GPU, settings),
            checked against this machine before any engine is deserialized.
        device: ``"cuda"`` / ``"cuda:N"`` (a :class:`Device`); made current for each calling thread.
        slots: concurrent execution contexts per engine (default: one per profile in the engine).

    Raises:
        BackendUnavailableError: tensorrt or cuda-python missing, no GPU/driver.
        TensorRTEngineMismatchError: engines built for another TensorRT version or GPU.
        BundleError: an engine's inputs/outputs differ from the spec.
        InputError: a device that is not a CUDA device.
    """

    name = "tensorrt"

    def __init__(
        self,
        engines: Mapping[str, str | Path],
        *,
        record: Mapping[str, Any] | None = None,
        device: str | Device = "cuda",
        slots: int | None = None,
    ) -> None:
        super().__init__(device)
        if self.device.kind != "cuda":
            raise InputError(
                f"backend 'tensorrt' runs on a CUDA device ('cuda' or 'cuda:N'), got {str(self.device)!r}"
            )
        trt = import_tensorrt()
        cudart = import_cudart()
        gpu = gpu_info(self.device.ordinal)
        if record is not None:
            _check_record(record, str(trt.__version__), gpu)
        self._cudart = cudart
        self.gpu = gpu
        self._engines: dict[str, _Engine] = {}
        self._lock = threading.Lock()
        with cuda_device(cudart, self.device.ordinal):
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            if record is not None and (record.get("settings") or {}).get("version_compatible"):
                self._runtime.engine_host_code_allowed = True  # version-compatible plans embed a lean runtime
            try:
                for graph, path in engines.items():
                    if graph not in GRAPHS:
                        raise BundleError(
                            f"no TensorRT engine is built for graph {graph!r}; engines exist for "
                            f"{sorted(GRAPHS)}"
                        )
                    eng = _Engine(trt, cudart, self._runtime, graph, Path(path), slots)
                    self._engines[graph] = eng
                    self._add_graph(graph, eng.dims)
            except BaseException:
                self._close_engines()
                raise
        log.info("tensorrt backend ready on %s (%s): %s", gpu.get("name"), self.device, sorted(self._engines))

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        options: BackendOptions | None = None,
    ) -> "TensorRTBackend":
        """The engines of ``bundle`` at ``options.precision`` ("fp32" or "fp16") on ``options.device``
        (``"cpu"`` means ``cuda:0``: TensorRT only runs on a GPU; ``threads`` is ignored).

        Raises:
            BundleError: the bundle has no TensorRT engines at that precision.
            InputError: options of another backend, or a precision without engines.
        """
        opts = options if options is not None else TensorRTOptions()
        if type(opts) is BackendOptions:
            opts = TensorRTOptions(device=opts.device, precision=opts.precision, threads=opts.threads)
        if not isinstance(opts, TensorRTOptions):
            raise InputError(f"backend 'tensorrt' takes TensorRTOptions, got {type(opts).__name__}")
        precision = opts.precision
        dev = parse_device(opts.device)
        if dev.kind == "cpu":
            dev = Device("cuda", 0)
        import_tensorrt()  # missing packages first: they are the first thing to fix
        import_cudart()
        record = bundle.manifest.tensorrt
        if record is None or not record.get("engines"):
            raise BundleError(
                f"bundle {bundle.root} has no TensorRT engines; export with "
                "`python -m export --checkpoint CKPT --out BUNDLE --tensorrt` on a machine with TensorRT "
                "and a GPU"
            )
        table = record["engines"].get(precision)
        if not table:
            raise BundleError(
                f"bundle {bundle.root} has no {precision} TensorRT engines (has "
                f"{sorted(record['engines'])}); "
                f"re-export with --tensorrt{' --fp16' if precision == 'fp16' else ''}"
            )
        missing = [g for g in GRAPHS if g not in table]
        if missing:
            raise BundleError(
                f"bundle {bundle.root} lacks TensorRT engines for {missing}; re-export with --tensorrt"
            )
        engines = {g: bundle.path(table[g]["file"]) for g in GRAPHS}
        return cls(engines, record=record, device=dev, slots=opts.slots)

    def limits(self, graph: str) -> dict[str, int]:
        """Largest size of each dynamic axis one engine call accepts (the profile maximum)."""
        self.spec(graph)
        return dict(self._engines[graph].limits)

    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with cuda_device(self._cudart, self.device.ordinal):
            return self._engines[graph].run(feeds)

    def _close(self) -> None:
        with cuda_device(self._cudart, self.device.ordinal):
            self._close_engines()

    def _close_engines(self) -> None:
        with self._lock:
            for eng in self._engines.values():
                eng.close()
            self._engines.clear()
