"""The contract every backend honours (Polygraphy-runner style), and the numpy helpers all backends share.

A backend runs the bundle's graphs by name on numpy feeds and returns numpy
outputs. :class:`Backend` is an abstract base class: its public :meth:`Backend.run`
checks the feeds ONCE against the graph spec (names, rank, dtype, the fixed
sizes the loaded graph declares, one size per named axis), splits them into
chunks where the backend's per-call limits (:meth:`Backend.limits`) ask for it,
calls the subclass's ``_run`` on each chunk, and checks what comes back (every
output of the spec, float32, shapes consistent with the inputs). The runtime's own
calls, on feeds it built from a query it checked once, go through
:meth:`Backend.run_prepared`, which a backend may run without those checks. So a wrong rank
or a wrong feature size is the same :class:`InputError` on ONNX Runtime, TensorRT
and Triton, and never reaches a runtime raw.

A backend has a typed :class:`Device` (one parser, :func:`parse_device`, for every
backend), lists its ``graphs``, is a context manager, and ``close()`` is idempotent;
``run`` after ``close`` is an error.

``split_axes`` / ``axis_sizes`` / ``run_chunked`` are plain numpy: they split a call
along the batch-like axes (``B`` of the encoders, ``Ni``/``Nt`` of the scorer) and
concatenate the outputs; an axis that cannot be split (``R``, ``L``) past its limit is
an ``InputError`` naming the flag that rebuilds the engines.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import threading
from types import TracebackType
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from mssan_infer.errors import BundleError, InputError, MssanError
from mssan_infer.options import Device, parse_device
from mssan_infer.spec import FIXED_AXES, GRAPHS, OPTIONAL_GRAPHS, QUERY_SCORERS, GraphSpec

__all__ = [
    "Backend",
    "ALL_GRAPHS",
    "check_feeds",
    "declared_dims",
    "split_axes",
    "axis_sizes",
    "run_chunked",
    "RunFn",
    "one_thread",
    "in_one_thread",
]

ALL_GRAPHS: dict[str, GraphSpec] = {**GRAPHS, **OPTIONAL_GRAPHS, **QUERY_SCORERS}
RunFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
_HINT = threading.local()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Graph runs of this thread inside the block use one intra-op thread where the backend can (ONNX
    Runtime's query scorers): the caller runs several of them at once, a thread each (a rerank cut into
    shares, ``mssan_infer.search.rerank_scores``)."""
    before = getattr(_HINT, "one", False)
    _HINT.one = True
    try:
        yield
    finally:
        _HINT.one = before


def in_one_thread() -> bool:
    """Whether this thread is inside :func:`one_thread`."""
    return bool(getattr(_HINT, "one", False))


# ---- feeds -------------------------------------------------------------------------------------
def declared_dims(spec: GraphSpec, shapes: Mapping[str, Sequence[Any]], where: str) -> dict[str, int]:
    """The fixed-axis sizes (``D``, ``D2``, ``Dv``, ``C``) a loaded graph declares for its inputs.

    Args:
        spec: the graph.
        shapes: ``{input: declared shape}`` as the runtime reports it; an entry that is not a
            positive int (``-1``, ``None``, a symbol name) is dynamic. Inputs may be missing.
        where: names the file/model in messages.
    Raises:
        BundleError: an input of another rank than the spec's, or one fixed axis with two sizes.
    """
    dims: dict[str, int] = {}
    for t in spec.inputs:
        if t.name not in shapes:
            continue
        shape = list(shapes[t.name])
        if len(shape) != len(t.axes):
            raise BundleError(
                f"{where}: input {t.name} has rank {len(shape)} {shape}, the spec says "
                f"[{', '.join(t.axes)}]; "
                "re-export the bundle with this mssan version"
            )
        for axis, d in zip(t.axes, shape):
            if axis in FIXED_AXES and isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0:
                if dims.setdefault(axis, int(d)) != int(d):
                    raise BundleError(
                        f"{where}: axis {axis} is {dims[axis]} in one input and {d} in {t.name}"
                    )
    return dims


def check_feeds(spec: GraphSpec, feeds: Mapping[str, Any], dims: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Feeds of ``spec`` checked and converted: C-contiguous arrays of the spec's dtypes.

    Checks: exactly the spec's input names; each input's rank; numbers only (float inputs take
    any real or integer array, int64 inputs integer arrays only); the fixed axes against
    ``dims`` (what the loaded graph declares); and one size per named axis across inputs.

    Raises:
        InputError: saying which input is wrong and what was expected.
    """
    if not isinstance(feeds, Mapping):
        raise InputError(
            f"feeds of {spec.name!r} must be a mapping of input name -> array, got {type(feeds).__name__}"
        )
    if set(feeds) != set(spec.input_names):
        raise InputError(f"graph {spec.name!r} takes inputs {sorted(spec.input_names)}, got {sorted(feeds)}")
    out: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[int, str]] = {}
    for t in spec.inputs:
        a = np.asarray(feeds[t.name])
        where = f"{spec.name}.{t.name}"
        if a.ndim != len(t.axes):
            raise InputError(
                f"{where} must be [{', '.join(t.axes)}] (rank {len(t.axes)}), got shape {a.shape}"
            )
        kind = a.dtype.kind
        if t.dtype == "int64" and kind not in "iu":
            raise InputError(f"{where} must hold integer token ids (int64), got dtype {a.dtype}")
        if t.dtype == "uint8" and a.dtype != np.uint8:
            raise InputError(f"{where} must hold the int8 layout's stored codes (uint8), got dtype {a.dtype}")
        if kind not in "biuf":
            raise InputError(f"{where} must hold real numbers ({t.dtype}), got dtype {a.dtype}")
        for axis, n in zip(t.axes, a.shape):
            if axis in dims and n != dims[axis]:
                raise InputError(
                    f"{where}: axis {axis} must be {dims[axis]} for this bundle, got {n} (shape {a.shape})"
                )
            first = sizes.setdefault(axis, (int(n), t.name))
            if first[0] != n:
                raise InputError(f"{spec.name}: axis {axis} is {first[0]} in {first[1]} and {n} in {t.name}")
        out[t.name] = np.ascontiguousarray(a, dtype=np.dtype(t.dtype))
    return out


# ---- chunking along batch-like axes -------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def split_axes(spec: GraphSpec) -> dict[str, tuple[dict[str, int], dict[str, int]]]:
    """Axes a graph's inputs can be split along, and where each output concatenates.

    An axis is splittable when every input carrying it carries it at position 0 and every
    output carries it at most once (``B`` of the encoders, ``Ni`` and ``Nt`` of the scorer).
    Returns ``{axis: ({input: 0}, {output: position})}``.
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
    """The size of every axis in ``feeds``.

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
                raise InputError(
                    f"{spec.name}: axis {axis} is {sizes[axis]} in one input and {n} in {t.name}"
                )
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
    if not limits:  # nothing to split (ONNX Runtime): one call
        return run(feeds)
    splittable = split_axes(spec)
    for axis, n in sizes.items():
        lim = limits.get(axis)
        if lim is not None and n > lim and axis not in splittable:
            raise InputError(
                f"{spec.name}: axis {axis} is {n}, above the engine's profile maximum {lim}; rebuild the "
                "engines "
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
            name: (
                np.concatenate([p[name] for p in parts], axis=outs[name]) if name in outs else parts[0][name]
            )
            for name in parts[0]
        }
    return run(feeds)


# ---- the contract ----------------------------------------------------------------------------------
class Backend(abc.ABC):
    """Runs the bundle's graphs ("image_encoder", "text_encoder", "scorer", and the optional
    "image_encoder_pixels") by name.

    Feeds and outputs follow :mod:`mssan_infer.spec`: inputs keyed by the spec's input names
    (float inputs become float32, token ids int64), outputs float32 keyed by the spec's output
    names, whatever precision the backend computes in. ``run`` is safe to call from several
    threads at once.

    Subclasses call ``super().__init__(device)``, register each graph they hold with
    :meth:`_add_graph` (with the fixed sizes the loaded graph declares), implement ``_run``
    (one call within ``limits``) and ``_close``, and override :meth:`limits` when one call has
    a largest size per axis (TensorRT profiles, Triton's ``max_batch_size``).
    """

    name: str = "backend"

    def __init__(self, device: str | Device = "cpu") -> None:
        self.device: Device = parse_device(device)
        self._graphs: dict[str, GraphSpec] = {}
        self._dims: dict[str, dict[str, int]] = {}
        self._closed = False

    # -- what subclasses provide ------------------------------------------------------------------
    def _add_graph(self, graph: str, dims: Mapping[str, int] | None = None) -> GraphSpec:
        """Register ``graph`` (a name of ``ALL_GRAPHS``) with its declared fixed-axis sizes.

        Raises:
            BundleError: an unknown graph name.
        """
        spec = ALL_GRAPHS.get(graph)
        if spec is None:
            raise BundleError(f"unknown graph {graph!r}; graphs are {sorted(ALL_GRAPHS)}")
        self._graphs[graph] = spec
        self._dims[graph] = dict(dims or {})
        return spec

    @abc.abstractmethod
    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``graph`` once on checked feeds (within :meth:`limits`); return its outputs by name."""

    def _close(self) -> None:
        """Release sessions/engines/connections (called once by :meth:`close`)."""

    # -- the public contract -------------------------------------------------------------------------
    @property
    def graphs(self) -> list[str]:
        """Names of the graphs this backend runs."""
        return sorted(self._graphs)

    def spec(self, graph: str) -> GraphSpec:
        """The spec of ``graph``.

        Raises:
            InputError: a graph this backend does not have.
        """
        try:
            return self._graphs[graph]
        except (KeyError, TypeError):
            raise InputError(f"unknown graph {graph!r}; this backend has {self.graphs}") from None

    def fixed_dims(self, graph: str) -> dict[str, int]:
        """The fixed-axis sizes (``D``, ``D2``, ``Dv``, ``C``) the loaded ``graph`` declares (checked on
        every run)."""
        self.spec(graph)
        return dict(self._dims[graph])

    def limits(self, graph: str) -> dict[str, int]:
        """Largest size of each axis one ``_run`` call accepts (none by default)."""
        return {}

    def run(self, graph: str, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run ``graph`` on ``feeds``; returns every output of the graph by name, float32.

        Raises:
            InputError: unknown graph, feeds that do not match its inputs, or an unsplittable
                axis (``R``, ``L``) beyond the backend's limit.
            MssanError: the backend is closed, or returned outputs that break the contract.
        """
        if self._closed:
            raise MssanError(f"this {self.name} backend is closed")
        spec = self.spec(graph)
        checked = check_feeds(spec, feeds, self._dims[graph])
        return run_chunked(spec, checked, self.limits(graph), lambda f: self._checked_outputs(spec, f))

    def run_prepared(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``graph`` on feeds the runtime built itself, from a query and gallery rows it checked where
        they came in (the retriever's encoder and scorer calls): what :meth:`run` does, less the checks a
        backend can leave out. Here: all of :meth:`run`; ONNX Runtime runs its session straight away."""
        return self.run(graph, feeds)

    def _checked_outputs(self, spec: GraphSpec, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._run(spec.name, feeds)
        sizes = {**self._dims[spec.name], **axis_sizes(spec, feeds)}
        result: dict[str, np.ndarray] = {}
        for t in spec.outputs:
            a = outs.get(t.name)
            if not isinstance(a, np.ndarray):
                raise MssanError(f"{self.name} backend returned no array for {spec.name}.{t.name}")
            want = [sizes.get(axis) for axis in t.axes]
            if a.ndim != len(want) or any(w is not None and w != n for w, n in zip(want, a.shape)):
                raise MssanError(
                    f"{self.name} backend returned {spec.name}.{t.name} of shape {a.shape}, expected "
                    f"[{', '.join(f'{x}={w}' if w is not None else x for x, w in zip(t.axes, want))}]"
                )
            if a.dtype != np.dtype(t.dtype):
                raise MssanError(
                    f"{self.name} backend returned {spec.name}.{t.name} as {a.dtype}, not {t.dtype}"
                )
            result[t.name] = a
        return result

    def close(self) -> None:
        """Release sessions/engines/connections. Idempotent."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> "Backend":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={str(self.device)!r}, graphs={self.graphs})"
