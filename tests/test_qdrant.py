"""Galleries in Qdrant (Qdrant Edge in-process, and the server code path through qdrant-client's local
mode) against the in-memory gallery; metadata filters on every gallery."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import qdrant_client  # noqa: F401  (dev extra: needed, never skipped)
import qdrant_edge  # noqa: F401

from mssan_infer import OnnxRuntimeOptions, Retriever
from mssan_infer.errors import IndexFileError, InputError
from mssan_infer.gallery.filters import parse_where
from mssan_infer.qdrant.gallery import copy_gallery, point_id
from mssan_infer.qdrant.options import QdrantEdge, QdrantOptions, QdrantServer, parse_gallery
from mssan_infer.qdrant.places import open_qdrant_galleries

DV = 24
CAPTIONS = [
    "a red dog on the beach",
    "the blue ball near a tree",
    "a man in the street",
    "a small bird",
    "the cat runs in the field",
    "a woman near the house",
]
QUERIES = ["a red dog", "the ball near the tree", "a man"]
N = 40


def _server(cache_dir: Path | None = None, **options: Any) -> QdrantServer:
    from qdrant_client import QdrantClient

    return QdrantServer(
        client=QdrantClient(":memory:"), options=QdrantOptions(**options), cache_dir=cache_dir
    )


def _meta(i: int) -> dict[str, Any]:
    return {"album": ["beach", "city", "home"][i % 3], "year": 2000 + i, "tags": ["x"] if i % 2 else []}


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((N, 8, DV))).astype(np.float32)
    mask = (np.arange(8)[None] < rng.integers(2, 9, (N, 1))).astype(np.float32)
    return {"feats": feats, "mask": mask}


def _filled(bundle: Path, data: dict[str, Any], **load: Any) -> Retriever:
    r = Retriever.load(bundle, OnnxRuntimeOptions(threads=1), **load)
    r.add_images(
        data["feats"],
        mask=data["mask"],
        ids=[f"img{i}" for i in range(N)],
        metadata=[_meta(i) for i in range(N)],
    )
    r.add_texts(
        CAPTIONS * 2,
        ids=list(range(len(CAPTIONS) * 2)),
        metadata=[{"lang": "en" if i < 6 else "fr"} for i in range(12)],
    )
    return r


@pytest.fixture(scope="module")
def memory(tiny_bundle: Path, data: dict[str, Any]) -> Iterator[Retriever]:
    r = _filled(tiny_bundle, data)
    yield r
    r.close()


@pytest.fixture(scope="module", params=["edge", "server", "server-cache"])
def qdrant(
    request: pytest.FixtureRequest,
    tiny_bundle: Path,
    data: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Retriever]:
    gallery = {
        "edge": lambda: QdrantEdge(tmp_path_factory.mktemp("edge")),
        "server": lambda: _server(),
        "server-cache": lambda: _server(cache_dir=tmp_path_factory.mktemp("cache")),
    }[request.param]()
    r = _filled(tiny_bundle, data, gallery=gallery)
    yield r
    r.close()


def _same(a: list[Any], b: list[Any], atol: float = 1e-5) -> None:
    assert [h.id for h in a] == [h.id for h in b]
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=atol)
    np.testing.assert_allclose([h.stage1 for h in a], [h.stage1 for h in b], atol=atol)


# ---- exact mode equals the in-memory gallery ------------------------------------------------------------
@pytest.mark.parametrize("rerank", [0, 10, N])
def test_exact_qdrant_gallery_returns_the_in_memory_rankings_and_scores_text_to_image(
    memory: Retriever, qdrant: Retriever, rerank: int
) -> None:
    for q in QUERIES:
        _same(qdrant.search(text=q, k=8, rerank=rerank), memory.search(text=q, k=8, rerank=rerank))


def test_exact_qdrant_gallery_returns_the_in_memory_rankings_and_scores_image_to_text(
    memory: Retriever, qdrant: Retriever, data: dict[str, Any]
) -> None:
    for i in (0, 7, 19):
        img = data["feats"][i][data["mask"][i] > 0]
        _same(qdrant.search(image=img, k=6, rerank=12), memory.search(image=img, k=6, rerank=12))


def test_ids_counts_and_membership_match_the_in_memory_gallery(memory: Retriever, qdrant: Retriever) -> None:
    assert qdrant.images.ids == memory.images.ids and qdrant.texts.ids == memory.texts.ids
    assert (qdrant.n_images, qdrant.n_texts) == (N, 12)
    assert "img3" in qdrant.images and 3 in qdrant.texts
    assert "3" not in qdrant.texts and point_id(3) != point_id("3")  # int and str ids stay distinct


# ---- filters ------------------------------------------------------------------------------------------
FILTERS: list[Any] = [
    {"album": "beach"},
    {"album": ["city", "home"]},
    {"year": {"gte": 2010, "lt": 2020}},
    {"album": "home", "year": {"gt": 2030}},
    {"tags": "x"},
]


@pytest.mark.parametrize("where", FILTERS, ids=["eq", "in", "range", "and", "in-list-value"])
def test_filters_give_the_same_results_on_every_gallery(
    memory: Retriever, qdrant: Retriever, where: dict[str, Any]
) -> None:
    for q in QUERIES:
        want = memory.search(text=q, k=7, rerank=14, where=where)
        assert want, "the filter should keep some items"
        _same(qdrant.search(text=q, k=7, rerank=14, where=where), want)
    conds = parse_where(where)
    from mssan_infer.gallery.filters import matches

    keep = {f"img{i}" for i in range(N) if matches(_meta(i), conds)}
    assert {h.id for h in memory.search(text=QUERIES[0], k=N, rerank=0, where=where)} == keep


def test_a_filter_over_a_missing_key_is_an_empty_result(memory: Retriever, qdrant: Retriever) -> None:
    for r in (memory, qdrant):
        assert r.search(text="a red dog", k=5, where={"no_such_key": "x"}) == []
        assert r.search(image=np.ones((3, DV), np.float32), k=5, where={"lang": "de"}) == []


@pytest.mark.parametrize(
    "where, match",
    [
        ({"x": 1.5}, "range"),
        ({"x": []}, "non-empty list"),
        ({"x": ["a", 1]}, "non-empty list"),
        ({"x": {"between": 1}}, "range"),
        ({"x": {"gt": float("nan")}}, "range"),
        ({"mssan_id": "a"}, "reserved"),
        ({3: "a"}, "keys"),
        ("album", "mapping"),
    ],
)
def test_malformed_filters_are_refused_before_searching(memory: Retriever, where: Any, match: str) -> None:
    with pytest.raises(InputError, match=match):
        memory.search(text="a red dog", where=where)


@pytest.mark.parametrize(
    "metadata, match",
    [
        ([{"a": 1}], "1 metadata entries for 2"),
        ({"a": 1}, "list"),
        ([{"mssan_seq": 1}, None], "reserved"),
        ([{"a": float("nan")}, None], "JSON"),
        ([{"a": object()}, None], "JSON"),
        ([3, None], "mapping"),
    ],
)
def test_bad_metadata_is_refused_and_nothing_is_added(
    memory: Retriever, qdrant: Retriever, metadata: Any, match: str
) -> None:
    for r in (memory, qdrant):
        before = r.n_images
        with pytest.raises(InputError, match=match):
            r.add_images(np.ones((2, 3, DV), np.float32), ids=["m0", "m1"], metadata=metadata)
        assert r.n_images == before and "m0" not in r.images


def test_metadata_survives_save_and_load(memory: Retriever, tiny_bundle: Path, tmp_path: Path) -> None:
    memory.save(tmp_path / "idx")
    again = Retriever.load(tiny_bundle, index=tmp_path / "idx")
    for where in FILTERS[:3]:
        _same(
            again.search(text="a red dog", k=5, where=where),
            memory.search(text="a red dog", k=5, where=where),
        )
    assert json.loads((tmp_path / "idx" / "images_meta.json").read_text())[0] == _meta(0)


# ---- bad input, bundles and layouts ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "ids, match",
    [
        (["img1", "new"], "already in the gallery"),
        (["a", "a"], "duplicate"),
        ([True, False], "str or int"),
        ([1.5, 2.5], "str or int"),
        (["a"], "1 ids for 2"),
    ],
)
def test_bad_ids_are_refused_and_nothing_is_written(qdrant: Retriever, ids: list[Any], match: str) -> None:
    before = qdrant.n_images
    with pytest.raises(InputError, match=match):
        qdrant.add_images(np.ones((2, 3, DV), np.float32), ids=ids)
    assert qdrant.n_images == before


def test_vectors_of_the_wrong_size_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    g = open_qdrant_galleries(QdrantEdge(tmp_path / "e"), ["images"], 8, 4, "b")["images"]
    ones = np.ones
    with pytest.raises(InputError, match="stage1 \\[N,8\\]"):
        g.add(
            ones((1, 9), np.float32), ones((1, 2, 4), np.float32), ones((1, 2), np.float32), ones((1, 2, 2))
        )
    with pytest.raises(InputError, match="local \\[N,P,4\\]"):
        g.add(
            ones((1, 8), np.float32), ones((1, 2, 5), np.float32), ones((1, 2), np.float32), ones((1, 2, 2))
        )
    with pytest.raises(InputError, match="NaN"):
        g.add(
            np.full((1, 8), np.nan, np.float32),
            ones((1, 2, 4), np.float32),
            ones((1, 2), np.float32),
            ones((1, 2, 2)),
        )
    with pytest.raises(InputError, match="unknown ids"):
        g.remove(["never"])
    assert len(g) == 0
    g.close()


def test_a_gallery_built_with_another_bundle_or_layout_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    from qdrant_client import QdrantClient

    open_qdrant_galleries(QdrantEdge(tmp_path / "e"), ["images"], 8, 4, "bundle-a")["images"].close()
    with pytest.raises(IndexFileError, match="built with bundle bundle-a"):
        open_qdrant_galleries(QdrantEdge(tmp_path / "e"), ["images"], 8, 4, "bundle-b")
    with pytest.raises(IndexFileError, match="local_dtype|layout"):
        open_qdrant_galleries(
            QdrantEdge(tmp_path / "e", QdrantOptions(local_dtype="uint8")), ["images"], 8, 4, "bundle-a"
        )
    client = QdrantClient(":memory:")
    open_qdrant_galleries(QdrantServer(client=client), ["images"], 8, 4, "bundle-a")
    with pytest.raises(IndexFileError, match="built with bundle bundle-a"):
        open_qdrant_galleries(QdrantServer(client=client), ["images"], 8, 4, "bundle-b")
    client.create_collection("other_images")
    with pytest.raises(IndexFileError, match="not an mssan gallery"):
        open_qdrant_galleries(QdrantServer(client=client, prefix="other"), ["images"], 8, 4, "bundle-a")
    # through the Retriever: the same refusal, and save() says to flush instead
    r = Retriever.load(tiny_bundle, gallery=QdrantEdge(tmp_path / "r"))
    with pytest.raises(InputError, match="flush"):
        r.save(tmp_path / "idx")
    r.close()


def test_a_gallery_built_with_the_removed_float16_locals_is_refused_with_the_fix(tmp_path: Path) -> None:
    from qdrant_client import QdrantClient

    from mssan_infer.qdrant.stores import META_FILE

    def removed(meta: dict[str, Any]) -> dict[str, Any]:  # what local_dtype=float16 wrote
        return {**meta, "layout": {**meta["layout"], "local_dtype": "float16"}}

    def refused(spec: QdrantEdge | QdrantServer, where: str) -> None:
        for options in (
            QdrantOptions(),
            QdrantOptions(local_dtype="uint8"),
        ):  # opened as default, or as advised
            with pytest.raises(IndexFileError) as info:
                open_qdrant_galleries(
                    dataclasses.replace(spec, options=options), ["images"], 8, 4, "bundle-a"
                )
            msg = str(info.value)
            assert (
                msg.startswith(f"{where} was built with local_dtype=float16") and "which was removed" in msg
            )
            assert "local_dtype=uint8 (smaller) or float32 (exact)" in msg and "--overwrite" in msg

    open_qdrant_galleries(QdrantEdge(tmp_path / "e"), ["images"], 8, 4, "bundle-a")["images"].close()
    meta_file = tmp_path / "e" / "images" / META_FILE
    meta_file.write_text(json.dumps(removed(json.loads(meta_file.read_text()))))
    refused(QdrantEdge(tmp_path / "e"), f"Qdrant Edge shard {tmp_path / 'e' / 'images'}")
    client = QdrantClient(":memory:")
    open_qdrant_galleries(QdrantServer(client=client), ["images"], 8, 4, "bundle-a")["images"].close()
    (target,) = [a.collection_name for a in client.get_aliases().aliases if a.alias_name == "mssan_images"]
    meta = dict(client.get_collection(target).config.metadata)
    client.update_collection(target, metadata=removed(meta))
    refused(QdrantServer(client=client), "Qdrant collection 'mssan_images'")


@pytest.mark.parametrize(
    "spec, kind, options",
    [
        ("qdrant-edge:/data/g", "edge", {}),
        (
            "qdrant-edge:/data/g?quantization=int8&local_dtype=uint8",
            "edge",
            {"quantization": "int8", "local_dtype": "uint8"},
        ),
        (
            "qdrant:http://localhost:6333?prefix=demo&exact=false&hnsw_ef=64",
            "server",
            {"exact": False, "hnsw_ef": 64},
        ),
    ],
)
def test_gallery_strings_name_qdrant_galleries(spec: str, kind: str, options: dict[str, Any]) -> None:
    g = parse_gallery(spec)
    assert isinstance(g, QdrantEdge if kind == "edge" else QdrantServer)
    for key, value in options.items():
        assert getattr(g.options, key) == value
    if kind == "server":
        assert isinstance(g, QdrantServer) and g.url == "http://localhost:6333" and g.prefix == "demo"
    assert parse_gallery("memory") is None and parse_gallery(None) is None


def test_a_server_gallery_string_takes_a_cache_folder_and_an_edge_one_refuses_it() -> None:
    g = parse_gallery("qdrant:http://localhost:6333?prefix=p&cache_dir=/var/cache/mssan&local_dtype=uint8")
    assert isinstance(g, QdrantServer) and g.cache_dir == "/var/cache/mssan" and g.prefix == "p"
    assert g.options.local_dtype == "uint8"
    assert parse_gallery("qdrant:http://localhost:6333").cache_dir is None  # type: ignore[union-attr]
    with pytest.raises(InputError, match="cache_dir is for 'qdrant:URL'"):
        parse_gallery("qdrant-edge:/g?cache_dir=/c")
    with pytest.raises(InputError, match="needs a folder"):
        parse_gallery("qdrant:http://h?cache_dir=")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("qdrant", "expected"),
        ("redis:x", "expected"),
        ("qdrant-edge:/g?colour=red", "unknown option"),
        ("qdrant-edge:/g?exact=maybe", "malformed"),
        ("qdrant-edge:/g?local_dtype=int4", "local_dtype"),
        ("qdrant-edge:/g?local_dtype=float16", "local_dtype=float16: must be float32 or uint8"),  # removed
        ("qdrant-edge:/g?quantization=pq", "quantization"),
        (3, "gallery must be"),
    ],
)
def test_bad_gallery_strings_are_refused(spec: Any, match: str) -> None:
    with pytest.raises(InputError, match=match):
        parse_gallery(spec)


# ---- compressed and approximate modes -------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, atol",
    [
        ({"quantization": "int8"}, 1e-5),  # stage 1 int8, rescored: final scores exact
        ({"local_dtype": "uint8"}, 3e-2),
        ({"exact": False, "hnsw_ef": 64}, 1e-5),
    ],
)
def test_compressed_and_approximate_modes_score_what_they_return_within_their_bounds(
    memory: Retriever,
    tiny_bundle: Path,
    data: dict[str, Any],
    tmp_path: Path,
    options: dict[str, Any],
    atol: float,
) -> None:
    r = _filled(tiny_bundle, data, gallery=QdrantEdge(tmp_path / "g", QdrantOptions(**options)))
    for q in QUERIES:
        got = r.search(text=q, k=6, rerank=N)
        truth = {h.id: h for h in memory.search(text=q, k=N, rerank=N)}
        assert len(got) == 6
        for h in got:
            assert abs(h.stage1 - truth[h.id].stage1) < 1e-5
            assert abs(h.score - truth[h.id].score) < atol
    r.close()


# ---- moving up, sharing, durability ---------------------------------------------------------------------
def test_an_edge_gallery_copied_to_a_server_collection_searches_the_same(
    tiny_bundle: Path, data: dict[str, Any], memory: Retriever, tmp_path: Path
) -> None:
    edge = _filled(tiny_bundle, data, gallery=QdrantEdge(tmp_path / "edge"))
    server = Retriever.load(tiny_bundle, gallery=_server())
    from mssan_infer.qdrant.gallery import QdrantGallery

    for name in ("images", "texts"):
        src, dst = getattr(edge, name), getattr(server, name)
        assert isinstance(src, QdrantGallery) and isinstance(dst, QdrantGallery)
        assert copy_gallery(src, dst) == len(src)
        with pytest.raises(InputError, match="already in"):
            copy_gallery(src, dst)
    assert server.images.ids == memory.images.ids
    for q in QUERIES:
        _same(
            server.search(text=q, k=5, where={"album": "city"}),
            memory.search(text=q, k=5, where={"album": "city"}),
        )
    edge.close()


def test_replicas_on_one_server_collection_see_each_others_writes(
    tiny_bundle: Path, data: dict[str, Any]
) -> None:
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")  # stands for one server; each Retriever is a replica
    a = Retriever.load(tiny_bundle, gallery=QdrantServer(client=client, prefix="shared"))
    b = Retriever.load(tiny_bundle, gallery=QdrantServer(client=client, prefix="shared"))
    a.add_images(data["feats"][:10], mask=data["mask"][:10], ids=[f"a{i}" for i in range(10)])
    b.add_images(data["feats"][10:20], mask=data["mask"][10:20], ids=[f"b{i}" for i in range(10)])
    _same(a.search(text="a red dog", k=20), b.search(text="a red dog", k=20))
    b.remove(["a3"])
    assert "a3" not in a.images and a.n_images == 19


def test_a_load_that_fails_on_its_options_or_backend_makes_no_gallery(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from mssan_infer import BackendUnavailableError, TensorRTOptions

    with pytest.raises(InputError, match="threads"):
        Retriever.load(tiny_bundle, OnnxRuntimeOptions(threads=0), gallery=QdrantEdge(tmp_path / "g"))
    with pytest.raises(InputError, match="SearchOptions"):
        Retriever.load(tiny_bundle, gallery=QdrantEdge(tmp_path / "g"), search={"batch_size": 8})  # type: ignore[arg-type]
    with pytest.raises((BackendUnavailableError, InputError)):
        Retriever.load(tiny_bundle, TensorRTOptions(), gallery=QdrantEdge(tmp_path / "g"))  # no tensorrt here
    assert not (tmp_path / "g").exists()


def test_one_client_per_server_url_is_kept_for_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from mssan_infer.qdrant import places
    from mssan_infer.qdrant.places import _server_client

    fake = types.SimpleNamespace(QdrantClient=lambda **kw: object())  # no server, no connection
    monkeypatch.setattr(places, "import_client", lambda module, package: fake)
    monkeypatch.setattr(places, "_CLIENTS", {})
    a = _server_client(QdrantServer(url="http://127.0.0.1:1"))
    assert _server_client(QdrantServer(url="http://127.0.0.1:1", prefix="other")) is a
    assert _server_client(QdrantServer(url="http://127.0.0.1:2")) is not a


def test_replacing_server_galleries_refuses_a_plain_collection_before_building(tmp_path: Path) -> None:
    from qdrant_client import QdrantClient, models

    from mssan_infer.qdrant.places import replacing_qdrant_galleries

    client = QdrantClient(":memory:")
    client.create_collection(
        "mine_images", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT)
    )
    with pytest.raises(IndexFileError, match="mine_images.*no alias"):
        with replacing_qdrant_galleries(QdrantServer(client=client, prefix="mine"), ["images"]):
            raise AssertionError("nothing may be built")
    assert [c.name for c in client.get_collections().collections] == ["mine_images"]


# ---- a server's rerank inputs: binary payloads, read through a cache on the query node --------------------
@pytest.mark.parametrize("local_dtype, layout", [("float32", "float32"), ("uint8", "int8")])
@pytest.mark.parametrize("cached", [False, True], ids=["payload", "cache"])
def test_a_server_gallery_stores_the_in_memory_layout_and_scores_as_it_does(
    tiny_bundle: Path, data: dict[str, Any], tmp_path: Path, local_dtype: str, layout: str, cached: bool
) -> None:
    from mssan_infer import GalleryOptions, Layout

    mem = _filled(tiny_bundle, data, gallery=GalleryOptions(layout=Layout("float32", layout)))
    srv = _filled(
        tiny_bundle, data, gallery=_server(tmp_path / "cache" if cached else None, local_dtype=local_dtype)
    )
    for q in QUERIES:
        _same(srv.search(text=q, k=8, rerank=N), mem.search(text=q, k=8, rerank=N))
    img = data["feats"][3][data["mask"][3] > 0]
    _same(srv.search(image=img, k=6, rerank=12), mem.search(image=img, k=6, rerank=12))
    mem.close()
    srv.close()


def _node(client: Any, cache: Path, bundle: Path) -> Retriever:
    """A query node: a Retriever on the shared server ``client`` with its own cache folder ``cache``."""
    return Retriever.load(bundle, gallery=QdrantServer(client=client, prefix="g", cache_dir=cache))


def _fetched(r: Retriever) -> int:
    return r.images._server.fetched + r.texts._server.fetched  # type: ignore[union-attr]


def test_the_cache_is_filled_at_index_time_and_a_new_node_fills_its_own_from_the_server(
    tiny_bundle: Path, data: dict[str, Any], memory: Retriever, tmp_path: Path
) -> None:
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    indexer = _node(client, tmp_path / "a", tiny_bundle)
    _filled_into(indexer, data)
    for q in QUERIES:
        _same(indexer.search(text=q, k=8, rerank=N), memory.search(text=q, k=8, rerank=N))
    assert _fetched(indexer) == 0  # every candidate was in the cache the add filled
    fresh = _node(client, tmp_path / "b", tiny_bundle)  # another machine: an empty cache
    _same(fresh.search(text=QUERIES[0], k=8, rerank=N), memory.search(text=QUERIES[0], k=8, rerank=N))
    assert _fetched(fresh) == N  # every candidate was a miss, fetched from the server once
    _same(fresh.search(text=QUERIES[1], k=8, rerank=N), memory.search(text=QUERIES[1], k=8, rerank=N))
    assert _fetched(fresh) == N  # and kept
    again = _node(client, tmp_path / "b", tiny_bundle)  # its next process reads what it kept
    _same(again.search(text=QUERIES[2], k=8, rerank=N), memory.search(text=QUERIES[2], k=8, rerank=N))
    assert _fetched(again) == 0
    for r in (indexer, fresh, again):
        r.close()


def _filled_into(r: Retriever, data: dict[str, Any]) -> None:
    r.add_images(
        data["feats"],
        mask=data["mask"],
        ids=[f"img{i}" for i in range(N)],
        metadata=[_meta(i) for i in range(N)],
    )


def test_a_stale_cache_entry_is_never_used_the_server_decides(
    tiny_bundle: Path, data: dict[str, Any], tmp_path: Path
) -> None:
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    node = _node(client, tmp_path / "node", tiny_bundle)
    writer = _node(client, tmp_path / "writer", tiny_bundle)  # another process, its own cache
    _filled_into(writer, data)
    node.search(text=QUERIES[0], k=8, rerank=N)  # the node caches every image
    before = _fetched(node)
    # the writer replaces img5 with other features under the same id (same point id, another content)
    writer.remove(["img5"])
    other = data["feats"][11][None] * 3.0
    writer.add_images(other, mask=data["mask"][11][None], ids=["img5"], metadata=[_meta(5)])
    truth = Retriever.load(tiny_bundle)
    truth.add_images(
        np.concatenate([data["feats"][:5], data["feats"][6:], other]),
        mask=np.concatenate([data["mask"][:5], data["mask"][6:], data["mask"][11][None]]),
        ids=[f"img{i}" for i in range(N) if i != 5] + ["img5"],
    )
    for q in QUERIES:
        got = {h.id: h.score for h in node.search(text=q, k=N, rerank=N)}
        want = {h.id: h.score for h in truth.search(text=q, k=N, rerank=N)}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[i] for i in want], list(want.values()), atol=1e-5)
    assert _fetched(node) == before + 1  # only the replaced item was fetched again
    for r in (node, writer, truth):
        r.close()


def test_a_node_sharing_the_cache_folder_reads_what_another_wrote_without_asking_the_server(
    tiny_bundle: Path, data: dict[str, Any], memory: Retriever, tmp_path: Path
) -> None:
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    reader = _node(client, tmp_path / "shared", tiny_bundle)  # opened before anything was written
    writer = _node(client, tmp_path / "shared", tiny_bundle)
    _filled_into(writer, data)
    _same(reader.search(text=QUERIES[0], k=8, rerank=N), memory.search(text=QUERIES[0], k=8, rerank=N))
    assert _fetched(reader) == 0  # the writer's segments were picked up on the miss
    reader.close()
    writer.close()


def test_a_damaged_cache_segment_is_skipped_and_its_items_fetched_again(
    tiny_bundle: Path, data: dict[str, Any], memory: Retriever, tmp_path: Path
) -> None:
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    writer = _node(client, tmp_path / "cache", tiny_bundle)
    _filled_into(writer, data)
    writer.close()
    for f in (tmp_path / "cache").glob("g_images_*/seg-*/local.npy"):
        f.write_bytes(f.read_bytes()[:100])  # truncated
    r = _node(client, tmp_path / "cache", tiny_bundle)
    _same(r.search(text=QUERIES[0], k=8, rerank=N), memory.search(text=QUERIES[0], k=8, rerank=N))
    assert _fetched(r) == N
    _same(r.search(text=QUERIES[1], k=8, rerank=N), memory.search(text=QUERIES[1], k=8, rerank=N))
    assert _fetched(r) == N  # the refetched items were kept in a new segment
    r.close()


_CACHE_WRITER = """
import sys
import numpy as np
from qdrant_client import QdrantClient
from mssan_infer import Retriever
from mssan_infer.qdrant.options import QdrantServer
feats = np.load(sys.argv[3])
client = QdrantClient(path=sys.argv[1])
r = Retriever.load(sys.argv[4], gallery=QdrantServer(client=client, prefix="g", cache_dir=sys.argv[2]))
r.add_images(feats, ids=[f"p{i}" for i in range(len(feats))])
r.close()
client.close()
"""


def test_a_cache_another_process_filled_serves_this_one_and_a_damaged_segment_is_refetched(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from qdrant_client import QdrantClient

    from mssan_infer.qdrant.server_locals import LocalsCache

    feats = np.abs(np.random.default_rng(3).standard_normal((12, 5, DV))).astype(np.float32)
    np.save(tmp_path / "feats.npy", feats)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CACHE_WRITER,
            str(tmp_path / "db"),
            str(tmp_path / "cache"),
            str(tmp_path / "feats.npy"),
            str(tiny_bundle),
        ],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    truth = Retriever.load(tiny_bundle)
    truth.add_images(feats, ids=[f"p{i}" for i in range(12)])
    client = QdrantClient(path=str(tmp_path / "db"))
    r = _node(client, tmp_path / "cache", tiny_bundle)
    _same(r.search(text="a red dog", k=12, rerank=12), truth.search(text="a red dog", k=12, rerank=12))
    assert _fetched(r) == 0  # all from the other process's cache
    r.close()
    # a segment whose keys cannot be read is ignored: its items come from the server again
    (folder,) = [
        p
        for p in (tmp_path / "cache").iterdir()
        if p.name.endswith(tuple("0123456789abcdef")) and "images" in p.name
    ]
    for seg in folder.glob("seg-*"):
        (seg / "keys.json").write_text("not json")
    assert len(LocalsCache(folder, DV)) == 0
    r = _node(client, tmp_path / "cache", tiny_bundle)
    _same(r.search(text="a red dog", k=12, rerank=12), truth.search(text="a red dog", k=12, rerank=12))
    assert _fetched(r) == 12
    r.close()
    truth.close()
    client.close()


def test_a_candidate_removed_during_a_search_is_a_clear_error_and_stage1_skips_the_payload(
    tiny_bundle: Path, data: dict[str, Any], tmp_path: Path
) -> None:
    from qdrant_client import QdrantClient

    from mssan_infer.qdrant.server_locals import HASH, PAYLOAD

    client = QdrantClient(":memory:")
    writer = _node(client, tmp_path / "w", tiny_bundle)
    _filled_into(writer, data)
    node = _node(client, tmp_path / "n", tiny_bundle)
    g = node.images
    res = g._store.query(np.ones(g.stage1_dim, np.float32), 3, [], with_locals=False)  # type: ignore[union-attr]
    assert all(PAYLOAD not in pl and HASH in pl for _, _, pl, _ in res)  # ids, scores, small payloads only
    view = g.view()
    rows, _ = view.topk(np.ones((1, g.stage1_dim), np.float32), 5)
    writer.remove([view.ids_at(rows[0][:1])[0]])
    with pytest.raises(IndexFileError, match="removed .* while this search ran; search again"):
        view.gather(rows[0])
    node.close()
    writer.close()


_WRITER = """
import sys
import numpy as np
from mssan_infer.qdrant.options import QdrantEdge
from mssan_infer.qdrant.places import open_qdrant_galleries
g = open_qdrant_galleries(QdrantEdge(sys.argv[1]), ["images"], 8, 4, "b")["images"]
rng = np.random.default_rng(0)
for step in range(10_000):
    ids = [f"s{step}-{j}" for j in range(4)]
    local = rng.normal(size=(4, 3, 4)).astype(np.float32)
    g.add(rng.normal(size=(4, 8)).astype(np.float32), local, np.ones((4, 3), np.float32),
          local @ local.transpose(0, 2, 1), ids=ids)
    print(" ".join(ids), flush=True)           # acknowledged: add() returned
"""


def test_a_killed_process_loses_no_acknowledged_edge_upsert(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path / "shard")], stdout=subprocess.PIPE, text=True, env=env
    )
    acked: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        acked += line.split()
        if len(acked) >= 200:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    acked += proc.stdout.read().split()
    g = open_qdrant_galleries(QdrantEdge(tmp_path / "shard"), ["images"], 8, 4, "b")["images"]
    held = set(g.ids)
    assert len(acked) >= 200 and set(acked) <= held, sorted(set(acked) - held)[:5]
    g.close()


_KILLED_BETWEEN = """
import os, signal, sys
import numpy as np
from mssan_infer.qdrant.options import QdrantEdge
from mssan_infer.qdrant.places import open_qdrant_galleries
g = open_qdrant_galleries(QdrantEdge(sys.argv[1]), ["images"], 8, 4, "b")["images"]
rng = np.random.default_rng(0)
def batch(n):
    local = rng.normal(size=(n, 3, 4)).astype(np.float32)
    gram = local @ local.transpose(0, 2, 1)
    return rng.normal(size=(n, 8)).astype(np.float32), local, np.ones((n, 3), np.float32), gram
g.add(*batch(5), ids=[f"a{j}" for j in range(5)])
g.flush()
g._store.upsert = lambda points: os.kill(os.getpid(), signal.SIGKILL)   # dies between the two writes
g.add(*batch(5), ids=[f"b{j}" for j in range(5)])
"""


def test_a_process_killed_between_the_locals_and_the_points_leaves_the_batch_invisible(
    tmp_path: Path,
) -> None:
    from mssan_infer.qdrant.locals import FOLDER

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_BETWEEN, str(tmp_path / "g")], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    segments = sorted(p.name for p in (tmp_path / "g" / "images" / FOLDER).iterdir())
    assert segments == ["seg-00000000", "seg-00000001"]  # the second batch's locals were written first
    g = open_qdrant_galleries(QdrantEdge(tmp_path / "g"), ["images"], 8, 4, "b")["images"]
    try:
        assert sorted(g.ids) == [f"a{j}" for j in range(5)]  # its points never were: the batch is not there
        rng = np.random.default_rng(1)
        local = rng.normal(size=(2, 3, 4)).astype(np.float32)
        g.add(
            rng.normal(size=(2, 8)).astype(np.float32),
            local,
            np.ones((2, 3), np.float32),
            local @ local.transpose(0, 2, 1),
            ids=["c0", "c1"],
        )
        view = g.view()
        rows, _ = view.topk(np.ones((1, 8), np.float32), 7)
        got = dict(zip(view.ids_at(rows[0]), view.gather(rows[0]).local))
        np.testing.assert_array_equal(got["c1"], local[1])  # the new batch reads its own rows
    finally:
        g.close()


# ---- the CLI -------------------------------------------------------------------------------------------
def test_cli_indexes_into_qdrant_edge_with_metadata_and_searches_with_a_filter(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    import io

    from mssan_infer.cli.main import main

    def cli(*argv: Any) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        return main([str(a) for a in argv], out=out, err=err), out.getvalue(), err.getvalue()

    feats = np.random.default_rng(0).normal(size=(12, 5, DV)).astype(np.float32)
    np.save(tmp_path / "feats.npy", feats)
    (tmp_path / "meta.jsonl").write_text(
        "\n".join(json.dumps({"album": "a" if i < 4 else "b"}) for i in range(12))
    )
    spec = f"qdrant-edge:{tmp_path / 'g'}"
    code, text, err = cli(
        "index",
        "--bundle",
        tiny_bundle,
        "--images",
        tmp_path / "feats.npy",
        "--metadata",
        tmp_path / "meta.jsonl",
        "--gallery",
        spec,
        "--no-progress",
    )
    assert code == 0 and "12 images" in text, err
    code, text, err = cli(
        "search",
        "--bundle",
        tiny_bundle,
        "--gallery",
        spec,
        "a red dog",
        "-k",
        "10",
        "--where",
        '{"album": "a"}',
        "--json",
    )
    assert code == 0, err
    assert sorted(h["id"] for h in json.loads(text)["hits"]) == [0, 1, 2, 3]
    code, _, err = cli("search", "--bundle", tiny_bundle, "--gallery", spec, "a dog", "--where", "[1]")
    assert code == 1 and err.startswith("error: --where must be a JSON object")
    code, _, err = cli("search", "--bundle", tiny_bundle, "a dog")
    assert code == 1 and "--index FOLDER or --gallery" in err
