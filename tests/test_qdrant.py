"""Galleries in Qdrant (Qdrant Edge in-process, and the server code path through qdrant-client's local
mode) against the in-memory gallery; metadata filters on every gallery."""

from __future__ import annotations

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


def _server(**options: Any) -> QdrantServer:
    from qdrant_client import QdrantClient

    return QdrantServer(client=QdrantClient(":memory:"), options=QdrantOptions(**options))


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


@pytest.fixture(scope="module", params=["edge", "server"])
def qdrant(
    request: pytest.FixtureRequest,
    tiny_bundle: Path,
    data: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Retriever]:
    gallery = QdrantEdge(tmp_path_factory.mktemp("edge")) if request.param == "edge" else _server()
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
            QdrantEdge(tmp_path / "e", QdrantOptions(local_dtype="float16")), ["images"], 8, 4, "bundle-a"
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


@pytest.mark.parametrize(
    "spec, kind, options",
    [
        ("qdrant-edge:/data/g", "edge", {}),
        (
            "qdrant-edge:/data/g?quantization=int8&local_dtype=float16",
            "edge",
            {"quantization": "int8", "local_dtype": "float16"},
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


@pytest.mark.parametrize(
    "spec, match",
    [
        ("qdrant", "expected"),
        ("redis:x", "expected"),
        ("qdrant-edge:/g?colour=red", "unknown option"),
        ("qdrant-edge:/g?exact=maybe", "malformed"),
        ("qdrant-edge:/g?local_dtype=int4", "local_dtype"),
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
        ({"local_dtype": "float16"}, 5e-3),
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
        got = dict(zip(view.ids_at(rows[0]), view.gather(rows[0])[0]))
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
