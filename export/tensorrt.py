"""TensorRT engines from the bundle's ONNX graphs (``python -m export ... --tensorrt``).

One engine per graph and precision, ``tensorrt/<graph>.plan`` (fp32) and
``tensorrt/<graph>.fp16.plan`` (from the ``fp16/`` ONNX variants), each with
``profiles`` identical optimisation profiles (one per concurrent execution
context) whose min/opt/max shapes come from the graph specs
(``mssan_infer.spec.DEFAULT_PROFILES``, overridable per axis).

Precision: networks are strongly typed. TensorRT 11 has no precision builder
flags (strong typing is always on); on TensorRT 10 the network is created with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``. Either way fp16 comes from the
fp16 ONNX graphs, which keep softmax, norms and reductions in fp32.
``typing="weak"`` (TensorRT 10 only) instead builds the fp16 engines weakly
typed with ``BuilderFlag.FP16``, letting TensorRT pick layer precisions.

The build is followed by a parity check of every engine against ONNX Runtime
(fp32 graphs) on inputs made from the bundle itself, at the tolerances of
``TOLERANCES[precision]``, and the manifest records the TensorRT version, the
GPU, the settings, the profiles and the parity results.

Only the pure parts (profile derivation, settings, manifest records) run
without TensorRT; building and running engines needs ``tensorrt``, cuda-python
and an NVIDIA GPU.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mssan_infer.backends.tensorrt import MANIFEST_KEY, gpu_info, import_tensorrt, plan_name
from mssan_infer.errors import ParityError
from mssan_infer.spec import DEFAULT_PROFILES, FIXED_AXES, GRAPHS, TOLERANCES, GraphSpec, sha256_file

from .errors import ExportError
from .manifest import FP16_DIR

__all__ = [
    "TensorRTSettings",
    "HARDWARE_COMPATIBILITY",
    "TYPING",
    "resolve_axes",
    "axes_for",
    "parse_profile_override",
    "derive_profiles",
    "profile_record",
    "engine_record",
    "build_engine",
    "build_engines",
    "check_engine_parity",
    "bundle_dims",
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
        precisions: which graphs to build from: ``("fp32",)``, or with ``"fp16"`` (needs an ``--fp16`` export).
        num_profiles: identical optimisation profiles per engine = concurrent execution contexts.
        workspace_mib: builder workspace memory pool limit.
        timing_cache: a timing cache file to read and update (default: ``tensorrt/timing.cache`` in the bundle).
        version_compatible: ``BuilderFlag.VERSION_COMPATIBLE`` (engines load in later TensorRT versions).
        hardware_compatibility: ``"none"``, ``"ampere_plus"`` or ``"same_compute_capability"``.
        optimization_level: builder optimisation level 0-5 (None: TensorRT's default, 3).
        typing: ``"auto"``/``"strong"`` strongly typed; ``"weak"`` weak typing + ``BuilderFlag.FP16`` (TensorRT 10).
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
            raise ExportError(f"TensorRT precisions must be a non-empty subset of ('fp32', 'fp16'), got {self.precisions}")
        if not isinstance(self.num_profiles, int) or not 1 <= self.num_profiles <= 16:
            raise ExportError(f"num_profiles must be an int in 1..16, got {self.num_profiles!r}")
        if not isinstance(self.workspace_mib, int) or self.workspace_mib < 16:
            raise ExportError(f"workspace_mib must be an int >= 16, got {self.workspace_mib!r}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise ExportError(f"hardware_compatibility must be one of {HARDWARE_COMPATIBILITY}, got {self.hardware_compatibility!r}")
        if self.optimization_level is not None and self.optimization_level not in range(6):
            raise ExportError(f"optimization_level must be 0..5 or None, got {self.optimization_level!r}")
        if self.typing not in TYPING:
            raise ExportError(f"typing must be one of {TYPING}, got {self.typing!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profiles"] = {k: list(v) for k, v in resolve_axes(self.profiles).items()}
        d["precisions"] = list(self.precisions)
        return d


# ---- profiles (pure) -----------------------------------------------------------------
def resolve_axes(overrides: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, int, int]]:
    """``DEFAULT_PROFILES`` with ``overrides`` applied, checked: ``1 <= min <= opt <= max``.

    Raises:
        ExportError: an unknown axis, a fixed axis (D, D2, Dv) or an inconsistent triple.
    """
    axes = dict(DEFAULT_PROFILES)
    for axis, triple in (overrides or {}).items():
        if axis in FIXED_AXES:
            raise ExportError(f"axis {axis} is fixed by the model config; only {sorted(DEFAULT_PROFILES)} have profiles")
        if axis not in DEFAULT_PROFILES:
            raise ExportError(f"unknown profile axis {axis!r}; choose from {sorted(DEFAULT_PROFILES)}")
        try:
            mn, opt, mx = (int(x) for x in triple)
        except (TypeError, ValueError):
            raise ExportError(f"profile of {axis} must be three integers (min, opt, max), got {triple!r}") from None
        if not 1 <= mn <= opt <= mx:
            raise ExportError(f"profile of {axis} must satisfy 1 <= min <= opt <= max, got {(mn, opt, mx)}")
        axes[axis] = (mn, opt, mx)
    return axes


def axes_for(settings: "TensorRTSettings", max_len: int | None = None) -> dict[str, tuple[int, int, int]]:
    """The profile ranges of an engine build: ``settings.profiles`` over ``DEFAULT_PROFILES``, with the
    text length ``L`` running up to the model's ``max_len`` (tokens per caption after truncation)
    unless ``settings`` overrides ``L``."""
    overrides = dict(settings.profiles)
    if max_len is not None and "L" not in overrides:
        lo, opt, _ = DEFAULT_PROFILES["L"]
        overrides["L"] = (lo, max(lo, min(opt, int(max_len))), max(lo, int(max_len)))
    return resolve_axes(overrides)


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


def engine_record(
    root: Path,
    engines: Mapping[str, Mapping[str, Path]],
    profiles: Mapping[str, Mapping[str, tuple[Shape, Shape, Shape]]],
    settings: TensorRTSettings,
    *,
    tensorrt_version: str,
    gpu: Mapping[str, Any] | None,
    typing: Mapping[str, str],
    build_seconds: Mapping[str, float] | None = None,
    parity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest's ``tensorrt`` entry.

    Args:
        root: the bundle folder (engine paths are recorded relative to it, with sha256).
        engines: ``{precision: {graph: plan path}}``.
        profiles: ``{graph: derive_profiles(...)}``.
        typing: ``{precision: "strong" | "weak"}`` as actually built.
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
                "profiles": settings.num_profiles,
                "profile_shapes": profile_record(profiles[graph]),
                "build_seconds": round(float((build_seconds or {}).get(f"{precision}/{graph}", 0.0)), 2),
            }
    record: dict[str, Any] = {
        "tensorrt_version": tensorrt_version,
        "gpu": dict(gpu) if gpu else None,
        "settings": settings.to_dict(),
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


def build_engine(
    onnx_path: Path,
    out: Path,
    profiles: Mapping[str, tuple[Shape, Shape, Shape]],
    settings: TensorRTSettings,
    *,
    precision: str,
    timing_cache: bytes | None = None,
) -> tuple[str, bytes | None]:
    """Build and write one serialized engine.

    Returns:
        ``(typing used, updated timing cache bytes)``.
    Raises:
        BackendUnavailableError: tensorrt missing.
        ExportError: the ONNX parser or the builder failed.
    """
    trt = import_tensorrt()
    typing = _resolved_typing(trt, settings.typing) if precision == "fp16" else "strong"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    flag_enum = trt.NetworkDefinitionCreationFlag
    if typing == "strong" and _major(trt.__version__) < 11 and hasattr(flag_enum, "STRONGLY_TYPED"):
        flags |= 1 << int(flag_enum.STRONGLY_TYPED)      # TensorRT 11: always strongly typed, flag deprecated
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path.name}: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    if typing == "weak":
        config.set_flag(trt.BuilderFlag.FP16)
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if settings.hardware_compatibility != "none":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, settings.hardware_compatibility.upper())
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
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT log above)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(plan))
    os.replace(tmp, out)
    new_cache = config.get_timing_cache()
    return typing, (bytes(memoryview(new_cache.serialize())) if new_cache is not None else timing_cache)


def _random_feeds(spec: GraphSpec, sizes: Mapping[str, int], dims: Mapping[str, int], vocab: int,
                  rng: np.random.Generator, fill: float) -> dict[str, np.ndarray]:
    """Encoder inputs with padding: the first item full length, the others ``fill`` of it (at least 1)."""
    feeds: dict[str, np.ndarray] = {}
    all_sizes = {**sizes, **dims}
    for t in spec.inputs:
        shape = t.shape(all_sizes)
        if t.dtype == "int64":
            feeds[t.name] = rng.integers(4, max(5, vocab), size=shape, dtype=np.int64)
        elif t.name.endswith("mask"):
            n, p = shape
            lengths = np.maximum(1, (np.arange(n) % 3 == 0) * p + (np.arange(n) % 3 != 0) * int(p * fill))
            lengths[0] = p
            feeds[t.name] = (np.arange(p)[None, :] < lengths[:, None]).astype(np.float32)
        else:
            feeds[t.name] = np.abs(rng.standard_normal(shape)).astype(np.float32)
    return feeds


def check_engine_parity(
    root: Path,
    run_engine: Mapping[str, Any],
    axes: Mapping[str, tuple[int, int, int]],
    dims: Mapping[str, int],
    vocab_size: int,
    precision: str,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare engines with ONNX Runtime (the fp32 graphs) on inputs at the profile's min/opt/max shapes.

    Args:
        root: bundle folder (its fp32 ``*.onnx`` are the reference).
        run_engine: ``{graph: callable(feeds) -> outputs}`` running the engine.
        axes, dims: profile ranges and fixed sizes.
        precision: selects ``TOLERANCES[precision]``.
    Returns:
        ``{"tolerance": atol, "max_abs": {graph: worst}, "cases": [...], "failures": [...], "passed": bool}``.
    """
    import onnxruntime as ort

    tol = TOLERANCES[precision]
    rng = np.random.default_rng(seed)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = {g: ort.InferenceSession(str(root / spec.file), opts, providers=["CPUExecutionProvider"])
                for g, spec in GRAPHS.items()}
    cases: list[dict[str, Any]] = []
    failures: list[str] = []
    worst: dict[str, float] = {}
    picks = {"min": 0, "opt": 1, "max": 2}
    for label, i in picks.items():
        sizes = {a: int(axes[a][i]) for a in axes}
        # keep the reference run affordable: cap the largest case per axis
        sizes = {a: min(n, 64) if label == "max" and a in ("B", "Ni", "Nt") else n for a, n in sizes.items()}
        fill = 0.5 if label != "min" else 1.0
        enc_sizes = {"B": sizes["B"], "R": sizes["R"], "L": sizes["L"]}
        img = _random_feeds(GRAPHS["image_encoder"], enc_sizes, dims, vocab_size, rng, fill)
        txt = _random_feeds(GRAPHS["text_encoder"], enc_sizes, dims, vocab_size, rng, fill)
        ref_img = dict(zip(GRAPHS["image_encoder"].output_names, sessions["image_encoder"].run(None, img)))
        ref_txt = dict(zip(GRAPHS["text_encoder"].output_names, sessions["text_encoder"].run(None, txt)))
        ni, nt = min(sizes["Ni"], sizes["B"]), min(sizes["Nt"], sizes["B"])
        sc = {"img_local": ref_img["img_local"][:ni], "region_mask": img["region_mask"][:ni],
              "img_gram": ref_img["img_gram"][:ni], "txt_local": ref_txt["txt_local"][:nt],
              "token_mask": txt["token_mask"][:nt], "txt_gram": ref_txt["txt_gram"][:nt]}
        ref_sc = dict(zip(GRAPHS["scorer"].output_names, sessions["scorer"].run(None, sc)))
        for graph, feeds, ref in (("image_encoder", img, ref_img), ("text_encoder", txt, ref_txt), ("scorer", sc, ref_sc)):
            name = f"{graph}[{label} {','.join(f'{k}{v.shape}' for k, v in feeds.items())}]"
            try:
                got = run_engine[graph](feeds)
            except Exception as e:  # TensorRT raises many types
                failures.append(f"{name}: engine failed: {e}")
                continue
            for out, want in ref.items():
                g = np.asarray(got.get(out))
                if g.shape != want.shape:
                    failures.append(f"{name} {out}: shape {g.shape} != ONNX Runtime {want.shape}")
                    continue
                if not np.isfinite(g).all():
                    failures.append(f"{name} {out}: NaN/inf in the engine output")
                    continue
                diff = float(np.max(np.abs(g.astype(np.float64) - want))) if want.size else 0.0
                worst[graph] = max(worst.get(graph, 0.0), diff)
                cases.append({"case": name, "output": out, "max_abs": diff})
                if diff > tol.atol:
                    failures.append(f"{name} {out}: max abs diff {diff:.3g} > atol {tol.atol:g}")
    return {"precision": precision, "reference": "onnxruntime CPU, fp32 graphs", "tolerance": tol.atol,
            "max_abs": worst, "cases": cases, "failures": failures, "passed": not failures}


def build_engines(
    root: Path,
    settings: TensorRTSettings | None = None,
    *,
    device: int = 0,
    max_len: int | None = None,
) -> dict[str, Any]:
    """Build every engine of the bundle (being built) in ``root`` and check them against ONNX Runtime.

    ``max_len``: the model's tokenizer truncation; the ``L`` profile runs up to it (``axes_for``).

    Returns:
        ``{"tensorrt": record}`` to merge into the manifest.
    Raises:
        BackendUnavailableError: tensorrt, cuda-python or a GPU missing.
        ExportError: a build failed, or fp16 engines asked without fp16 ONNX graphs.
        ParityError: an engine disagrees with ONNX Runtime past tolerance.
    """
    settings = settings or TensorRTSettings()
    trt = import_tensorrt()
    from mssan_infer.backends.tensorrt import TensorRTBackend

    gpu = gpu_info(device)
    dims, vocab_size = bundle_dims(root)
    axes = axes_for(settings, max_len)
    profiles = {g: derive_profiles(spec, dims, axes) for g, spec in GRAPHS.items()}
    precisions = [p for p in settings.precisions if p == "fp32" or (root / FP16_DIR / "scorer.onnx").is_file()]
    skipped = [p for p in settings.precisions if p not in precisions]
    for p in skipped:
        log.warning("no fp16 ONNX graphs in the bundle (export with --fp16): %s TensorRT engines not built", p)
    cache_path = Path(settings.timing_cache) if settings.timing_cache else root / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else None
    engines: dict[str, dict[str, Path]] = {}
    typing: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for precision in precisions:
        engines[precision] = {}
        for graph, spec in GRAPHS.items():
            src = root / spec.file if precision == "fp32" else root / FP16_DIR / spec.file
            out = root / plan_name(graph, precision)
            t0 = time.perf_counter()
            typing[precision], cache = build_engine(src, out, profiles[graph], settings, precision=precision, timing_cache=cache)
            seconds[f"{precision}/{graph}"] = time.perf_counter() - t0
            engines[precision][graph] = out
            log.info("TensorRT %s %s: %.1f KiB in %.1f s", precision, graph, out.stat().st_size / 1024,
                     seconds[f"{precision}/{graph}"])
    if cache:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(cache)
    parity: dict[str, Any] = {}
    record_settings = {"version_compatible": settings.version_compatible,
                       "hardware_compatibility": settings.hardware_compatibility}
    if settings.parity:
        for precision, table in engines.items():
            backend = TensorRTBackend(table, record={"tensorrt_version": trt.__version__, "gpu": gpu,
                                                     "settings": record_settings}, device=device)
            try:
                runners = {g: (lambda feeds, g=g: backend.run(g, feeds)) for g in GRAPHS}
                parity[precision] = check_engine_parity(root, runners, axes, dims, vocab_size, precision)
            finally:
                backend.close()
        failed = [f"[tensorrt {p}] {f}" for p, r in parity.items() for f in r["failures"]]
        if failed:
            raise ParityError(
                f"{len(failed)} TensorRT parity check(s) failed against ONNX Runtime:\n  " + "\n  ".join(failed[:20])
                + "\nThe engines were not added to the bundle."
            )
    record = engine_record(root, engines, profiles, settings, tensorrt_version=str(trt.__version__), gpu=gpu,
                           typing=typing, build_seconds=seconds, parity=parity or None)
    if skipped:
        record["skipped_precisions"] = skipped
    return {MANIFEST_KEY: record}


def bundle_dims(root: Path) -> tuple[dict[str, int], int]:
    """``({"D", "D2", "Dv"}, vocabulary size)`` of the bundle (finished or under construction) in ``root``.

    Read from the fp32 graphs' declared shapes and ``vocab.json``, so a deployment step
    needs nothing but the folder.
    """
    import json

    import onnx

    def last_dim(path: Path, name: str, inputs: bool) -> int:
        g = onnx.load(str(path), load_external_data=False).graph
        for v in (g.input if inputs else g.output):
            if v.name == name:
                d = v.type.tensor_type.shape.dim[-1]
                if d.HasField("dim_value"):
                    return int(d.dim_value)
        raise ExportError(f"{path.name}: {name} has no fixed last dimension; re-export the bundle")

    dv = last_dim(root / GRAPHS["image_encoder"].file, "regions", True)
    d = last_dim(root / GRAPHS["image_encoder"].file, "img_local", False)
    vocab_path = root / "vocab.json"
    vocab = len(json.loads(vocab_path.read_text(encoding="utf-8"))) if vocab_path.is_file() else 5
    if not vocab_path.is_file() and (root / "tokenizer.json").is_file():       # a transformer tower's subwords
        from mssan_infer.subword import SubwordTokenizer

        vocab = len(SubwordTokenizer.from_file(root / "tokenizer.json"))
    return {"D": d, "D2": 2 * d, "Dv": dv}, vocab


def make_step(settings: TensorRTSettings | None = None, device: int = 0) -> Any:
    """The ``--tensorrt`` deployment step of ``export_bundle``: ``step(tmp, manifest_extra) -> manifest entries``.

    Checks that tensorrt imports before the (long) ONNX export starts.
    """
    import_tensorrt()
    settings = settings or TensorRTSettings()

    def step(root: Path, extra: Mapping[str, Any]) -> dict[str, Any]:
        return build_engines(root, settings, device=device, max_len=(extra.get("model_config") or {}).get("max_len"))

    return step
