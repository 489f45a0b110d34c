"""Results people can read: every gallery keeps each item's caption text, source file and metadata, aligned
with its id through adds, removes, views, saves, layout conversion and Qdrant; hits carry them, and
``search --json`` prints them."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from mssan_infer import GalleryOptions, Layout, OnnxRuntimeOptions, Retriever
from mssan_infer.errors import IndexFileError, InputError
from mssan_infer.gallery.base import ItemRecord
from mssan_infer.gallery.folder import load_index, save_index
from mssan_infer.gallery.memory import MemoryGallery
from mssan_infer.qdrant.options import QdrantEdge, QdrantOptions, QdrantServer

from .test_index import D, items

CAPTIONS = [
    "a red dog on the beach",
    "the blue ball near a tree",
    "a man in the street",
    "a small bird",
    "the cat runs in the field",
    "a woman near the house",
]
N = 12


def _records(g: MemoryGallery) -> list[ItemRecord]:
    v = g.view()
    return v.records_at(range(v.n))


def _gallery(options: GalleryOptions | None = None) -> MemoryGallery:
    g = MemoryGallery(2 * D, D, options)
    g.add(
        *items(5, [1, 2, 3, 2, 1]),
        ids=["a", "b", 7, "d", 9],
        texts=["cap a", None, "cap 7", "cap d", "cap 9"],
        sources=["a.jpg", "b.png", None, "d.webp", None],
        metadata=[{"k": 0}, None, {"k": 2}, {"k": 3, "tags": ["x"]}, {}],
    )
    return g


EXPECTED = [
    ItemRecord("a", "cap a", "a.jpg", {"k": 0}),
    ItemRecord("b", None, "b.png", None),
    ItemRecord(7, "cap 7", None, {"k": 2}),
    ItemRecord("d", "cap d", "d.webp", {"k": 3, "tags": ["x"]}),
    ItemRecord(9, "cap 9", None, None),  # an empty metadata reads as None, as in Qdrant
]


# ---- the in-memory gallery ------------------------------------------------------------------------------
def test_records_stay_aligned_with_ids_through_removes_compaction_and_later_adds() -> None:
    g = _gallery()
    assert _records(g) == EXPECTED
    g.remove(["b", 7])  # compacts the segment
    assert _records(g) == [EXPECTED[0], EXPECTED[3], EXPECTED[4]]
    g.add(*items(2, 4, seed=3), ids=["n1", "n2"], texts=["new one", None])  # a new, wider segment
    assert [r.id for r in _records(g)] == ["a", "d", 9, "n1", "n2"]
    assert [r.text for r in _records(g)] == ["cap a", "cap d", "cap 9", "new one", None]
    assert [r.source for r in _records(g)] == ["a.jpg", "d.webp", None, None, None]


def test_a_view_keeps_the_records_of_its_moment() -> None:
    g = _gallery()
    v = g.view()
    g.remove(["a"])
    g.add(*items(1, 2, seed=4), ids=["z"], texts=["later"])
    assert v.records_at(range(v.n)) == EXPECTED
    assert v.records_at([3, 0]) == [EXPECTED[3], EXPECTED[0]]


def test_records_give_a_copy_of_the_metadata() -> None:
    g = _gallery()
    rec = g.view().records_at([3])[0]
    assert rec.metadata is not None
    rec.metadata["tags"].append("changed")  # the caller's copy: the gallery and its filters are untouched
    assert g.view().records_at([3])[0].metadata == {"k": 3, "tags": ["x"]}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"texts": ["one"]}, "got 1 texts for 2 items"),
        ({"sources": [b"a.jpg", None]}, "sources 0 must be a str or None"),
        ({"texts": "ab"}, "texts must be a list"),
    ],
)
def test_bad_texts_or_sources_are_refused_and_nothing_is_added(kwargs: dict[str, Any], match: str) -> None:
    g = MemoryGallery(2 * D, D)
    with pytest.raises(InputError, match=match):
        g.add(*items(2, 2), **kwargs)
    assert len(g) == 0


@pytest.mark.parametrize("mmap", [False, True])
def test_records_survive_save_and_load_with_every_file_hashed(tmp_path: Path, mmap: bool) -> None:
    path = save_index(tmp_path / "idx", {"images": _gallery()}, bundle_id="b1")
    manifest = json.loads((path / "index.json").read_text())
    files = manifest["galleries"]["images"]["files"]
    assert {"text", "source", "meta"} <= set(files)
    assert all(f in manifest["files"] for f in files.values())  # sha256 of each one
    assert json.loads((path / files["text"]).read_text()) == ["cap a", None, "cap 7", "cap d", "cap 9"]
    galleries, _ = load_index(path, bundle_id="b1", options=GalleryOptions(mmap=mmap))
    assert _records(galleries["images"]) == EXPECTED


def test_a_gallery_without_texts_or_sources_writes_no_such_file(tmp_path: Path) -> None:
    g = MemoryGallery(2 * D, D)
    g.add(*items(2, 2))
    path = save_index(tmp_path / "idx", {"texts": g}, bundle_id="b1")
    files = json.loads((path / "index.json").read_text())["galleries"]["texts"]["files"]
    assert not {"text", "source", "meta"} & set(files)
    galleries, _ = load_index(path, bundle_id="b1")
    assert _records(galleries["texts"]) == [ItemRecord(0), ItemRecord(1)]


@pytest.mark.parametrize("layout", ["int8-stage1", "int8"])
def test_records_survive_loading_into_another_layout(tmp_path: Path, layout: str) -> None:
    path = save_index(tmp_path / "idx", {"images": _gallery()}, bundle_id="b1")
    galleries, _ = load_index(path, bundle_id="b1", options=GalleryOptions(layout=layout))
    g = galleries["images"]
    assert g.layout == GalleryOptions(layout=layout).resolved_layout()
    assert _records(g) == EXPECTED
    g.remove(["a"])
    assert _records(g) == EXPECTED[1:]


def test_a_compressed_layout_gallery_keeps_records_through_removes() -> None:
    g = _gallery(GalleryOptions(layout=Layout("int8", "int8")))
    g.remove(["d"])
    assert _records(g) == [EXPECTED[0], EXPECTED[1], EXPECTED[2], EXPECTED[4]]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda texts: texts[:-1], "got 4 texts for 5 items"),
        (lambda texts: [1, *texts[1:]], "texts 0 must be a str or None"),
    ],
    ids=["short", "not-a-str"],
)
def test_an_index_whose_texts_do_not_fit_its_items_is_refused(tmp_path: Path, edit: Any, match: str) -> None:
    from mssan_infer.files import sha256_file

    path = save_index(tmp_path / "idx", {"images": _gallery()}, bundle_id="b1")
    manifest = json.loads((path / "index.json").read_text())
    name = manifest["galleries"]["images"]["files"]["text"]
    (path / name).write_text(json.dumps(edit(json.loads((path / name).read_text()))))
    with pytest.raises(IndexFileError, match="does not match its sha256"):
        load_index(path, bundle_id="b1")
    manifest["files"][name] = sha256_file(path / name)  # a consistent manifest, wrong content
    (path / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFileError, match=match):
        load_index(path, bundle_id="b1")


# ---- the Retriever ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((N, 8, 24))).astype(np.float32)
    mask = (np.arange(8)[None] < rng.integers(2, 9, (N, 1))).astype(np.float32)
    return {"feats": feats, "mask": mask}


def _filled(bundle: Path, data: dict[str, Any], **load: Any) -> Retriever:
    r = Retriever.load(bundle, OnnxRuntimeOptions(threads=1), **load)
    r.add_images(
        data["feats"],
        mask=data["mask"],
        ids=[f"img{i}" for i in range(N)],
        metadata=[{"album": "beach" if i % 2 else "city", "n": i} for i in range(N)],
        sources=[f"photos/{i:03d}.jpg" for i in range(N)],
    )
    r.add_texts(CAPTIONS, metadata=[{"lang": "en"} if i % 2 else None for i in range(len(CAPTIONS))])
    return r


@pytest.fixture(scope="module")
def memory(tiny_bundle: Path, data: dict[str, Any]) -> Iterator[Retriever]:
    r = _filled(tiny_bundle, data)
    yield r
    r.close()


def _check_hits(r: Retriever, data: dict[str, Any], complete: bool = True) -> None:
    """Every hit's text, source and metadata are those its id was added with (and, ``complete``, every
    item is found)."""
    hits = r.search(image=data["feats"][0, : int(data["mask"][0].sum())], k=len(CAPTIONS))
    assert not complete or sorted(h.text or "" for h in hits) == sorted(CAPTIONS)
    for h in hits:
        assert isinstance(h.id, int) and h.text == CAPTIONS[h.id] and h.source is None
        assert h.metadata == ({"lang": "en"} if h.id % 2 else None)
    hits = r.search(text="a red dog", k=N, rerank=5)
    assert not complete or {h.id for h in hits} == {f"img{i}" for i in range(N)}
    for h in hits:
        i = int(str(h.id)[3:])
        assert h.source == f"photos/{i:03d}.jpg" and h.text is None
        assert h.metadata == {"album": "beach" if i % 2 else "city", "n": i}


def test_hits_carry_the_caption_text_the_source_and_the_metadata(
    memory: Retriever, data: dict[str, Any]
) -> None:
    _check_hits(memory, data)
    hits = memory.search(text="a red dog", k=3, where={"album": "beach"})
    assert all(h.metadata is not None and h.metadata["album"] == "beach" for h in hits)


def test_hits_keep_their_records_after_save_and_load(
    memory: Retriever, data: dict[str, Any], tiny_bundle: Path, tmp_path: Path
) -> None:
    memory.save(tmp_path / "index")
    loaded = Retriever.load(tiny_bundle, index=tmp_path / "index")
    _check_hits(loaded, data)
    loaded.close()


def test_captions_added_encoded_keep_no_text_and_images_from_arrays_no_source(
    tiny_bundle: Path, data: dict[str, Any]
) -> None:
    r = Retriever.load(tiny_bundle, OnnxRuntimeOptions(threads=1))
    r.add_texts(r.encode_texts(CAPTIONS[:2]), ids=["e0", "e1"])
    r.add_texts(CAPTIONS[2:3], ids=["t2"])
    r.add_images(data["feats"][:2], mask=data["mask"][:2], ids=["i0", "i1"])
    hits = {h.id: h for h in r.search(image=data["feats"][0], k=3)}
    assert hits["e0"].text is None and hits["e1"].text is None and hits["t2"].text == CAPTIONS[2]
    assert all(h.source is None and h.metadata is None for h in r.search(text="a red dog", k=2))
    with pytest.raises(InputError, match="got 1 sources for 2 items"):
        r.add_images(data["feats"][2:4], ids=["i2", "i3"], sources=["only-one.jpg"])
    assert r.n_images == 2
    r.close()


def test_hits_hash_and_compare_with_their_metadata() -> None:
    from mssan_infer import Hit

    a = Hit("x", 1.0, 0.5, "a cap", None, {"k": [1]})
    assert a == Hit("x", 1.0, 0.5, "a cap", None, {"k": [1]}) and a != Hit("x", 1.0, 0.5, "a cap")
    assert hash(a) == hash(Hit("x", 1.0, 0.5, "a cap"))  # metadata is not hashed: a Hit stays hashable


# ---- Qdrant ----------------------------------------------------------------------------------------------
def _server() -> QdrantServer:
    from qdrant_client import QdrantClient

    return QdrantServer(client=QdrantClient(":memory:"), options=QdrantOptions())


@pytest.mark.parametrize("kind", ["edge", "server"])
def test_qdrant_galleries_return_the_same_records_as_the_in_memory_one(
    tiny_bundle: Path, data: dict[str, Any], memory: Retriever, tmp_path: Path, kind: str
) -> None:
    gallery = QdrantEdge(tmp_path / "edge") if kind == "edge" else _server()
    r = _filled(tiny_bundle, data, gallery=gallery)
    _check_hits(r, data)
    for q in ("a red dog", "the ball"):
        got, want = r.search(text=q, k=4, rerank=6), memory.search(text=q, k=4, rerank=6)
        assert [(h.id, h.text, h.source, h.metadata) for h in got] == [
            (h.id, h.text, h.source, h.metadata) for h in want
        ]
    r.remove(["img0", 1])
    assert "img0" not in {h.id for h in r.search(text="a red dog", k=N)}
    _check_hits(r, data, complete=False)
    r.close()


def test_a_gallery_copied_from_edge_to_a_server_keeps_texts_and_sources(
    tiny_bundle: Path, data: dict[str, Any], memory: Retriever, tmp_path: Path
) -> None:
    from mssan_infer.qdrant.gallery import QdrantGallery, copy_gallery

    edge = _filled(tiny_bundle, data, gallery=QdrantEdge(tmp_path / "edge"))
    server = Retriever.load(tiny_bundle, gallery=_server())
    for name in ("images", "texts"):
        src, dst = getattr(edge, name), getattr(server, name)
        assert isinstance(src, QdrantGallery) and isinstance(dst, QdrantGallery)
        copy_gallery(src, dst)
    _check_hits(server, data)
    edge.close()


# ---- the CLI ---------------------------------------------------------------------------------------------
def test_search_json_prints_text_source_and_metadata_with_null_when_none(
    memory: Retriever, tiny_bundle: Path, tmp_path: Path
) -> None:
    from mssan_infer.cli.main import main

    memory.save(tmp_path / "index")
    out = io.StringIO()
    args = [
        "search",
        "--bundle",
        str(tiny_bundle),
        "--index",
        str(tmp_path / "index"),
        "a red dog",
        "-k",
        "3",
    ]
    assert main([*args, "--json"], out=out) == 0
    hits = json.loads(out.getvalue())["hits"]
    want = memory.search(text="a red dog", k=3)
    assert [h["id"] for h in hits] == [h.id for h in want]
    for got, h in zip(hits, want):
        assert set(got) == {"id", "score", "stage1", "text", "source", "metadata"}
        assert got["text"] is None and got["source"] == h.source and got["metadata"] == h.metadata
    out = io.StringIO()
    assert main(args, out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[1].split() == ["rank", "id", "score", "stage1", "source"]
    assert lines[2].split()[-1] == want[0].source


def test_search_json_of_an_image_prints_the_captions_texts(
    memory: Retriever, data: dict[str, Any], tiny_bundle: Path, tmp_path: Path
) -> None:
    from mssan_infer.cli.main import main

    memory.save(tmp_path / "index")
    np.save(tmp_path / "q.npy", data["feats"][:2])
    out = io.StringIO()
    args = ["search", "--bundle", str(tiny_bundle), "--index", str(tmp_path / "index")]
    assert main([*args, "--image", str(tmp_path / "q.npy"), "--row", "1", "-k", "4", "--json"], out=out) == 0
    hits = json.loads(out.getvalue())["hits"]
    want = memory.search(image=data["feats"][1], k=4)
    assert [(h["id"], h["text"], h["metadata"]) for h in hits] == [(h.id, h.text, h.metadata) for h in want]
    assert all(h["text"] == CAPTIONS[h["id"]] and h["source"] is None for h in hits)


def test_the_cli_table_shows_caption_texts_and_no_column_when_hits_have_none() -> None:
    from mssan_infer import Hit
    from mssan_infer.cli.search import print_hits

    out = io.StringIO()
    print_hits([Hit(3, 0.5, 0.25, "a red dog on the beach"), Hit("x", 0.4, 0.2)], "image: q.jpg", out)
    lines = out.getvalue().splitlines()
    assert lines[1].split() == ["rank", "id", "score", "stage1", "text"]
    assert lines[2].endswith("  a red dog on the beach") and lines[3].split() == [
        "2",
        "x",
        "0.4000",
        "0.2000",
    ]
    out = io.StringIO()
    print_hits([Hit("x", 0.4, 0.2)], "text: 'q'", out)
    assert out.getvalue().splitlines()[1].split() == ["rank", "id", "score", "stage1"]
