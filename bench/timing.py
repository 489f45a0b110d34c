"""Timing, machine and memory helpers shared by every bench section.

Every comparison goes through :func:`side_by_side`: the candidates run in
interleaved rounds (the order rotating each round) on the same inputs after a
warm-up, so a load spike from another process on this shared machine hits all
of them alike; figures are the median and p99 over the timed calls. Query
latencies run in short blocks per round (one untimed call, then several timed),
so each candidate is timed in its own steady state.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np

__all__ = [
    "cpu_pressure",
    "side_by_side",
    "stats",
    "machine_info",
    "cpu_identity",
    "cpu_identity_text",
    "versions",
    "rss_mb",
    "peak_rss_mb",
    "reset_peak_rss",
    "sgemm_fn",
    "loadavg",
]


def stats(seconds: list[float]) -> dict[str, float]:
    """Median, p99, mean and min of ``seconds`` in milliseconds, and the round count."""
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "p50_ms": float(np.median(a)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "n": int(a.size),
    }


def side_by_side(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 3,
    max_seconds: float | None = None,
    after: Mapping[str, Callable[[], Any]] | None = None,
    block: int | Mapping[str, int] = 1,
) -> dict[str, dict[str, float]]:
    """Time each zero-argument callable over ``repeats`` interleaved rounds, after ``warmup`` calls each.

    Each round runs every candidate (the order rotating round to round) ``block`` times in a
    row (an int, or per name; default 1). A candidate with a block over 1 first makes one
    untimed call, so it is timed in its own steady state (caches, thread pools) rather than
    in the state the previous candidate left: a query service runs queries back to back, not
    between full-gallery scans. ``max_seconds`` stops early (at least 3 rounds) when rounds
    are slow. ``after[name]`` runs untimed after each call of ``name``.
    Returns name -> :func:`stats`.
    """
    names = list(fns)
    blocks = {n: int(block.get(n, 1) if isinstance(block, Mapping) else block) for n in names}
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if blocks[n] > 1:
                fns[n]()  # settle: untimed
            for _ in range(blocks[n]):
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
                if after and n in after:
                    after[n]()
        if max_seconds is not None and r >= 2 and time.perf_counter() - start > max_seconds:
            break
    return {n: stats(t) for n, t in times.items()}


def sgemm_fn(n: int = 2048) -> tuple[Callable[[], Any], float]:
    """A numpy float32 ``n x n x n`` matmul and its FLOP count (``2 n^3``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    return (lambda: np.matmul(a, b, out=out)), 2.0 * n**3


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def cpu_pressure() -> str:
    """Linux PSI line for CPU ("some avg10=.. avg60=.. avg300=..": % of time some task waited for a core)."""
    try:
        with open("/proc/pressure/cpu", encoding="utf-8") as f:
            return " ".join(f.readline().split()[:4])
    except OSError:
        return ""


def _first_cpu(cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's ``key: value`` fields of ``cpuinfo`` (none where it cannot be read)."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block ends
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_model() -> str:
    return _first_cpu().get("model name") or platform.processor() or platform.machine()


# CPU extensions the int8 and float32 kernels of a query depend on, as /proc/cpuinfo names them: runs on
# hosts of one "model name" with different extensions are not comparable (u8 x s8 products are ~3x faster
# with VNNI)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_identity(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU's family/model numbers (``""`` where unknown) and which of :data:`ISA_FLAGS` it has
    (``cpu_isa``, left out where the CPU lists no x86 ``flags``: unknown, not absent)."""
    fields = _first_cpu(cpuinfo)
    flags = set(fields.get("flags", "").split())
    out: dict[str, Any] = {
        "cpu_family_model": (
            f"family {fields['cpu family']} model {fields['model']}"
            if "cpu family" in fields and "model" in fields
            else ""
        ),
    }
    if "flags" in fields:
        out["cpu_isa"] = [f for f in ISA_FLAGS if f in flags]
    return out


def cpu_identity_text(m: dict[str, Any]) -> str:
    """`` (family 23 model 49; AVX2, FMA; no AVX-512, no VNNI)`` from a ``machine_info`` (empty for a run
    recorded without it)."""
    if "cpu_isa" not in m:
        return ""
    isa = set(m["cpu_isa"])
    has = ", ".join(f.upper().replace("_", "-") for f in m["cpu_isa"]) or "none of the listed extensions"
    lacks = [
        name
        for name, flags in (("AVX-512", {"avx512f"}), ("VNNI", {"avx512_vnni", "avx_vnni"}))
        if not isa & flags
    ]
    parts = [p for p in (m.get("cpu_family_model", ""), has) if p]
    return f" ({'; '.join(parts)}{'; no ' + ', no '.join(lacks) if lacks else ''})"


def machine_info() -> dict[str, Any]:
    """Cores (logical, usable by this process), CPU model and extensions, memory, load."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        usable = os.cpu_count() or 1
    mem_gb = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "cpu_model": _cpu_model(),
        **cpu_identity(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "loadavg_start": loadavg(),
        "cpu_pressure_start": cpu_pressure(),
    }


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "numpy": np.__version__}
    for mod in ("torch", "onnxruntime", "onnx", "faiss", "matplotlib"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except ImportError:
            out[mod] = "absent"
    return out


def _proc_status_mb(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB; None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    now = _proc_status_mb("VmRSS")
    return peak_rss_mb() if now is None else now


def peak_rss_mb() -> float:
    """Peak resident set size of this process since the last :func:`reset_peak_rss` (MB)."""
    hwm = _proc_status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 if hwm is None else hwm


def reset_peak_rss() -> None:
    """Reset this process's peak resident set size (Linux >= 4.0; nothing elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
    except OSError:
        pass


def numpy_blas_setter() -> Callable[[int], None]:
    """A fast setter of numpy's BLAS thread count (threadpoolctl); a no-op without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return lambda n: None
    libs = [
        lc
        for lc in ThreadpoolController().lib_controllers
        if lc.internal_api in ("openblas", "mkl", "blis") and "numpy" in str(lc.filepath)
    ]

    def set_threads(n: int) -> None:
        for lc in libs:
            lc.set_num_threads(n)

    return set_threads
