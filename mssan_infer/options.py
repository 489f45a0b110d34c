"""Typed, validated options of :meth:`mssan_infer.Retriever.load`, each documented once here.

- :class:`GalleryOptions` (with :class:`Stage1Options`): how an in-memory gallery stores and scans items.
- :class:`SearchOptions`: encoder batches, scorer batches and candidate-gathering threads.
- :class:`BackendOptions` and its subclasses :class:`OnnxRuntimeOptions`, :class:`TensorRTOptions`,
  :class:`TritonOptions`: where and how the graphs run.

Every option object checks its values when it is made and raises :class:`~mssan_infer.errors.InputError`
naming the field. Qdrant galleries take :class:`~mssan_infer.qdrant.options.QdrantOptions` instead.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from mssan_infer.errors import InputError
from mssan_infer.gallery.stage1 import STAGE1_METHODS
from mssan_infer.gallery.storage import LAYOUTS, Layout
from mssan_infer.spec import PRECISIONS

__all__ = [
    "Stage1Options",
    "GalleryOptions",
    "SearchOptions",
    "BackendOptions",
    "OnnxRuntimeOptions",
    "TensorRTOptions",
    "TritonOptions",
    "Device",
    "parse_device",
    "OPT_LEVELS",
    "fast_path",
]

OPT_LEVELS = ("disable", "basic", "extended", "all")  # ONNX Runtime graph optimisation levels
DEVICE_KINDS = ("cpu", "cuda")


class Device(str):
    """Where a backend computes: ``Device("cpu")`` or ``Device("cuda", N)``, with ``kind`` and ``ordinal``.

    A ``str`` subclass whose value is the canonical ``"cpu"`` / ``"cuda:N"``, so code that
    passes a device on as text (to ONNX Runtime, to logs) keeps working. ``ordinal`` is the
    CUDA device ordinal (``cudaSetDevice``'s argument).
    """

    __slots__ = ()

    def __new__(cls, kind: str, ordinal: int = 0) -> "Device":
        if (
            kind not in DEVICE_KINDS
            or not isinstance(ordinal, int)
            or isinstance(ordinal, bool)
            or ordinal < 0
            or (kind == "cpu" and ordinal)
        ):
            raise InputError(f"device must be 'cpu' or 'cuda[:N]', got kind {kind!r} ordinal {ordinal!r}")
        return super().__new__(cls, "cpu" if kind == "cpu" else f"cuda:{ordinal}")

    def __getnewargs__(self) -> tuple[str, int]:  # type: ignore[override]
        return self.kind, self.ordinal

    @property
    def kind(self) -> str:
        return self.partition(":")[0]

    @property
    def ordinal(self) -> int:
        return int(self.partition(":")[2] or 0)

    def __repr__(self) -> str:
        return f"Device({str(self)!r})"


def parse_device(device: str | Device) -> Device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (any case) as a :class:`Device`.

    Raises:
        InputError: anything else (``"gpu"``, ``"cuda:x"``, ``"cpu:0"``, an int...).
    """
    if isinstance(device, Device):
        return device
    if not isinstance(device, str):
        raise InputError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    kind, sep, idx = device.strip().lower().partition(":")
    if kind not in DEVICE_KINDS or (sep and not idx.isdigit()) or (kind == "cpu" and sep):
        raise InputError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return Device(kind, int(idx or 0))


def _positive(name: str, v: Any, *, optional: bool = False) -> None:
    if optional and v is None:
        return
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise InputError(f"{name} must be a positive int{' or None' if optional else ''}, got {v!r}")


def _flag(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise InputError(f"{name} must be True or False, got {v!r}")


def _seconds(name: str, v: Any, *, zero: bool = False) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (v == 0 and not zero):
        raise InputError(
            f"{name} must be a {'non-negative' if zero else 'positive'} number of seconds, got {v!r}"
        )


@dataclass(frozen=True)
class Stage1Options:
    """How stage 1 finds the candidates of a query in an in-memory gallery.

    Attributes:
        method: one of :data:`~mssan_infer.gallery.stage1.STAGE1_METHODS`: ``"numpy"`` (exact, default)
            or ``"faiss-ivf"`` (FAISS IndexIVFFlat: approximate, measure its recall); float32 stage-1
            layouts only.
        nlist, nprobe: IVF lists (default ``4 sqrt(n)``, at least 39 items per list) and lists probed
            (default ``min(nlist, 16)``).
        overfetch: a compressed stage 1 (``int8-stage1``, ``int8`` layouts) fetches ``overfetch x k``
            rows (at least ``k + 32``) by their compressed scores, then rescores them exactly and keeps
            the best ``k``; default (``None``): 2 up to 50,000 items, 4 beyond. Past ``2k`` rows it
            rescores best first and stops once the error bound proves that no row left can enter them.
        certify: a compressed stage 1 also proves, with a bound on the compression error, that no
            unfetched item beats the ``k``-th, fetching 4x more until it does: exactly the float32 top k.
    """

    method: str = "numpy"
    nlist: int | None = None
    nprobe: int | None = None
    overfetch: int | None = None
    certify: bool = False

    def __post_init__(self) -> None:
        if self.method not in STAGE1_METHODS:
            raise InputError(f"stage1 method must be one of {STAGE1_METHODS}, got {self.method!r}")
        for name in ("nlist", "nprobe"):
            _positive(name, getattr(self, name), optional=True)
        _positive("overfetch", self.overfetch, optional=True)
        _flag("certify", self.certify)

    @property
    def faiss(self) -> dict[str, int]:
        """The FAISS IVF settings given (``nlist``, ``nprobe``)."""
        return {k: int(v) for k in ("nlist", "nprobe") if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class GalleryOptions:
    """How an in-memory (or memory-mapped) gallery stores and scans its items.

    Attributes:
        layout: a name of :data:`~mssan_infer.gallery.storage.LAYOUTS` -- ``"fp32"`` (exact),
            ``"int8-stage1"`` (int8 stage-1 scan rescored exactly: final scores stay exact),
            ``"int8"`` (also int8 locals) -- or a :class:`~mssan_infer.gallery.storage.Layout`.
            ``None``: ``"fp32"`` for a new gallery, the saved layout for a saved index (another layout
            converts while loading where the saved values allow it). The ``fp16`` layout was removed.
        mmap: keep gallery arrays in memory-mapped files (galleries larger than RAM). A compressed
            stage 1 always keeps its float32 rows memory-mapped (read for candidates only).
        spill_dir: where new memory-mapped files go (default: a fresh temp folder, removed with the gallery).
        stage1: :class:`Stage1Options`.
    """

    layout: str | Layout | None = None
    mmap: bool = False
    spill_dir: str | os.PathLike[str] | None = None
    stage1: Stage1Options = field(default_factory=Stage1Options)

    def __post_init__(self) -> None:
        if not (self.layout is None or isinstance(self.layout, Layout) or self.layout in LAYOUTS):
            raise InputError(f"layout must be one of {sorted(LAYOUTS)} or a Layout, got {self.layout!r}")
        _flag("mmap", self.mmap)
        if not isinstance(self.stage1, Stage1Options):
            raise InputError(f"stage1 must be a Stage1Options, got {type(self.stage1).__name__}")
        lay = self.resolved_layout()
        if self.stage1.method != "numpy" and lay.compressed_stage1:
            raise InputError(
                f"stage1 method {self.stage1.method!r} searches float32 stage-1 vectors; layout {lay.name!r} "
                "scans its own compressed codes (use method 'numpy' with it)"
            )

    def resolved_layout(self, saved: Layout | None = None) -> Layout:
        """The :class:`Layout` to use: the one given, else ``saved``, else ``fp32``."""
        if isinstance(self.layout, Layout):
            return self.layout
        if self.layout is not None:
            return LAYOUTS[self.layout]
        return saved if saved is not None else LAYOUTS["fp32"]


@dataclass(frozen=True)
class SearchOptions:
    """Batching and threads of a :class:`~mssan_infer.Retriever`.

    Attributes:
        batch_size: items per encoder call.
        scorer_batch: most candidates per scorer call (an exhaustive search scores shards of
            ``max(scorer_batch, search.EXHAUSTIVE_SHARD)`` consecutive items).
        gather_threads: threads that copy rerank candidates out of the gallery (default 1: one thread
            copies 100 candidates faster than a hand-off to a second; more help larger reranks). The
            exact path's float32 candidates are not copied but multiplied by the query where they lie;
            those products are split over the same threads. A rerank cut into shares (below) gathers
            each share on its own thread instead.
        rerank_threads: threads that rerank the candidates of an in-memory gallery on ONNX Runtime's query
            scorers (int8 codes, or float32 locals as their similarities to the query): they are cut into
            at most this many equal shares of at least :data:`~mssan_infer.search.MIN_SHARE`, each gathered
            and scored on its own thread by a one-thread session of the scorer. ``None``: the cores this
            process may use; 1: one share on the searching thread, the scorer on the backend's threads.
            Qdrant galleries, exhaustive searches and the all-pairs scorer (TensorRT, Triton, older
            bundles) rerank on the searching thread.
    """

    batch_size: int = 32
    scorer_batch: int = 256
    gather_threads: int | None = None
    rerank_threads: int | None = None

    def __post_init__(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("scorer_batch", self.scorer_batch)
        _positive("gather_threads", self.gather_threads, optional=True)
        _positive("rerank_threads", self.rerank_threads, optional=True)


@dataclass(frozen=True)
class BackendOptions:
    """Settings every backend takes. ``Retriever.load(bundle, backend="name")`` uses the defaults of
    the options class registered for that name; a backend registered with
    :func:`~mssan_infer.backends.register_backend` gets these unless it names its own subclass.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"fp32"``, ``"fp16"`` (needs an ``--fp16`` export) or ``"int8"`` (the dynamically
            quantized text encoder of an ``--int8`` export, CPU).
        threads: intra-op threads (``None``: the backend's default).
    """

    backend: ClassVar[str] = ""
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None

    def __post_init__(self) -> None:
        parse_device(self.device)
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _positive("threads", self.threads, optional=True)


@dataclass(frozen=True)
class OnnxRuntimeOptions(BackendOptions):
    """ONNX Runtime (the default backend).

    Attributes:
        inter_op_threads: inter-op threads per session (``None``: ORT's default).
        graph_optimization: one of :data:`OPT_LEVELS`.
        graph_threads: intra-op threads for some graphs, overriding ``threads``
            (e.g. ``{"text_encoder": 1}``). The query scorers also get a one-thread session each, for
            reranks cut into shares (``SearchOptions.rerank_threads``).
        allow_spinning: let ORT workers keep spin-waiting after a run ends (ORT's own default). Off
            here: workers spin between the nodes of a run and stop when it ends
            (``session.force_spinning_stop``), since a query runs its sessions and stage 1 back to back
            and a worker still spinning for the previous one holds the core the next one needs
            (``python -m bench`` times both, and workers that never spin).
        session_config: extra ONNX Runtime session config entries for every session (e.g.
            ``{"session.intra_op.allow_spinning": "0"}``: workers never spin).
        providers: explicit ORT providers, overriding ``device``.
    """

    backend: ClassVar[str] = "onnxruntime"
    inter_op_threads: int | None = None
    graph_optimization: str = "all"
    graph_threads: Mapping[str, int] | None = None
    allow_spinning: bool = False
    session_config: Mapping[str, str] | None = None
    providers: list[Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("inter_op_threads", self.inter_op_threads, optional=True)
        if self.graph_optimization not in OPT_LEVELS:
            raise InputError(
                f"graph_optimization must be one of {OPT_LEVELS}, got {self.graph_optimization!r}"
            )
        for g, n in (self.graph_threads or {}).items():
            _positive(f"graph_threads[{g!r}]", n)
        _flag("allow_spinning", self.allow_spinning)
        if self.session_config is not None and (
            not isinstance(self.session_config, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.session_config.items())
        ):
            raise InputError(f"session_config must map str keys to str values, got {self.session_config!r}")


@dataclass(frozen=True)
class TensorRTOptions(BackendOptions):
    """TensorRT engines of an ``export --tensorrt`` bundle (a CUDA GPU; ``"cpu"`` means ``cuda:0``).

    Attributes:
        slots: execution contexts per engine, i.e. queries run at once (default: the engine's profiles).
    """

    backend: ClassVar[str] = "tensorrt"
    device: str = "cuda"
    slots: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in ("fp32", "fp16"):
            raise InputError(f"precision must be 'fp32' or 'fp16' for tensorrt, got {self.precision!r}")
        _positive("slots", self.slots, optional=True)


@dataclass(frozen=True)
class TritonOptions(BackendOptions):
    """A Triton server serving the bundle's repository (``device``, ``precision``, ``threads`` are the
    server's business and are ignored).

    Attributes:
        url: ``host:port`` of the server (HTTP 8000, gRPC 8001 by default).
        protocol: ``"http"`` or ``"grpc"``.
        models: graph -> model name, for repositories with other names.
        model_version: the version to call (``""``: the server's choice).
        timeout_s, connect_timeout_s: per-request and connection timeouts.
        wait_ready_s: wait this long for the models to become ready (0: check once).
        check_bundle: the server must serve this bundle (its models' ``mssan_bundle_id``).
    """

    backend: ClassVar[str] = "triton"
    url: str = "127.0.0.1:8000"
    protocol: str = "http"
    models: Mapping[str, str] | None = None
    model_version: str = ""
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    wait_ready_s: float = 0.0
    check_bundle: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.protocol not in ("http", "grpc"):
            raise InputError(f"protocol must be 'http' or 'grpc', got {self.protocol!r}")
        if not isinstance(self.url, str) or not self.url:
            raise InputError(f"url must be 'host:port', got {self.url!r}")
        _seconds("timeout_s", self.timeout_s)
        _seconds("connect_timeout_s", self.connect_timeout_s)
        _seconds("wait_ready_s", self.wait_ready_s, zero=True)
        _flag("check_bundle", self.check_bundle)


def fast_path(backend: Any, gallery: Any) -> tuple[Any, Any]:
    """``Retriever.load(fast=True)``'s options: the int8 text encoder on ONNX Runtime and the ``int8``
    layout for in-memory galleries (a Qdrant gallery keeps its own ``local_dtype``).

    Raises:
        InputError: a backend other than ONNX Runtime, another precision, or another layout.
    """
    if backend == "onnxruntime":
        backend = OnnxRuntimeOptions(precision="int8")
    elif type(backend) in (BackendOptions, OnnxRuntimeOptions) and backend.precision in ("fp32", "int8"):
        backend = dataclasses.replace(backend, precision="int8")
    else:
        raise InputError(
            "fast=True runs the int8 text encoder on ONNX Runtime; it cannot be combined with "
            f"backend={backend!r} (drop fast=True, or use the onnxruntime backend at precision fp32/int8)"
        )
    if gallery is None:
        gallery = GalleryOptions(layout="int8")
    elif isinstance(gallery, GalleryOptions):
        if gallery.layout is not None and gallery.resolved_layout().name != "int8":
            raise InputError(f"fast=True uses the int8 layout; drop fast=True or layout={gallery.layout!r}")
        gallery = dataclasses.replace(gallery, layout="int8")
    return backend, gallery
