"""Where Qdrant galleries live and how they store and search: :class:`QdrantOptions`, :class:`QdrantEdge`,
:class:`QdrantServer`, and :func:`parse_gallery` for the ``"qdrant-edge:PATH"`` / ``"qdrant:URL"`` strings."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Union

from mssan_infer.errors import InputError

__all__ = ["QdrantOptions", "QdrantEdge", "QdrantServer", "parse_gallery", "LOCAL_DTYPES"]

LOCAL_DTYPES = ("float32", "uint8")
# local_dtype="float16" (float16 locals) was removed with the in-memory fp16 layout: it won on no axis


@dataclass(frozen=True)
class QdrantOptions:
    """How a Qdrant gallery stores and searches.

    Attributes:
        exact: stage 1 by a full scan; ``False`` uses the HNSW graph with ``hnsw_ef`` (approximate:
            measure its recall). A full scan without quantization is exact: the in-memory gallery's results.
        quantization: ``None`` or ``"int8"``: int8 scalar quantization of the stage-1 vectors, scanned
            first, then the top ``oversampling * k`` rescored from the original vectors (the returned
            stage-1 scores are exact; which items reach the top can differ: measure its recall).
        oversampling: candidates rescored per result with ``quantization``.
        hnsw_m, hnsw_ef: HNSW graph degree and search breadth (``exact=False``).
        local_dtype: storage of the locals: ``"float32"`` (exact) or ``"uint8"`` (8 bits with a scale per
            vector: the in-memory ``int8`` layout's codes and scales, beside an Edge shard or in a server's
            payload).
    """

    exact: bool = True
    quantization: str | None = None
    oversampling: float = 2.0
    hnsw_m: int = 16
    hnsw_ef: int = 128
    local_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.quantization not in (None, "int8"):
            raise InputError(f"quantization must be None or 'int8', got {self.quantization!r}")
        if self.local_dtype not in LOCAL_DTYPES:
            raise InputError(f"local_dtype must be one of {LOCAL_DTYPES}, got {self.local_dtype!r}")
        if not (isinstance(self.oversampling, (int, float)) and self.oversampling >= 1):
            raise InputError(f"oversampling must be a number >= 1, got {self.oversampling!r}")
        for name in ("hnsw_m", "hnsw_ef"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name} must be a positive int, got {v!r}")

    def layout(self) -> dict[str, Any]:
        """What must match between a gallery and the options it is opened with."""
        return {"quantization": self.quantization, "local_dtype": self.local_dtype, "hnsw_m": self.hnsw_m}


@dataclass(frozen=True)
class QdrantEdge:
    """Galleries in Qdrant Edge shards (the Qdrant engine in-process): ``path/images``, ``path/texts``.

    ``create``: make the galleries when they do not exist yet; ``False``: a missing gallery is an error and
    nothing is created (searching, describing and removing must not make a gallery of a mistyped path).
    """

    path: str | os.PathLike[str]
    options: QdrantOptions = field(default_factory=QdrantOptions)
    create: bool = True


@dataclass(frozen=True)
class QdrantServer:
    """Galleries as collections ``{prefix}_images`` / ``{prefix}_texts`` on a Qdrant server or cluster.

    Give ``url`` (e.g. ``"http://localhost:6333"``), or ``client``: any ``qdrant_client.QdrantClient``
    (its local mode ``QdrantClient(":memory:")`` or ``QdrantClient(path=...)`` included). ``create``: as
    in :class:`QdrantEdge`.

    The server keeps each item's rerank inputs as a binary payload (it stays the one source of truth).
    ``cache_dir``: a folder on this machine for a read-through cache of them (one subfolder per
    collection; any number of processes may share it; it may be deleted at any time). A search then
    fetches only ids, scores and small payloads, reads the candidates' rerank inputs from the cache, and
    fetches from the server only those it lacks or holds with another content hash. ``None``: no cache; the
    rerank inputs travel with every search's stage-1 response. See :mod:`mssan_infer.qdrant.server_locals`.
    """

    url: str | None = None
    prefix: str = "mssan"
    client: Any = None
    api_key: str | None = None
    prefer_grpc: bool = False
    options: QdrantOptions = field(default_factory=QdrantOptions)
    create: bool = True
    cache_dir: str | os.PathLike[str] | None = None


GallerySpec = Union[None, str, QdrantEdge, QdrantServer]
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


_OPTION_VALUES = {
    "exact": "true or false",
    "quantization": "none or int8",
    "oversampling": "a number >= 1",
    "hnsw_m": "a positive int",
    "hnsw_ef": "a positive int",
    "local_dtype": " or ".join((", ".join(LOCAL_DTYPES[:-1]), LOCAL_DTYPES[-1])),
}


def parse_gallery(spec: GallerySpec, *, name: str = "gallery") -> QdrantEdge | QdrantServer | None:
    """Where galleries live, from ``Retriever.load(gallery=...)`` or the CLI's ``--gallery``.

    ``None`` or ``"memory"``: in this process (``None`` is returned). ``"qdrant-edge:PATH"``: Qdrant
    Edge shards under ``PATH``. ``"qdrant:URL"`` (e.g. ``"qdrant:http://localhost:6333"``): collections
    on a Qdrant server. Both take options after ``?``: ``prefix`` and ``cache_dir`` (server only: the
    collections' prefix, default ``mssan``, and :class:`QdrantServer`'s read-through cache folder),
    ``exact``, ``quantization``, ``oversampling``, ``hnsw_m``, ``hnsw_ef``, ``local_dtype``,
    e.g. ``"qdrant-edge:/data/g?quantization=int8&local_dtype=uint8"``,
    ``"qdrant:http://qdrant:6333?prefix=photos&cache_dir=/var/cache/mssan"``.

    Args:
        name: what messages call the spec (the CLI passes ``"--gallery"``).
    Raises:
        InputError: anything else: no path or URL, an unknown option, or an option's value out of range.
    """
    if isinstance(spec, (QdrantEdge, QdrantServer)):
        return spec
    if spec is None or spec == "memory":
        return None
    if not isinstance(spec, str):
        raise InputError(
            f"{name} must be 'memory', 'qdrant-edge:PATH', 'qdrant:URL', QdrantEdge or QdrantServer, "
            f"got {type(spec).__name__}"
        )
    kind, sep, rest = spec.partition(":")
    target, _, query = rest.partition("?")
    if not sep or kind not in ("qdrant-edge", "qdrant") or not target:
        what = {"qdrant-edge": "folder path", "qdrant": "server URL"}.get(kind) if sep else None
        missing = f"no {what} after '{kind}:'; " if what else ""
        raise InputError(
            f"{name} {spec!r}: {missing}expected 'memory', 'qdrant-edge:PATH' (e.g. 'qdrant-edge:galleries') "
            "or 'qdrant:URL' (e.g. 'qdrant:http://localhost:6333'), options after '?' (e.g. '?prefix=photos')"
        )
    raw = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    prefix = raw.pop("prefix", "mssan")
    cache_dir = raw.pop("cache_dir", None)
    if kind == "qdrant-edge" and cache_dir is not None:
        raise InputError(
            f"{name} {spec!r}: cache_dir is for 'qdrant:URL' galleries (an Edge shard's rerank inputs are "
            "already files on this machine); remove it"
        )
    if cache_dir == "":
        raise InputError(f"{name} {spec!r}: option cache_dir= needs a folder path")
    unknown = sorted(set(raw) - set(_OPTION_VALUES))
    if unknown:
        known = ", ".join(("prefix", *_OPTION_VALUES, "cache_dir"))
        raise InputError(f"{name} {spec!r}: unknown option {unknown[0]!r}; the options are {known}")
    opts: dict[str, Any] = {}
    for key, value in raw.items():
        head, must = f"{name} {spec!r}: option {key}={value}: ", f"must be {_OPTION_VALUES[key]}"
        try:
            if key == "exact":
                opts[key] = _BOOLS[value.lower()]
            elif key in ("hnsw_m", "hnsw_ef"):
                opts[key] = int(value)
            elif key == "oversampling":
                opts[key] = float(value)
            elif key == "quantization":
                opts[key] = None if value.lower() in ("", "none") else value
            else:
                opts[key] = value
        except (KeyError, ValueError):
            raise InputError(f"{head}malformed, {must}") from None
        try:
            QdrantOptions(**{key: opts[key]})  # this option's own check, said in the spec's words
        except InputError:
            raise InputError(head + must) from None
    options = QdrantOptions(**opts)
    if kind == "qdrant-edge":
        return QdrantEdge(target, options)
    return QdrantServer(url=target, prefix=prefix, options=options, cache_dir=cache_dir)
