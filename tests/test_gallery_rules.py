"""One set of rules for every gallery: an index folder, a Qdrant Edge shard and a Qdrant server collection
are extended only with --append, replaced only (and atomically) with --overwrite, and searching, describing or
removing never creates one."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from mssan_infer import Retriever
from mssan_infer.cli.index import run_index
from mssan_infer.cli.main import main
from mssan_infer.cli.remove import run_remove
from mssan_infer.cli.search import run_search
from mssan_infer.errors import IndexFileError, InputError
from mssan_infer.qdrant.options import QdrantEdge, QdrantServer
from mssan_infer.qdrant.places import missing_qdrant_galleries, open_qdrant_galleries

DV = 24


def cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rules")
    rng = np.random.default_rng(0)
    np.save(d / "a.npy", np.abs(rng.normal(size=(6, 4, DV))).astype(np.float32))
    np.save(d / "b.npy", np.abs(rng.normal(size=(4, 4, DV))).astype(np.float32))
    (d / "caps.txt").write_text("a red dog on the beach\na man in the street\n")
    (d / "bad_caps.txt").write_text("a red dog\nquokka zebra\n")  # line 2: no known word
    return d


@pytest.fixture()
def server() -> Iterator[QdrantServer]:
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    yield QdrantServer(client=client)
    client.close()


def _image_ids(bundle: Path, gallery: Any) -> list[Any]:
    r = Retriever.load(bundle, gallery=gallery)
    try:
        return list(r.images.ids)
    finally:
        r.close()


# ---- --append / --overwrite / --new-ids, the same for every gallery -------------------------------------
def test_a_qdrant_gallery_that_holds_items_is_refused_without_append_or_overwrite(
    tiny_bundle: Path, files: Path, tmp_path: Path
) -> None:
    spec = f"qdrant-edge:{tmp_path / 'g'}"
    base = ("index", "--bundle", tiny_bundle, "--images", files / "a.npy", "--gallery", spec, "--no-progress")
    assert cli(*base)[0] == 0
    code, _, err = cli("index", "--bundle", tiny_bundle, "--texts", files / "caps.txt", "--gallery", spec)
    assert code == 1 and err.count("\n") == 1
    assert "already holds 6 images and 0 captions" in err and "--append" in err and "--overwrite" in err
    assert _image_ids(tiny_bundle, spec) == list(range(6))  # nothing added
    code, _, err = cli(*base, "--append")
    assert code == 1 and "are already in --gallery" in err and "--new-ids" in err
    code, text, err = cli(*base, "--append", "--new-ids")
    assert code == 0, err
    assert "indexed 6 images and 0 captions" in text and "it now holds 12 images" in text
    assert _image_ids(tiny_bundle, spec) == list(range(12))


def test_the_same_rules_hold_for_a_qdrant_server(
    tiny_bundle: Path, files: Path, server: QdrantServer
) -> None:
    kw: dict[str, Any] = {"gallery": server, "progress": False}
    assert run_index(tiny_bundle, images=files / "a.npy", **kw).total_images == 6
    with pytest.raises(InputError, match="already holds 6 images"):
        run_index(tiny_bundle, texts=files / "caps.txt", **kw)
    s = run_index(tiny_bundle, images=files / "b.npy", append=True, new_ids=True, **kw)
    assert (s.images, s.total_images) == (4, 10)
    s = run_index(tiny_bundle, images=files / "b.npy", texts=files / "caps.txt", overwrite=True, **kw)
    assert (s.total_images, s.total_texts) == (4, 2)
    assert _image_ids(tiny_bundle, server) == [0, 1, 2, 3]


def test_overwrite_swaps_a_new_qdrant_edge_folder_in_and_leaves_nothing_beside_it(
    tiny_bundle: Path, files: Path, tmp_path: Path
) -> None:
    spec = f"qdrant-edge:{tmp_path / 'g'}"
    assert cli("index", "--bundle", tiny_bundle, "--images", files / "a.npy", "--gallery", spec)[0] == 0
    code, text, err = cli(
        "index", "--bundle", tiny_bundle, "--images", files / "b.npy", "--texts", files / "caps.txt",
        "--gallery", spec, "--overwrite", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert text.strip() == f"indexed 4 images and 2 captions into {spec}"
    assert _image_ids(tiny_bundle, spec) == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no temp or old folder left
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["images", "texts"]


@pytest.mark.parametrize("exchange", [True, False])
def test_an_interrupt_just_after_the_edge_folders_were_swapped_is_no_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    """The replace happened: the new galleries stay, the old ones go, and the caller is told it worked."""
    import os

    from mssan_infer.qdrant.places import replacing_qdrant_galleries

    def shard(folder: Path, text: str) -> None:
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "edge_config.json").write_text(text)

    root = tmp_path / "g"
    shard(root, "old")
    if not exchange:
        monkeypatch.setattr("mssan_infer.files.exchange_dirs", lambda a, b: False)
    real, parent = os.fsync, os.stat(tmp_path).st_ino

    def fsync(fd: int) -> None:  # Ctrl-C while the folder beside the swapped ones is synced
        if os.fstat(fd).st_ino == parent:
            raise KeyboardInterrupt
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with replacing_qdrant_galleries(QdrantEdge(root), ["images"]) as staged:
        assert isinstance(staged, QdrantEdge)
        shard(Path(staged.path), "new")
    monkeypatch.undo()
    assert (root / "images" / "edge_config.json").read_text() == "new"
    with replacing_qdrant_galleries(QdrantEdge(root), ["images"]) as staged:  # clears what the interrupt left
        shard(Path(staged.path), "newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def _killed_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An Edge gallery folder whose replace died between its two renames (no exchange available)."""
    import os

    from mssan_infer.qdrant.places import replacing_qdrant_galleries

    class Died(BaseException):
        pass

    root = tmp_path / "g"
    (root / "images").mkdir(parents=True)
    (root / "images" / "edge_config.json").write_text("old")
    monkeypatch.setattr("mssan_infer.files.exchange_dirs", lambda a, b: False)
    real, calls = os.replace, [0]

    def replace(src: Any, dst: Any) -> None:  # the process dies after the first rename
        calls[0] += 1
        if calls[0] > 1:
            raise Died
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr("shutil.rmtree", lambda *a, **k: None)
    with pytest.raises(Died):
        with replacing_qdrant_galleries(QdrantEdge(root), ["images"]) as staged:
            (Path(staged.path) / "images").mkdir(parents=True)
    monkeypatch.undo()
    assert not root.exists()
    return root


def test_a_replace_killed_between_the_two_renames_is_put_back_by_the_next_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mssan_infer.qdrant.places import replacing_qdrant_galleries

    root = _killed_replace(tmp_path, monkeypatch)
    with pytest.raises(RuntimeError, match="stop"):  # the next overwrite puts the old galleries back first
        with replacing_qdrant_galleries(QdrantEdge(root), ["images"]):
            assert (root / "images" / "edge_config.json").read_text() == "old"
            raise RuntimeError("stop")
    assert (root / "images" / "edge_config.json").read_text() == "old"


def test_a_replace_killed_between_the_two_renames_is_put_back_when_the_galleries_are_next_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mssan_infer.qdrant.places import missing_qdrant_galleries

    root = _killed_replace(tmp_path, monkeypatch)
    assert missing_qdrant_galleries(QdrantEdge(root), ["images"]) == []  # found again, not missing
    assert (root / "images" / "edge_config.json").read_text() == "old"


def test_a_failed_overwrite_keeps_the_previous_gallery(
    tiny_bundle: Path, files: Path, tmp_path: Path, server: QdrantServer
) -> None:
    edge = QdrantEdge(tmp_path / "g")
    for spec in (edge, server):
        run_index(tiny_bundle, images=files / "a.npy", gallery=spec, progress=False)
        with pytest.raises(InputError, match="vocabulary"):  # fails after the new images were added
            run_index(
                tiny_bundle,
                images=files / "b.npy",
                texts=files / "bad_caps.txt",
                gallery=spec,
                overwrite=True,
                progress=False,
            )
        assert _image_ids(tiny_bundle, spec) == list(range(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
    names = {c.name for c in server.client.get_collections().collections}
    assert len(names) == 2  # the images and texts collections; the new ones were deleted


def test_a_server_overwrite_moves_the_alias_so_open_replicas_see_the_new_gallery(
    tiny_bundle: Path, files: Path, server: QdrantServer
) -> None:
    run_index(tiny_bundle, images=files / "a.npy", gallery=server, progress=False)
    replica = Retriever.load(tiny_bundle, gallery=server)  # opened before the switch, e.g. a Triton model
    before = {c.name for c in server.client.get_collections().collections}
    run_index(tiny_bundle, images=files / "b.npy", gallery=server, overwrite=True, progress=False)
    after = {c.name for c in server.client.get_collections().collections}
    assert len(after) == 2 and not before & after  # new collections; the old ones are deleted
    aliases = {a.alias_name: a.collection_name for a in server.client.get_aliases().aliases}
    assert set(aliases) == {"mssan_images", "mssan_texts"} and set(aliases.values()) == after
    assert replica.n_images == 4 and [h.id for h in replica.search(text="a red dog", k=10)] != []
    replica.close()


def test_overwrite_refuses_a_folder_that_holds_other_things_than_galleries(
    tiny_bundle: Path, files: Path, tmp_path: Path
) -> None:
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "thesis.tex").write_text("keep me")
    spec = f"qdrant-edge:{tmp_path / 'g'}"
    code, _, err = cli(
        "index", "--bundle", tiny_bundle, "--images", files / "a.npy", "--gallery", spec, "--overwrite"
    )
    assert code == 1 and "holds other things than Qdrant Edge galleries (thesis.tex)" in err
    assert (tmp_path / "g" / "thesis.tex").read_text() == "keep me"


# ---- nothing creates a gallery but `index` ----------------------------------------------------------------
def test_search_remove_and_a_mistyped_gallery_create_nothing(
    tiny_bundle: Path, tmp_path: Path, server: QdrantServer
) -> None:
    spec = f"qdrant-edge:{tmp_path / 'MISTYPED'}"
    code, _, err = cli("search", "--bundle", tiny_bundle, "--gallery", spec, "a red dog")
    assert code == 1 and "no mssan gallery there" in err and "none was created" in err
    code, _, err = cli("remove", "--bundle", tiny_bundle, "--gallery", spec, "--ids", "3")
    assert code == 1 and "no mssan gallery there" in err
    assert not (tmp_path / "MISTYPED").exists()
    with pytest.raises(IndexFileError, match="none was created"):
        run_search(tiny_bundle, text="a red dog", gallery=server)
    with pytest.raises(IndexFileError, match="none was created"):
        open_qdrant_galleries(dataclasses.replace(server, create=False), ["images"], 64, 32, "b")
    assert server.client.get_collections().collections == []
    assert missing_qdrant_galleries(server, ["images", "texts"]) == ["images", "texts"]


def test_remove_works_on_qdrant_galleries_too(tiny_bundle: Path, files: Path, tmp_path: Path) -> None:
    spec = QdrantEdge(tmp_path / "g")
    run_index(tiny_bundle, images=files / "a.npy", texts=files / "caps.txt", gallery=spec, progress=False)
    with pytest.raises(InputError, match="in both the image and the caption gallery"):
        run_remove(tiny_bundle, ids=["1"], gallery=spec)
    s = run_remove(tiny_bundle, ids=["1", "4"], kind="images", gallery=spec)
    assert (s.images, s.texts, s.total_images, s.total_texts) == (2, 0, 4, 2)
    assert _image_ids(tiny_bundle, spec) == [0, 2, 3, 5]


# ---- a failed run changes nothing, in Qdrant too ---------------------------------------------------------
def _held(bundle: Path, spec: Any) -> tuple[int, int]:
    """(images, captions) in the galleries of ``spec``; (0, 0) where there are none."""
    if missing_qdrant_galleries(spec, ["images", "texts"]):
        return 0, 0
    r = Retriever.load(bundle, gallery=dataclasses.replace(spec, create=False))
    try:
        return r.n_images, r.n_texts
    finally:
        r.close()


def test_a_bad_caption_or_caption_metadata_is_refused_before_any_image_reaches_qdrant(
    tiny_bundle: Path, files: Path, tmp_path: Path, server: QdrantServer
) -> None:
    (tmp_path / "nan.jsonl").write_text('{"a": 1}\n{"a": NaN}\n')
    (tmp_path / "reserved.jsonl").write_text('{"a": 1}\n{"mssan_id": 2}\n')
    bad = [
        ({"texts": files / "bad_caps.txt"}, "vocabulary"),
        ({"texts": files / "caps.txt", "text_metadata": tmp_path / "nan.jsonl"}, "line 2: not JSON"),
        ({"texts": files / "caps.txt", "text_metadata": tmp_path / "reserved.jsonl"}, "reserved"),
    ]
    for spec in (QdrantEdge(tmp_path / "g"), server):
        for inputs, match in bad:  # into new galleries
            with pytest.raises(InputError, match=match):
                run_index(tiny_bundle, images=files / "a.npy", gallery=spec, progress=False, **inputs)
            assert _held(tiny_bundle, spec) == (0, 0)
        run_index(tiny_bundle, images=files / "a.npy", gallery=spec, progress=False)
        for inputs, match in bad:  # appended to galleries that hold items
            with pytest.raises(InputError, match=match):
                run_index(
                    tiny_bundle, images=files / "b.npy", gallery=spec, append=True, new_ids=True,
                    progress=False, **inputs,
                )  # fmt: skip
            assert _held(tiny_bundle, spec) == (6, 0)
    code, _, err = cli(
        "index", "--bundle", tiny_bundle, "--images", files / "b.npy", "--texts", files / "bad_caps.txt",
        "--gallery", f"qdrant-edge:{tmp_path / 'g'}", "--append", "--new-ids", "--no-progress",
    )  # fmt: skip
    assert code == 1 and err.count("\n") == 1 and "caption 1 'quokka zebra'" in err
    assert _held(tiny_bundle, QdrantEdge(tmp_path / "g")) == (6, 0)


# ---- --gallery and --stage1 in flag words ------------------------------------------------------------------
@pytest.mark.parametrize("command", ["index", "search", "remove"])
@pytest.mark.parametrize(
    "spec, message",
    [
        ("qdrant:?prefix=x", "--gallery 'qdrant:?prefix=x': no server URL after 'qdrant:'"),
        (
            "qdrant-edge:?exact=true",
            "--gallery 'qdrant-edge:?exact=true': no folder path after 'qdrant-edge:'",
        ),
        ("qdrant-edge:g?quantization=fp16", "option quantization=fp16: must be none or int8"),
        ("qdrant-edge:g?local_dtype=int4", "option local_dtype=int4: must be float32 or uint8"),
        (
            "qdrant-edge:g?local_dtype=float16",
            "option local_dtype=float16: must be float32 or uint8",
        ),  # removed
        ("qdrant-edge:g?hnsw_m=0", "option hnsw_m=0: must be a positive int"),
        ("qdrant-edge:g?colour=red", "unknown option 'colour'; the options are prefix, exact"),
    ],
)
def test_a_bad_gallery_spec_is_refused_in_the_flags_words(
    tiny_bundle: Path, files: Path, tmp_path: Path, command: str, spec: str, message: str
) -> None:
    argv = {
        "index": ("--images", files / "a.npy"),
        "search": ("a red dog",),
        "remove": ("--ids", "1"),
    }[command]
    spec = spec.replace("qdrant-edge:g?", f"qdrant-edge:{tmp_path / 'g'}?")
    code, _, err = cli(command, "--bundle", tiny_bundle, "--gallery", spec, *argv)
    assert code == 1 and err.count("\n") == 1 and message in err, err
    for python in ("QdrantServer", "url=", "None", "client="):
        assert python not in err
    assert list(tmp_path.iterdir()) == []


def test_stage1_is_refused_with_a_qdrant_gallery(tiny_bundle: Path, files: Path, tmp_path: Path) -> None:
    spec = f"qdrant-edge:{tmp_path / 'g'}"
    assert cli("index", "--bundle", tiny_bundle, "--images", files / "a.npy", "--gallery", spec)[0] == 0
    for method in ("faiss-ivf", "numpy"):
        code, _, err = cli("search", "--bundle", tiny_bundle, "--gallery", spec, "a dog", "--stage1", method)
        assert code == 1 and "--stage1 is for an index folder" in err and "--gallery" in err
    assert cli("search", "--bundle", tiny_bundle, "--gallery", spec, "a dog")[0] == 0


def test_remove_from_qdrant_loads_no_graph(
    tiny_bundle: Path, files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mssan_infer.retriever

    spec = QdrantEdge(tmp_path / "g")
    run_index(tiny_bundle, images=files / "a.npy", texts=files / "caps.txt", gallery=spec, progress=False)

    def no_backend(*a: Any, **k: Any) -> Any:
        raise AssertionError("remove made a backend")

    with monkeypatch.context() as m:
        m.setattr(mssan_infer.retriever, "create_backend", no_backend)
        s = run_remove(tiny_bundle, ids=["1", "4"], kind="images", gallery=spec)
    assert (s.images, s.texts, s.total_images, s.total_texts) == (2, 0, 4, 2)
    assert _image_ids(tiny_bundle, spec) == [0, 2, 3, 5]
