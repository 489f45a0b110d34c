"""Where Qdrant galleries are: opening (and creating) them on an Edge folder or a server, finding the
missing ones, and replacing them at once (``index --overwrite``)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from mssan_infer.errors import IndexFileError, InputError
from mssan_infer.files import recover_swap, swap_in
from mssan_infer.qdrant.gallery import QdrantGallery
from mssan_infer.qdrant.locals import FOLDER
from mssan_infer.qdrant.options import QdrantEdge, QdrantServer
from mssan_infer.qdrant.server_locals import PAYLOAD
from mssan_infer.qdrant.stores import META_FILE, ClientStore, EdgeStore, Store, import_client

__all__ = ["open_qdrant_galleries", "missing_qdrant_galleries", "replacing_qdrant_galleries"]

log = logging.getLogger(__name__)


def _check_meta(meta: dict[str, Any], want: dict[str, Any], where: str) -> None:
    saved = meta.get("layout")
    if isinstance(saved, dict) and saved.get("local_dtype") == "float16":
        raise IndexFileError(
            f"{where} was built with local_dtype=float16 (float16 locals, like the fp16 layout), which was "
            "removed (float16 gallery storage won on no axis): rebuild it with local_dtype=uint8 (smaller) "
            "or float32 (exact): `python -m mssan_infer index ... --gallery '...?local_dtype=uint8' "
            "--overwrite`, or QdrantOptions(local_dtype='uint8')"
        )
    if meta.get("bundle_id") != want["bundle_id"]:
        raise IndexFileError(
            f"{where} was built with bundle {meta.get('bundle_id')}, but the loaded bundle is "
            f"{want['bundle_id']}; "
            "its vectors would not match. Use another path/collection or rebuild it with this bundle."
        )
    for key in ("gallery", "stage1_dim", "local_dim", "layout"):
        if meta.get(key) != want[key]:
            raise IndexFileError(
                f"{where} holds {key} {meta.get(key)!r}, but it was opened with {want[key]!r}; open it with "
                "the "
                "options it was built with, or rebuild it"
            )


_EDGE_CONFIG = "edge_config.json"  # what makes a folder a Qdrant Edge shard (EdgeStore loads it)


_CLIENTS: dict[tuple[str, str | None, bool], Any] = {}  # one client per server and settings, per process
_CLIENTS_LOCK = threading.Lock()


def _server_client(spec: QdrantServer) -> Any:
    """The spec's ``qdrant_client`` client: its own, or the one this process keeps for its url and settings
    (made on first use, shared by every gallery and command on that server, never one per call)."""
    if spec.client is not None:
        return spec.client
    if not spec.url:
        raise InputError("QdrantServer needs url= (e.g. 'http://localhost:6333') or client=")
    key = (spec.url, spec.api_key, spec.prefer_grpc)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            qc = import_client("qdrant_client", "qdrant-client")
            _CLIENTS[key] = qc.QdrantClient(url=spec.url, api_key=spec.api_key, prefer_grpc=spec.prefer_grpc)
        return _CLIENTS[key]


def _aliases(client: Any) -> dict[str, str]:
    """Alias -> collection of every alias on the server."""
    return {a.alias_name: a.collection_name for a in client.get_aliases().aliases}


def _collection_of(client: Any, name: str, aliases: Mapping[str, str] | None = None) -> str | None:
    """The collection a gallery name resolves to (its alias's, or the collection of that name), or None."""
    aliases = _aliases(client) if aliases is None else aliases
    if name in aliases:
        return aliases[name]
    return name if client.collection_exists(name) else None


def missing_qdrant_galleries(
    spec: QdrantEdge | QdrantServer, names: Sequence[str], *, client: Any = None
) -> list[str]:
    """The names among ``names`` that have no gallery in ``spec`` yet. Creates nothing (Edge: galleries a
    killed ``--overwrite`` left aside are put back first).

    Raises:
        BackendUnavailableError: the client package of a server is not installed.
    """
    if isinstance(spec, QdrantEdge):
        recover_swap(Path(spec.path))  # galleries a killed --overwrite left aside are put back first
        return [n for n in names if not (Path(spec.path) / n / _EDGE_CONFIG).is_file()]
    client = _server_client(spec) if client is None else client
    aliases = _aliases(client)
    return [n for n in names if _collection_of(client, f"{spec.prefix}_{n}", aliases) is None]


def _gallery_place(spec: QdrantEdge | QdrantServer, name: str) -> str:
    if isinstance(spec, QdrantEdge):
        return f"Qdrant Edge shard {Path(spec.path) / name}"
    return f"Qdrant collection {spec.prefix + '_' + name!r}"


def open_qdrant_galleries(
    spec: QdrantEdge | QdrantServer,
    names: Sequence[str],
    stage1_dim: int,
    local_dim: int,
    bundle_id: str,
) -> dict[str, QdrantGallery]:
    """Open one Qdrant gallery per name for a bundle (with ``spec.create``, making the missing ones).

    A gallery on a server is made as a collection ``{prefix}_{name}_{random}`` under the alias
    ``{prefix}_{name}``, so that :func:`replacing_qdrant_galleries` can later switch the name to a new
    collection in one step.

    Raises:
        IndexFileError: a gallery built with another bundle or layout, one that cannot be opened, or (without
            ``spec.create``) one that does not exist.
        BackendUnavailableError: the Qdrant package is not installed.
    """
    out: dict[str, QdrantGallery] = {}
    client = _server_client(spec) if isinstance(spec, QdrantServer) else None
    if isinstance(spec, QdrantEdge):
        recover_swap(Path(spec.path))  # galleries a killed --overwrite left aside are put back first
    if not spec.create:
        missing = missing_qdrant_galleries(spec, names, client=client)
        if missing:
            raise IndexFileError(
                f"no mssan gallery at {', '.join(_gallery_place(spec, n) for n in missing)}, and none was "
                "created: check the path (or URL and prefix), or index items into it first"
            )
    aliases = _aliases(client) if client is not None else {}
    try:
        for name in names:
            out[name] = _open_one(spec, client, aliases, name, stage1_dim, local_dim, bundle_id)
    except BaseException:
        for g in out.values():  # the galleries opened before the one that failed
            g.close()
        raise
    return out


def _open_one(
    spec: QdrantEdge | QdrantServer,
    client: Any,
    aliases: Mapping[str, str],
    name: str,
    stage1_dim: int,
    local_dim: int,
    bundle_id: str,
) -> QdrantGallery:
    """One gallery of :func:`open_qdrant_galleries` (made when missing and ``spec.create``)."""
    opts = spec.options
    want = {
        "format": "mssan-qdrant-gallery",
        "bundle_id": bundle_id,
        "gallery": name,
        "stage1_dim": stage1_dim,
        "local_dim": local_dim,
        # where the rerank inputs are: beside an Edge shard, a payload on a server (galleries that kept
        # them as multivectors are refused)
        "layout": {**opts.layout(), "rerank_inputs": FOLDER if isinstance(spec, QdrantEdge) else PAYLOAD},
    }
    store: Store
    if isinstance(spec, QdrantEdge):
        store = EdgeStore(Path(spec.path) / name, stage1_dim, local_dim, opts)
        try:
            meta = store.read_meta()
            if meta is None:
                if store.count():
                    raise IndexFileError(
                        f"{store.where} holds points but no {META_FILE}; it is not an mssan gallery"
                    )
                store.write_meta(want)
            else:
                _check_meta(meta, want, store.where)
        except BaseException:
            store.close()
            raise
        return QdrantGallery(store, stage1_dim, local_dim, opts)
    assert client is not None
    alias = f"{spec.prefix}_{name}"
    target = _collection_of(client, alias, aliases)
    if target is None:
        target = f"{alias}_{uuid.uuid4().hex[:12]}"
        ClientStore(client, target, stage1_dim, local_dim, opts).create(want)
        try:
            client.update_collection_aliases(
                change_aliases_operations=[_alias_op(client, "create", alias, target)]
            )
        except BaseException:
            client.delete_collection(target)  # no orphan collection without its alias
            raise
    else:
        meta = ClientStore(client, target, stage1_dim, local_dim, opts).read_meta()
        if meta is None or meta.get("format") != "mssan-qdrant-gallery":
            raise IndexFileError(
                f"Qdrant collection {alias!r} exists but is not an mssan gallery; choose another prefix"
            )
        _check_meta(meta, want, f"Qdrant collection {alias!r}")
    # the cache is the collection's (a replace starts a new one, filled as the new collection was built)
    cache = Path(spec.cache_dir) / target if spec.cache_dir is not None else None
    # the alias, not the collection: it follows a replace
    store = ClientStore(client, alias, stage1_dim, local_dim, opts, cache=cache)
    return QdrantGallery(store, stage1_dim, local_dim, opts)


def _collections(client: Any) -> list[str]:
    return [c.name for c in client.get_collections().collections]


def _delete_staged(client: Any, prefix: str) -> None:
    """Delete what a replace built under ``prefix`` (collections with or without their alias yet)."""
    for collection in _collections(client):
        if collection.startswith(f"{prefix}_"):
            client.delete_collection(collection)


def _alias_op(client: Any, kind: str, alias: str, collection: str = "") -> Any:
    """One ``update_collection_aliases`` operation: ``create`` alias -> collection, or ``delete`` alias."""
    from qdrant_client import models

    if kind == "create":
        return models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
        )
    return models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))


def _edge_folder_holds_only_galleries(root: Path) -> list[str]:
    """What else than Qdrant Edge galleries ``root`` holds (names), for a refusal to replace it."""
    others = []
    for entry in sorted(root.iterdir()):
        if not (entry.is_dir() and not entry.is_symlink() and (entry / _EDGE_CONFIG).is_file()):
            others.append(entry.name)
    return others


@contextlib.contextmanager
def replacing_qdrant_galleries(
    spec: QdrantEdge | QdrantServer, names: Sequence[str]
) -> Iterator[QdrantEdge | QdrantServer]:
    """A new, empty place to build galleries that then replace the galleries ``names`` of ``spec`` at once.

    Build the new galleries in the yielded spec and close everything opened there before the block ends.
    When it ends without an error, the new galleries take the old ones' place; on an error they are
    deleted and the old ones are untouched.

    - Qdrant Edge: the new shards are built in a temp folder beside ``spec.path`` and the two folders are
      exchanged in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, and a crash
      between them leaves the previous galleries beside the path as ``.NAME.old-*``). ``spec.path`` must
      hold nothing but Qdrant Edge galleries (it is replaced as a whole).
    - A server: the new collections get temporary aliases; one alias update then points every
      ``{prefix}_{name}`` at its new collection (Qdrant applies the operations of one update together), and
      the old collections are deleted. A plain collection (no alias) under a gallery's name is refused
      before anything is built: it was not made by this mssan_infer.

    Raises:
        InputError: ``spec.path`` holds other things than galleries, or is not a folder.
        IndexFileError / IndexWriteError: the swap failed (the old galleries are kept).
    """
    if isinstance(spec, QdrantEdge):
        with _replacing_edge(spec) as edge:
            yield edge
        return
    client = _server_client(spec)
    aliases = _aliases(client)
    plain = [f"{spec.prefix}_{n}" for n in names if f"{spec.prefix}_{n}" not in aliases]
    plain = [c for c in plain if client.collection_exists(c)]
    if plain:
        raise IndexFileError(
            f"Qdrant collection(s) {plain} are not mssan galleries made by this version (no alias); delete "
            "them or choose another prefix"
        )
    token = uuid.uuid4().hex[:8]
    staged = dataclasses.replace(spec, client=client, prefix=f"{spec.prefix}_new{token}")
    try:
        yield staged
        aliases = _aliases(client)
        ops, old = [], []
        for name in names:
            final, temp = f"{spec.prefix}_{name}", f"{staged.prefix}_{name}"
            if temp not in aliases:
                raise IndexFileError(f"the new Qdrant gallery {temp!r} was not built; nothing was replaced")
            ops.append(_alias_op(client, "delete", temp))
            if final in aliases:
                ops.append(_alias_op(client, "delete", final))
                old.append(aliases[final])
            ops.append(_alias_op(client, "create", final, aliases[temp]))
    except BaseException:
        _delete_staged(client, staged.prefix)
        raise
    try:
        client.update_collection_aliases(change_aliases_operations=ops)
    except Exception as e:
        built = sorted(c for c in _collections(client) if c.startswith(f"{staged.prefix}_"))
        raise IndexFileError(
            f"the new galleries were built in Qdrant collections {built} but moving the names "
            f"{[f'{spec.prefix}_{n}' for n in names]} onto them failed ({e}); the old galleries are as they "
            "were unless the server applied the update: check the aliases, then delete the collections "
            "that no alias names"
        ) from e
    still = set(_aliases(client).values())
    for collection in old:
        if collection not in still:
            client.delete_collection(collection)


@contextlib.contextmanager
def _replacing_edge(spec: QdrantEdge) -> Iterator[QdrantEdge]:
    root = Path(spec.path)
    recover_swap(root)  # the previous galleries, when a replace was killed between two renames
    if root.exists():
        if not root.is_dir():
            raise InputError(f"{root} is not a folder of Qdrant Edge galleries; choose another path")
        others = _edge_folder_holds_only_galleries(root)
        if others:
            raise InputError(
                f"{root} holds other things than Qdrant Edge galleries ({', '.join(others[:5])}); replacing "
                "the galleries replaces the whole folder, so it is refused: choose another path"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield dataclasses.replace(spec, path=tmp)
        tmp.mkdir(exist_ok=True)
        swap_in(tmp, root)  # commits (and then never raises), or raises with the previous galleries in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
