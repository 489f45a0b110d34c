"""TensorRT engines from the bundle's ONNX graphs (``python -m export ... --tensorrt``).

One engine per graph and precision, ``tensorrt/<graph>.plan`` (fp32) and
``tensorrt/<graph>.fp16.plan`` (from the ``fp16/`` ONNX variants), each with
``num_profiles`` identical optimisation profiles (one per concurrent execution
context) whose min/opt/max shapes come from the graph specs
(``mssan_infer.spec.DEFAULT_PROFILES``, overridable per axis, widened to what the
bundle needs: ``L`` up to the tokenizer's ``max_len``, ``R`` up to the pixel graph's
grid cells).

Precision: networks are strongly typed. TensorRT 11 has no precision builder
flags (strong typing is always on); on TensorRT 10 the network is created with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``. Either way fp16 comes from the
fp16 ONNX graphs, which keep softmax, norms and reductions in fp32.
``typing="weak"`` (TensorRT 10 only) instead builds the fp16 engines weakly
typed with ``BuilderFlag.FP16``, letting TensorRT pick layer precisions.

TF32 is cleared on every engine: ``BuilderFlag.TF32`` is "Enabled by default" and lets
fp32 matrix products round their inputs to 10-bit mantissas (``include/NvInfer.h``,
``BuilderFlag::kTF32``, TensorRT 10 and 11; the Python docstring in
``python/docstrings/infer/pyCoreDoc.h`` says the same). An emulation of that rounding on
the trained demo model moved ``img_gram``/``txt_gram`` by 1.6e-4/1.7e-4, past the fp32
tolerance of 1e-4, so an fp32 engine with TF32 would fail its own parity check.

The build is followed by a parity check of every engine: ``export.validate.compare_runners``
with ONNX Runtime on the fp32 graphs as the reference, on cases at the profiles'
min/opt/max (``export.inputs.profile_cases``) and the two-stage rerank check, at
``TOLERANCES[precision]`` -- the same check and report schema as the ONNX graphs'. The
manifest records the TensorRT version, the GPU, the settings, the builder flags, the
profiles, the largest size of each axis one call takes (``limits``) and the parity reports.

Only the pure parts (profile derivation, settings, manifest records) run
without TensorRT; building and running engines needs ``tensorrt``, cuda-python
and an NVIDIA GPU (the tests drive them through a stand-in, ``tests/trt_standin.py``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mssan_infer.backends.base import Backend
from mssan_infer.backends.tensorrt import cuda_device, gpu_info, import_cudart, import_tensorrt
from mssan_infer.errors import BackendUnavailableError, BundleError
from mssan_infer.files import read_versioned_json, sha256_file
from mssan_infer.names import FORMAT_VERSION, LIMITS_KEY, MANIFEST_FILE, TENSORRT_KEY, VOCAB_FILE, plan_name
from mssan_infer.options import Device
from mssan_infer.spec import DEFAULT_PROFILES, FIXED_AXES, GRAPHS, GraphSpec

from .deployment_step import DeploymentStep
from .errors import ExportError
from .inputs import profile_cases
from .manifest import FP16_DIR
from .runners import onnx_runner
from .validate import ParityReport, compare_runners, raise_if_failed, rerank_cases, tolerance_for

__all__ = [
    "TensorRTSettings",
    "BundleShape",
    "HARDWARE_COMPATIBILITY",
    "TYPING",
    "resolve_axes",
    "bundle_axes",
    "parse_profile_override",
    "derive_profiles",
    "profile_record",
    "axis_limits",
    "engine_record",
    "hardware_level",
    "build_engine",
    "build_engines",
    "engine_parity",
    "bundle_dims",
    "bundle_shape",
    "make_step",
]

log = logging.getLogger(__name__)

HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
TYPING = ("auto", "strong", "weak")
TIMING_CACHE = "tensorrt/timing.cache"
Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorRTSettings:
    """How the engines are built (all recorded in the manifest).

    Attributes:
        profiles: per-axis ``(min, opt, max)`` overrides of ``DEFAULT_PROFILES`` (axes B, R, L, Ni, Nt).
        precisions: which graphs to build from: ``("fp32",)``, or with ``"fp16"`` (needs an ``--fp16``
        export).
        num_profiles: identical optimisation profiles per engine = concurrent execution contexts.
        workspace_mib: builder workspace memory pool limit.
        timing_cache: a timing cache file to read and update (default: ``tensorrt/timing.cache`` in the
        bundle).
        version_compatible: ``BuilderFlag.VERSION_COMPATIBLE`` (engines load in later TensorRT versions).
        hardware_compatibility: ``"none"``, ``"ampere_plus"`` or ``"same_compute_capability"``.
        optimization_level: builder optimisation level 0-5 (None: TensorRT's default, 3).
        typing: ``"auto"``/``"strong"`` strongly typed; ``"weak"`` weak typing + ``BuilderFlag.FP16``
        (TensorRT 10).
        parity: run the ONNX Runtime parity check after the build (fatal past tolerance).
    """

    profiles: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    precisions: tuple[str, ...] = ("fp32", "fp16")
    num_profiles: int = 2
    workspace_mib: int = 2048
    timing_cache: str | None = None
    version_compatible: bool = False
    hardware_compatibility: str = "none"
    optimization_level: int | None = None
    typing: str = "auto"
    parity: bool = True

    def __post_init__(self) -> None:
        resolve_axes(self.profiles)
        bad = [p for p in self.precisions if p not in ("fp32", "fp16")]
        if bad or not self.precisions:
            raise ExportError(
                f"TensorRT precisions must be a non-empty subset of ('fp32', 'fp16'), got {self.precisions}"
            )
        if not isinstance(self.num_profiles, int) or not 1 <= self.num_profiles <= 16:
            raise ExportError(f"num_profiles must be an int in 1..16, got {self.num_profiles!r}")
        if not isinstance(self.workspace_mib, int) or self.workspace_mib < 16:
            raise ExportError(f"workspace_mib must be an int >= 16, got {self.workspace_mib!r}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise ExportError(
                f"hardware_compatibility must be one of {HARDWARE_COMPATIBILITY}, got "
                f"{self.hardware_compatibility!r}"
            )
        if self.optimization_level is not None and self.optimization_level not in range(6):
            raise ExportError(f"optimization_level must be 0..5 or None, got {self.optimization_level!r}")
        if self.typing not in TYPING:
            raise ExportError(f"typing must be one of {TYPING}, got {self.typing!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as asked (``profiles``: the overrides only; the record's ``profiles`` has what was
        built)."""
        d = asdict(self)
        d["profiles"] = {k: [int(x) for x in v] for k, v in self.profiles.items()}
        d["precisions"] = list(self.precisions)
        return d


# ---- profiles (pure) -----------------------------------------------------------------
def resolve_axes(overrides: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, int, int]]:
    """``DEFAULT_PROFILES`` with ``overrides`` applied, checked: ``1 == min <= opt <= max``.

    The minimum is 1 on every axis: the runtime encodes single queries, scores one query
    against its candidates and trims padding to the longest real item, so every size from 1
    up reaches the engines.

    Raises:
        ExportError: an unknown axis, a fixed axis (D, D2, Dv) or an inconsistent triple.
    """
    axes = dict(DEFAULT_PROFILES)
    for axis, triple in (overrides or {}).items():
        if axis in FIXED_AXES:
            raise ExportError(
                f"axis {axis} is fixed by the model config; only {sorted(DEFAULT_PROFILES)} have profiles"
            )
        if axis not in DEFAULT_PROFILES:
            raise ExportError(f"unknown profile axis {axis!r}; choose from {sorted(DEFAULT_PROFILES)}")
        try:
            mn, opt, mx = (int(x) for x in triple)
        except (TypeError, ValueError):
            raise ExportError(
                f"profile of {axis} must be three integers (min, opt, max), got {triple!r}"
            ) from None
        if not 1 <= mn <= opt <= mx:
            raise ExportError(f"profile of {axis} must satisfy 1 <= min <= opt <= max, got {(mn, opt, mx)}")
        if mn != 1:
            raise ExportError(
                f"profile of {axis} must start at 1, got {(mn, opt, mx)}: the runtime sends single queries "
                "and "
                "trims padding, so every size from 1 up occurs"
            )
        axes[axis] = (mn, opt, mx)
    return axes


def bundle_axes(
    overrides: Mapping[str, Sequence[int]] | None,
    needs: Mapping[str, int],
    typical: Mapping[str, int] | None = None,
) -> dict[str, tuple[int, int, int]]:
    """``resolve_axes(overrides)`` widened to what the bundle sends the engines.

    Args:
        needs: the largest size of an axis the runtime will send (``L``: the tokenizer's
            ``max_len``; ``R``: the pixel graph's grid cells). An axis that was not overridden
            gets its maximum raised to it.
        typical: the usual size of an axis (``R`` of a pixel bundle), made the opt of an axis
            that was not overridden.
    Raises:
        ExportError: an override whose maximum is below what the bundle needs.
    """
    given = dict(overrides or {})
    axes = resolve_axes(given)
    for axis, need in needs.items():
        mn, opt, mx = axes[axis]
        if need <= mx:
            continue
        if axis in given:
            raise ExportError(
                f"--trt-profile {axis}={mn},{opt},{mx} is too small for this bundle, which sends {axis} up "
                f"to {need} "
                f"({_NEEDS[axis]}); use a maximum of at least {need}"
            )
        axes[axis] = (mn, opt, int(need))
    for axis, n in (typical or {}).items():
        if axis not in given:
            mn, _opt, mx = axes[axis]
            axes[axis] = (mn, min(max(int(n), mn), mx), mx)
    return axes


_NEEDS = {"L": "the tokenizer's max_len", "R": "the pixel graph's grid cells"}


def parse_profile_override(text: str) -> tuple[str, tuple[int, int, int]]:
    """``"B=1,32,128"`` -> ``("B", (1, 32, 128))`` (the ``--trt-profile`` syntax).

    Raises:
        ExportError: malformed text.
    """
    axis, sep, rest = str(text).partition("=")
    parts = [p.strip() for p in rest.split(",")]
    if not sep or len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ExportError(f"--trt-profile must look like AXIS=MIN,OPT,MAX (e.g. B=1,32,128), got {text!r}")
    triple = (int(parts[0]), int(parts[1]), int(parts[2]))
    resolve_axes({axis.strip(): triple})
    return axis.strip(), triple


def derive_profiles(
    spec: GraphSpec, dims: Mapping[str, int], axes: Mapping[str, tuple[int, int, int]]
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Per input of ``spec``: the ``(min, opt, max)`` shapes of its optimisation profile.

    Args:
        spec: the graph.
        dims: sizes of the fixed axes (``D``, ``D2``, ``Dv``) from the model config.
        axes: ``resolve_axes(...)``: the range of every dynamic axis.
    Raises:
        ExportError: a fixed axis missing from ``dims``.
    """
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for t in spec.inputs:
        lo, mid, hi = [], [], []
        for axis in t.axes:
            if axis in FIXED_AXES:
                if axis not in dims:
                    raise ExportError(f"size of fixed axis {axis} unknown (dims has {sorted(dims)})")
                n = int(dims[axis])
                a, b, c = n, n, n
            else:
                a, b, c = axes[axis]
            lo.append(a)
            mid.append(b)
            hi.append(c)
        out[t.name] = (tuple(lo), tuple(mid), tuple(hi))
    return out


def profile_record(profiles: Mapping[str, tuple[Shape, Shape, Shape]]) -> dict[str, dict[str, list[int]]]:
    """JSON form of ``derive_profiles``: ``{input: {"min": [...], "opt": [...], "max": [...]}}``."""
    return {n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in profiles.items()}


def axis_limits(axes: Mapping[str, tuple[int, int, int]]) -> dict[str, int]:
    """The manifest's ``tensorrt.limits``: ``{axis: largest size one engine call takes}`` (the profile
    maxima)."""
    return {axis: int(axes[axis][2]) for axis in DEFAULT_PROFILES}


def engine_record(
    root: Path,
    engines: Mapping[str, Mapping[str, Path]],
    profiles: Mapping[str, Mapping[str, tuple[Shape, Shape, Shape]]],
    settings: TensorRTSettings,
    *,
    axes: Mapping[str, tuple[int, int, int]],
    tensorrt_version: str,
    gpu: Mapping[str, Any] | None,
    typing: Mapping[str, str],
    builder_flags: Mapping[str, Mapping[str, bool]] | None = None,
    build_seconds: Mapping[str, float] | None = None,
    parity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest's ``tensorrt`` entry.

    Args:
        root: the bundle folder (engine paths are recorded relative to it, with sha256).
        engines: ``{precision: {graph: plan path}}``.
        profiles: ``{graph: derive_profiles(...)}``.
        axes: the ``(min, opt, max)`` of every axis the engines were built with (``bundle_axes``).
        typing: ``{precision: "strong" | "weak"}`` as actually built.
        builder_flags: ``{"<precision>/<graph>": {flag: set?}}`` as the builder config reported them.
    Returns:
        ``{"tensorrt_version", "gpu", "settings", "profiles": {axis: [min, opt, max]},
        "limits": {axis: max}, "engines": {precision: {graph: {...}}}, "parity"?}``.
    """
    table: dict[str, dict[str, Any]] = {}
    for precision, graphs in engines.items():
        table[precision] = {}
        for graph, path in graphs.items():
            table[precision][graph] = {
                "file": Path(path).relative_to(root).as_posix(),
                "sha256": sha256_file(path),
                "bytes": Path(path).stat().st_size,
                "typing": typing.get(precision, "strong"),
                "builder_flags": dict((builder_flags or {}).get(f"{precision}/{graph}", {})),
                "profiles": settings.num_profiles,
                "profile_shapes": profile_record(profiles[graph]),
                "build_seconds": round(float((build_seconds or {}).get(f"{precision}/{graph}", 0.0)), 2),
            }
    record: dict[str, Any] = {
        "tensorrt_version": tensorrt_version,
        "gpu": dict(gpu) if gpu else None,
        "settings": settings.to_dict(),
        "profiles": {axis: [int(x) for x in axes[axis]] for axis in DEFAULT_PROFILES},
        LIMITS_KEY: axis_limits(axes),
        "engines": table,
    }
    if parity is not None:
        record["parity"] = dict(parity)
    return record


# ---- building (needs tensorrt + GPU) ------------------------------------------------
def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _resolved_typing(trt: Any, wanted: str) -> str:
    if wanted == "weak":
        if _major(trt.__version__) >= 11 or not hasattr(trt.BuilderFlag, "FP16"):
            raise ExportError(
                f"typing='weak' needs BuilderFlag.FP16, which TensorRT {trt.__version__} removed; "
                "TensorRT 11 is always strongly typed (fp16 comes from the fp16 ONNX graphs)"
            )
        return "weak"
    return "strong"


def hardware_level(trt: Any, level: str) -> Any:
    """``trt.HardwareCompatibilityLevel`` member for ``level`` (None for ``"none"``).

    ``SAME_COMPUTE_CAPABILITY`` has a Python binding only from TensorRT 10.9
    (``python/src/infer/pyCore.cpp``: the 10.8 bindings list NONE and AMPERE_PLUS only).

    Raises:
        BackendUnavailableError: the installed tensorrt has no binding for ``level``.
    """
    if level == "none":
        return None
    member = getattr(getattr(trt, "HardwareCompatibilityLevel", None), level.upper(), None)
    if member is None:
        raise BackendUnavailableError(
            f"--trt-hardware-compatibility {level} needs trt.HardwareCompatibilityLevel.{level.upper()}, "
            "which this "
            f"TensorRT ({getattr(trt, '__version__', '?')}) does not have (its Python binding came in "
            "TensorRT 10.9); "
            "upgrade tensorrt, or use --trt-hardware-compatibility ampere_plus / none"
        )
    return member


_RECORDED_FLAGS = ("TF32", "FP16", "VERSION_COMPATIBLE")


def build_engine(
    onnx_path: Path,
    out: Path,
    profiles: Mapping[str, tuple[Shape, Shape, Shape]],
    settings: TensorRTSettings,
    *,
    precision: str,
    timing_cache: bytes | None = None,
) -> tuple[str, bytes | None, dict[str, bool]]:
    """Build and write one serialized engine (on the calling thread's current CUDA device).

    Returns:
        ``(typing used, updated timing cache bytes, {builder flag: set?})``.
    Raises:
        BackendUnavailableError: tensorrt missing, or without a binding the settings need.
        ExportError: the ONNX parser or the builder failed, or TF32 could not be cleared.
    """
    trt = import_tensorrt()
    typing = _resolved_typing(trt, settings.typing) if precision == "fp16" else "strong"
    level = hardware_level(trt, settings.hardware_compatibility)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    flag_enum = trt.NetworkDefinitionCreationFlag
    if typing == "strong" and _major(trt.__version__) < 11 and hasattr(flag_enum, "STRONGLY_TYPED"):
        flags |= 1 << int(flag_enum.STRONGLY_TYPED)  # TensorRT 11: always strongly typed, flag deprecated
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path.name}: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    # TF32 is on by default (BuilderFlag::kTF32, NvInfer.h): fp32 products would round their inputs to
    # 10-bit mantissas. Cleared on every engine (the fp16 graphs keep their GRU and norms in fp32 too).
    config.clear_flag(trt.BuilderFlag.TF32)
    if config.get_flag(trt.BuilderFlag.TF32):
        raise ExportError(
            f"TensorRT kept BuilderFlag.TF32 set for {onnx_path.name}; fp32 engines would round to TF32"
        )
    if typing == "weak":
        config.set_flag(trt.BuilderFlag.FP16)
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if level is not None:
        config.hardware_compatibility_level = level
    if settings.optimization_level is not None:
        config.builder_optimization_level = settings.optimization_level
    cache = config.create_timing_cache(timing_cache or b"")
    if not config.set_timing_cache(cache, False):
        log.warning("timing cache from another TensorRT version/GPU ignored; starting a fresh one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    for _ in range(settings.num_profiles):
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profiles.items():
            profile.set_shape(name, mn, opt, mx)
        if config.add_optimization_profile(profile) < 0:
            raise ExportError(
                f"TensorRT refused the optimisation profile of {onnx_path.name}: {dict(profiles)}"
            )
    recorded = {
        name: bool(config.get_flag(getattr(trt.BuilderFlag, name)))
        for name in _RECORDED_FLAGS
        if hasattr(trt.BuilderFlag, name)
    }
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(
            f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT log above)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(plan))
    os.replace(tmp, out)
    new_cache = config.get_timing_cache()
    return (
        typing,
        (bytes(memoryview(new_cache.serialize())) if new_cache is not None else timing_cache),
        recorded,
    )


@dataclass(frozen=True)
class BundleShape:
    """What engines and their checks need to know of a bundle (a ``export.inputs.FeedConfig``).

    Attributes:
        dims: the fixed axes ``{"D", "D2", "Dv"}``.
        vocab_size: size of ``vocab.json``.
        max_len: the tokenizer's ``max_len`` (the longest caption the runtime sends).
        pixel_regions: grid cells of the pixel graph, when the bundle has one.
    """

    dims: Mapping[str, int]
    vocab_size: int
    max_len: int
    pixel_regions: int | None = None

    @property
    def img_dim(self) -> int:
        return int(self.dims["Dv"])

    def needs(self) -> dict[str, int]:
        """The largest ``L`` (and ``R``, with a pixel graph) the runtime sends the engines."""
        out = {"L": self.max_len}
        if self.pixel_regions:
            out["R"] = self.pixel_regions
        return out

    def typical(self) -> dict[str, int]:
        return {"R": self.pixel_regions} if self.pixel_regions else {}


def bundle_dims(root: Path) -> tuple[dict[str, int], int]:
    """``({"D", "D2", "Dv"}, vocabulary size)`` of the bundle (finished or under construction) in ``root``.

    Read from the fp32 graphs' declared shapes and ``vocab.json``, so a deployment step
    needs nothing but the folder.
    """
    import onnx

    def last_dim(path: Path, name: str, inputs: bool) -> int:
        g = onnx.load(str(path), load_external_data=False).graph
        for v in g.input if inputs else g.output:
            if v.name == name:
                d = v.type.tensor_type.shape.dim[-1]
                if d.HasField("dim_value"):
                    return int(d.dim_value)
        raise ExportError(f"{path.name}: {name} has no fixed last dimension; re-export the bundle")

    dv = last_dim(root / GRAPHS["image_encoder"].file, "regions", True)
    d = last_dim(root / GRAPHS["image_encoder"].file, "img_local", False)
    vocab_path = root / VOCAB_FILE
    vocab = len(json.loads(vocab_path.read_text(encoding="utf-8"))) if vocab_path.is_file() else 5
    if not vocab_path.is_file() and (root / "tokenizer.json").is_file():  # a transformer tower's subwords
        from mssan_infer.text.subword import SubwordTokenizer

        vocab = len(SubwordTokenizer.from_file(root / "tokenizer.json"))
    return {"D": d, "D2": 2 * d, "Dv": dv}, vocab


def bundle_shape(root: Path, manifest: Mapping[str, Any] | None = None) -> BundleShape:
    """:class:`BundleShape` of the bundle in ``root``.

    Args:
        manifest: the manifest, or the entries of one under construction (``export_bundle`` passes
            ``model_config`` and the pixel graph's ``preprocessing``); default: ``root/manifest.json``.
    """
    dims, vocab = bundle_dims(root)
    if manifest is None:
        path = root / MANIFEST_FILE
        manifest = (
            read_versioned_json(path, error=BundleError, fix="re-export the bundle", version=FORMAT_VERSION)
            if path.is_file()
            else {}
        )
    max_len = (manifest.get("tokenizer") or {}).get("max_len") or (manifest.get("model_config") or {}).get(
        "max_len"
    )
    if not isinstance(max_len, int):
        log.warning(
            "tokenizer max_len unknown (no manifest yet); engines take captions of up to %d words",
            DEFAULT_PROFILES["L"][2],
        )
        max_len = DEFAULT_PROFILES["L"][2]
    grid = ((manifest.get("preprocessing") or {}).get("image") or {}).get("grid")
    cells = int(np.prod(grid)) if isinstance(grid, list) and grid else None
    return BundleShape(dims, vocab, int(max_len), cells)


# ---- parity: the engines against ONNX Runtime, through export.validate ------------------------
def engine_parity(
    root: Path,
    engines: Backend,
    axes: Mapping[str, tuple[int, int, int]],
    shape: BundleShape,
    precision: str,
    *,
    seed: int = 0,
) -> ParityReport:
    """The engines (a runner, e.g. a ``TensorRTBackend``) against ONNX Runtime on the bundle's fp32 graphs.

    Cases at the profiles' min/opt/max (``export.inputs.profile_cases``) and the rerank check
    (one query against ``rerank_depth`` candidates, within the profiles' ``R``/``L``), at
    ``TOLERANCES[precision]``: one implementation and one report schema with the ONNX check.
    """
    tol = tolerance_for(precision)
    with onnx_runner({g: root / spec.file for g, spec in GRAPHS.items()}) as reference:
        cases = profile_cases(shape, axes, reference, seed=seed)
        rerank = rerank_cases(shape, tol.rerank_depth, seed + 2, r_max=axes["R"][2], l_max=axes["L"][2])
        return compare_runners(
            reference,
            engines,
            cases,
            tol,
            precision=precision,
            rerank=rerank,
            execution=f"{engines.name} {precision} engines",
            reference_name="onnxruntime fp32 graphs",
            label=f"{engines.name} {precision}",
        )


def build_engines(
    root: Path,
    settings: TensorRTSettings | None = None,
    *,
    device: int = 0,
    manifest: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build every engine of the bundle (finished, or being built) in ``root`` and check them against ONNX
    Runtime.

    Args:
        device: the CUDA device to build on and check with.
        manifest: see :func:`bundle_shape` (where ``max_len`` and the pixel grid come from).
    Returns:
        ``{"tensorrt": record}`` to merge into the manifest.
    Raises:
        BackendUnavailableError: tensorrt, cuda-python or a GPU missing, or a binding the settings need.
        ExportError: a build failed, a profile override too small for the bundle.
        ParityError: an engine disagrees with ONNX Runtime past tolerance.
    """
    settings = settings or TensorRTSettings()
    trt = import_tensorrt()
    hardware_level(trt, settings.hardware_compatibility)
    from mssan_infer.backends.tensorrt import TensorRTBackend

    cudart = import_cudart()
    gpu = gpu_info(device)
    shape = bundle_shape(root, manifest)
    axes = bundle_axes(settings.profiles, shape.needs(), shape.typical())
    profiles = {g: derive_profiles(spec, shape.dims, axes) for g, spec in GRAPHS.items()}
    precisions = [
        p for p in settings.precisions if p == "fp32" or (root / FP16_DIR / "scorer.onnx").is_file()
    ]
    skipped = [p for p in settings.precisions if p not in precisions]
    for p in skipped:
        log.warning(
            "no fp16 ONNX graphs in the bundle (export with --fp16): %s TensorRT engines not built", p
        )
    cache_path = Path(settings.timing_cache) if settings.timing_cache else root / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else None
    engines: dict[str, dict[str, Path]] = {}
    typing: dict[str, str] = {}
    flags: dict[str, dict[str, bool]] = {}
    seconds: dict[str, float] = {}
    reports: list[ParityReport] = []
    check_record = {
        "tensorrt_version": trt.__version__,
        "gpu": gpu,
        "settings": {
            "version_compatible": settings.version_compatible,
            "hardware_compatibility": settings.hardware_compatibility,
        },
    }
    stage = root / f".tensorrt-build-{os.getpid()}"  # engines go into the bundle only once they pass
    try:
        with cuda_device(cudart, device):  # the builder works on the current device
            for precision in precisions:
                engines[precision] = {}
                for graph, spec in GRAPHS.items():
                    src = root / spec.file if precision == "fp32" else root / FP16_DIR / spec.file
                    out = stage / plan_name(graph, precision)
                    t0 = time.perf_counter()
                    typing[precision], cache, flags[f"{precision}/{graph}"] = build_engine(
                        src, out, profiles[graph], settings, precision=precision, timing_cache=cache
                    )
                    seconds[f"{precision}/{graph}"] = time.perf_counter() - t0
                    engines[precision][graph] = out
                    log.info(
                        "TensorRT %s %s: %.1f KiB in %.1f s",
                        precision,
                        graph,
                        out.stat().st_size / 1024,
                        seconds[f"{precision}/{graph}"],
                    )
        if settings.parity:
            for precision, table in engines.items():
                with TensorRTBackend(table, record=check_record, device=Device("cuda", device)) as backend:
                    reports.append(engine_parity(root, backend, axes, shape, precision))
            raise_if_failed(
                reports,
                hint="The TensorRT engines do not reproduce the ONNX graphs; they were not added "
                "to the bundle. Check the TensorRT log, or rebuild with other --trt-* settings.",
            )
        for precision, table in engines.items():
            for graph, staged in table.items():
                final = root / plan_name(graph, precision)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, final)
                table[graph] = final
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if cache:  # a new file replaces the cache: a hard link to it (``add_to_bundle``'s copy) is never written
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        staged_cache = cache_path.with_name(f".{cache_path.name}.tmp-{os.getpid()}")
        staged_cache.write_bytes(cache)
        os.replace(staged_cache, cache_path)
    record = engine_record(
        root,
        engines,
        profiles,
        settings,
        axes=axes,
        tensorrt_version=str(trt.__version__),
        gpu=gpu,
        typing=typing,
        builder_flags=flags,
        build_seconds=seconds,
        parity={r.precision: r.to_dict() for r in reports} or None,
    )
    if skipped:
        record["skipped_precisions"] = skipped
    return {TENSORRT_KEY: record}


def make_step(settings: TensorRTSettings | None = None, device: int = 0) -> DeploymentStep:
    """The ``--tensorrt`` deployment step of ``export_bundle``: ``step(tmp, manifest_extra) -> manifest
    entries``.

    Checks that tensorrt imports and has what the settings need before the (long) ONNX export starts.
    """
    settings = settings or TensorRTSettings()
    hardware_level(import_tensorrt(), settings.hardware_compatibility)

    def step(root: Path, extra: Mapping[str, Any]) -> dict[str, Any]:
        return build_engines(root, settings, device=device, manifest=extra)

    return step
