"""A stand-in for ``tensorrt`` and cuda-python's ``cudart``, so the TensorRT path runs end to end
without a GPU.

It implements the parts of the TensorRT 10/11 Python API and of ``cuda.bindings.runtime``
that ``export/tensorrt.py`` and ``mssan_infer/backends/tensorrt.py`` use, with their
documented return conventions (``(cudaError_t, value)`` tuples; ``set_input_shape`` /
``set_tensor_address`` / ``execute_async_v3`` return a bool; ``set_optimization_profile_async``
raises ``RuntimeError`` on failure as the binding does), and records what it is asked:

- every build: network flags, the builder flags in force when ``build_serialized_network``
  ran (TF32 is on by default, as ``BuilderFlag::kTF32`` says), the hardware compatibility
  level, and each profile's min/opt/max per input;
- every CUDA call with the calling thread and the device current for it (the device is per
  host thread, as ``cudaSetDevice`` documents), and every violation: memory, streams or
  contexts of one device used while another is current.

A "plan" is a small header and the ONNX graph; its engine runs the graph in ONNX Runtime
on the CPU (fp16 graphs with explicit fp16 rounding, like a real fp16 device). An engine
built with TF32 left on rounds the inputs of every MatMul/Gemm to 10-bit mantissas (through
fp16, which has the same mantissa), so a forgotten ``clear_flag(TF32)`` shows in parity.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mssan_infer.spec import GRAPHS

MAGIC = b"MSSAN-TRT-STANDIN\n"
SUCCESS = 0
INVALID_VALUE = 1
INVALID_DEVICE = 101


@dataclass
class StandIn:
    """What the stand-in was asked, shared by its ``tensorrt`` and ``cudart`` modules."""

    version: str = "10.9.0"
    devices: int = 1
    gpu_name: str = "Stand-in GPU"
    compute_capability: tuple[int, int] = (9, 0)
    same_cc_binding: bool = True  # HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY bound
    builds: list[dict[str, Any]] = field(default_factory=list)
    calls: list[tuple[str, str, int]] = field(default_factory=list)  # (thread, call, current device)
    violations: list[str] = field(default_factory=list)
    profile_switches: list[tuple[int, int]] = field(default_factory=list)  # (profile, device) per switch
    refuse_profile_switch: bool = False
    memory: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)
    streams: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    local: threading.local = field(default_factory=threading.local)
    tensorrt: types.ModuleType | None = None
    cudart: types.ModuleType | None = None

    @property
    def current(self) -> int:
        return int(getattr(self.local, "device", 0))

    def record(self, call: str) -> None:
        with self.lock:
            self.calls.append((threading.current_thread().name, call, self.current))

    def violation(self, what: str) -> None:
        with self.lock:
            self.violations.append(f"{threading.current_thread().name}: {what}")


def install(monkeypatch: Any, **options: Any) -> StandIn:
    """Put the stand-in's ``tensorrt`` and ``cuda.bindings.runtime`` into ``sys.modules``
    (undone by ``monkeypatch``)."""
    s = StandIn(**options)
    s.tensorrt = _tensorrt_module(s)
    s.cudart = _cudart_module(s)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = s.cudart  # type: ignore[attr-defined]
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings  # type: ignore[attr-defined]
    for name, mod in (
        ("tensorrt", s.tensorrt),
        ("cuda", cuda),
        ("cuda.bindings", bindings),
        ("cuda.bindings.runtime", s.cudart),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    return s


# ---- cudart -------------------------------------------------------------------------------------
def _cudart_module(s: StandIn) -> types.ModuleType:
    m = types.ModuleType("cuda.bindings.runtime")

    class cudaError_t(enum.IntEnum):
        cudaSuccess = SUCCESS
        cudaErrorInvalidValue = INVALID_VALUE
        cudaErrorInvalidDevice = INVALID_DEVICE

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    ok = cudaError_t.cudaSuccess

    def cudaGetDeviceCount() -> tuple[Any, int]:
        return ok, s.devices

    def cudaGetDeviceProperties(device: int) -> tuple[Any, Any]:
        if not 0 <= device < s.devices:
            return cudaError_t.cudaErrorInvalidDevice, None
        name = s.gpu_name.encode() + b"\0" * 8
        return ok, types.SimpleNamespace(
            name=name, major=s.compute_capability[0], minor=s.compute_capability[1]
        )

    def cudaGetDevice() -> tuple[Any, int]:
        return ok, s.current

    def cudaSetDevice(device: int) -> tuple[Any]:
        if not 0 <= device < s.devices:
            return (cudaError_t.cudaErrorInvalidDevice,)
        s.local.device = int(device)
        s.record(f"cudaSetDevice({device})")
        return (ok,)

    def cudaMalloc(size: int) -> tuple[Any, int]:
        buf = np.zeros(int(size), np.uint8)
        ptr = int(buf.ctypes.data)
        with s.lock:
            s.memory[ptr] = (s.current, buf)
        s.record("cudaMalloc")
        return ok, ptr

    def cudaFree(ptr: int) -> tuple[Any]:
        with s.lock:
            entry = s.memory.pop(int(ptr), None)
        if entry is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        if entry[0] != s.current:
            s.violation(f"cudaFree of device {entry[0]} memory with device {s.current} current")
        return (ok,)

    def cudaStreamCreate() -> tuple[Any, int]:
        with s.lock:
            handle = 0x5000 + len(s.streams) + 1
            s.streams[handle] = s.current
        s.record("cudaStreamCreate")
        return ok, handle

    def cudaStreamDestroy(stream: int) -> tuple[Any]:
        with s.lock:
            s.streams.pop(int(stream), None)
        return (ok,)

    def _device_of(ptr: int, n: int) -> int | None:
        for base, (dev, buf) in s.memory.items():
            if base <= ptr and ptr + n <= base + buf.nbytes:
                return dev
        return None

    def cudaMemcpyAsync(dst: int, src: int, n: int, kind: Any, stream: int) -> tuple[Any]:
        device_ptr = dst if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else src
        dev = _device_of(int(device_ptr), int(n))
        if dev is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        if s.streams.get(int(stream)) != s.current or dev != s.current:
            s.violation(
                f"cudaMemcpyAsync on device {dev} memory / stream of device {s.streams.get(int(stream))} "
                f"with device {s.current} current"
            )
        ctypes.memmove(int(dst), int(src), int(n))
        s.record("cudaMemcpyAsync")
        return (ok,)

    def cudaStreamSynchronize(stream: int) -> tuple[Any]:
        return (ok,)

    for name, obj in list(locals().items()):
        if name.startswith("cuda"):
            setattr(m, name, obj)
    m._device_of = _device_of  # type: ignore[attr-defined]
    return m


# ---- tensorrt -------------------------------------------------------------------------------------
def _flag_enum(version: str) -> type[enum.Enum]:
    names = ["DEBUG", "TF32", "VERSION_COMPATIBLE", "STRICT_NANS"]
    if int(version.split(".")[0]) < 11:
        names.append("FP16")  # TensorRT 11 has no precision flags
    return enum.Enum("BuilderFlag", names)  # type: ignore[return-value]


def _tensorrt_module(s: StandIn) -> types.ModuleType:
    m = types.ModuleType("tensorrt")
    m.__version__ = s.version  # type: ignore[attr-defined]
    BuilderFlag = _flag_enum(s.version)
    levels = ["NONE", "AMPERE_PLUS"] + (["SAME_COMPUTE_CAPABILITY"] if s.same_cc_binding else [])
    HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel", levels)

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    class DataType(enum.Enum):
        FLOAT = "float32"
        INT64 = "int64"
        HALF = "float16"

    def nptype(dt: DataType) -> Any:
        return np.dtype(dt.value).type

    class Logger:
        WARNING = 2

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    class _Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.onnx: bytes | None = None
            self.path = ""

    class OnnxParser:
        def __init__(self, network: _Network, logger: Logger) -> None:
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            with open(path, "rb") as f:
                self.network.onnx = f.read()
            self.network.path = path
            onnx.load_from_string(self.network.onnx)
            return True

        def get_error(self, i: int) -> str:
            return ""

    class _Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

        def set_shape(self, name: str, mn: Any, opt: Any, mx: Any) -> None:
            self.shapes[name] = (list(mn), list(opt), list(mx))

    class _TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data or b"standin-timing-cache"

    class _Config:
        def __init__(self) -> None:
            self.flags = {BuilderFlag.TF32}  # on by default (BuilderFlag::kTF32)
            self.pools: dict[Any, int] = {}
            self.hardware_compatibility_level = HardwareCompatibilityLevel.NONE
            self.builder_optimization_level = 3
            self.profiles: list[_Profile] = []
            self.cache: _TimingCache | None = None

        def set_flag(self, flag: Any) -> None:
            self.flags.add(flag)

        def clear_flag(self, flag: Any) -> None:
            self.flags.discard(flag)

        def get_flag(self, flag: Any) -> bool:
            return flag in self.flags

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pools[pool] = size

        def create_timing_cache(self, data: bytes) -> _TimingCache:
            return _TimingCache(bytes(data))

        def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> _TimingCache | None:
            return self.cache

        def add_optimization_profile(self, profile: _Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> _Network:
            return _Network(flags)

        def create_builder_config(self) -> _Config:
            return _Config()

        def create_optimization_profile(self) -> _Profile:
            return _Profile()

        def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
            assert network.onnx is not None
            flags = {f.name: f in config.flags for f in BuilderFlag}
            header = {
                "flags": flags,
                "network_flags": network.flags,
                "hardware_compatibility_level": config.hardware_compatibility_level.name,
                "profiles": [p.shapes for p in config.profiles],
                "device": s.current,
            }
            s.builds.append(
                {
                    **json.loads(json.dumps(header)),
                    "onnx": network.path,
                    "optimization_level": config.builder_optimization_level,
                    "workspace": dict((k.name, v) for k, v in config.pools.items()),
                }
            )
            s.record("build_serialized_network")
            return MAGIC + json.dumps(header).encode() + b"\n" + network.onnx

    class _Context:
        def __init__(self, engine: "_Engine") -> None:
            self.engine = engine
            self.profile = 0
            self.device = s.current
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
            if s.refuse_profile_switch or not 0 <= profile < len(self.engine.profiles):
                raise RuntimeError("Error in set optimization profile async.")  # as the binding does
            self.profile = profile
            s.profile_switches.append((profile, s.current))
            return True

        def set_input_shape(self, name: str, shape: Any) -> bool:
            shape = tuple(int(x) for x in shape)
            mn, _opt, mx = self.engine.profiles[self.profile][name]
            if len(shape) != len(mn) or any(not a <= x <= b for a, x, b in zip(mn, shape, mx)):
                return False
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> list[int]:
            if name in self.engine.inputs:
                return list(self.shapes.get(name, ()))
            return self.engine.output_shape(name, self.shapes)

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream: int) -> bool:
            s.record("execute_async_v3")
            if s.current != self.device or s.streams.get(int(stream)) != self.device:
                s.violation(
                    f"execute_async_v3 of a device-{self.device} context with device {s.current} current"
                )
                return False
            feeds = {}
            for name in self.engine.inputs:
                shape, dtype = self.shapes[name], self.engine.dtypes[name]
                feeds[name] = self._read(name, shape, dtype)
            outs = self.engine.session.run(self.engine.outputs, feeds)
            for name, out in zip(self.engine.outputs, outs):
                out = np.ascontiguousarray(out, dtype=self.engine.dtypes[name])
                if out.nbytes:
                    ctypes.memmove(self.addresses[name], out.ctypes.data, out.nbytes)
            return True

        def _read(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
            arr = np.empty(shape, dtype)
            dev = s.cudart._device_of(self.addresses[name], arr.nbytes) if arr.nbytes else self.device  # type: ignore[union-attr]
            if dev != self.device:
                s.violation(f"{name} bound to device-{dev} memory in a device-{self.device} context")
            if arr.nbytes:
                ctypes.memmove(arr.ctypes.data, self.addresses[name], arr.nbytes)
            return arr

    class _Engine:
        def __init__(self, header: dict[str, Any], model: onnx.ModelProto) -> None:
            self.header = header
            self.profiles = [{k: tuple(v) for k, v in p.items()} for p in header["profiles"]]
            g = model.graph
            inits = {i.name for i in g.initializer}
            self.inputs = [v.name for v in g.input if v.name not in inits]
            self.outputs = [v.name for v in g.output]
            spec = next(sp for sp in GRAPHS.values() if set(sp.input_names) == set(self.inputs))
            self.spec = spec
            types_ = {TensorProto.FLOAT: np.dtype(np.float32), TensorProto.INT64: np.dtype(np.int64)}
            self.dtypes = {
                v.name: types_[v.type.tensor_type.elem_type]
                for v in (*g.input, *g.output)
                if v.name not in inits
            }
            self.declared = {
                v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                for v in (*g.input, *g.output)
            }
            fp16 = any(i.data_type == TensorProto.FLOAT16 for i in g.initializer)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if fp16 or header["flags"].get("TF32"):
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if fp16:
                from export.fp16 import with_explicit_rounding

                model = with_explicit_rounding(model)
            elif header["flags"].get("TF32"):
                model = _tf32_rounding(model)
            self.session = ort.InferenceSession(
                model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
            )
            self.shape_cache: dict[tuple[tuple[int, ...], ...], dict[str, list[int]]] = {}
            self.device = s.current

        # ICudaEngine
        @property
        def num_io_tensors(self) -> int:
            return len(self.inputs) + len(self.outputs)

        @property
        def num_optimization_profiles(self) -> int:
            return len(self.profiles)

        def get_tensor_name(self, i: int) -> str:
            return (self.inputs + self.outputs)[i]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType(str(self.dtypes[name]))

        def get_tensor_shape(self, name: str) -> list[int]:
            return list(self.declared[name])

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[list[int]]:
            return [list(x) for x in self.profiles[profile][name]]

        def create_execution_context(self) -> _Context:
            s.record("create_execution_context")
            if s.current != self.device:
                s.violation(
                    f"execution context of a device-{self.device} engine made with device {s.current} current"
                )
            return _Context(self)

        def output_shape(self, name: str, shapes: dict[str, tuple[int, ...]]) -> list[int]:
            """Shape inference as TensorRT does it before running: here by running the graph once on zeros."""
            key = tuple(shapes.get(n, ()) for n in self.inputs)
            if key not in self.shape_cache:
                zeros = {n: np.zeros(shapes[n], self.dtypes[n]) for n in self.inputs}
                self.shape_cache[key] = {
                    n: list(o.shape) for n, o in zip(self.outputs, self.session.run(self.outputs, zeros))
                }
            return list(self.shape_cache[key][name])

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
            s.record("deserialize_cuda_engine")
            if not bytes(data).startswith(MAGIC):
                return None
            head, _, body = bytes(data)[len(MAGIC) :].partition(b"\n")
            header = json.loads(head)
            if header["flags"].get("VERSION_COMPATIBLE") and not self.engine_host_code_allowed:
                return None  # a version-compatible plan needs host code allowed
            return _Engine(header, onnx.load_from_string(body))

    for name, obj in list(locals().items()):
        if not name.startswith("_") and name not in ("s", "m", "levels"):
            setattr(m, name, obj)
    return m


def _tf32_rounding(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an fp32 graph whose MatMul/Gemm inputs are rounded to 10-bit mantissas (TF32),
    outputs fp32."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    nodes: list[onnx.NodeProto] = []
    done: dict[str, str] = {}
    for node in g.node:
        if node.op_type in ("MatMul", "Gemm"):
            new = onnx.NodeProto()
            new.CopyFrom(node)
            for i, name in enumerate(node.input):
                if not name:
                    continue
                if name not in done:
                    rounded = f"{name}__tf32"
                    if name in inits:
                        w = numpy_helper.to_array(inits[name]).astype(np.float32)
                        bits = w.view(np.uint32)
                        w = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
                        g.initializer.append(numpy_helper.from_array(w, rounded))
                    else:
                        nodes.append(helper.make_node("Cast", [name], [f"{name}__h"], to=TensorProto.FLOAT16))
                        nodes.append(helper.make_node("Identity", [f"{name}__h"], [f"{name}__hk"]))
                        nodes.append(
                            helper.make_node("Cast", [f"{name}__hk"], [rounded], to=TensorProto.FLOAT)
                        )
                    done[name] = rounded
                new.input[i] = done[name]
            nodes.append(new)
        else:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return out
