"""Faults: a save killed with SIGKILL, a disk that fills up mid-save, and concurrent adds/removes/searches."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mssan_infer import Retriever, SearchOptions
from mssan_infer.errors import IndexFileError, IndexWriteError
from mssan_infer.gallery.folder import load_index, save_index
from mssan_infer.gallery.memory import MemoryGallery

ROOT = Path(__file__).resolve().parents[1]
D, P = 32, 12


def state(seed: int, n: int) -> MemoryGallery:
    """Gallery number ``seed``: ``n`` items whose arrays and ids depend only on ``seed``."""
    rng = np.random.default_rng(seed)
    g = MemoryGallery(2 * D, D)
    local = rng.normal(size=(n, P, D)).astype(np.float32)
    g.add(
        rng.normal(size=(n, 2 * D)).astype(np.float32),
        local,
        np.ones((n, P), np.float32),
        local @ local.transpose(0, 2, 1),
        ids=[f"s{seed}-{i}" for i in range(n)],
    )
    return g


def _same(a: MemoryGallery, b: MemoryGallery) -> bool:
    return a.ids == b.ids and all(np.array_equal(x, y) for x, y in zip(a.view().arrays(), b.view().arrays()))


CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from tests.test_faults import state
from mssan_infer.gallery.folder import save_index
states = [state(1, int(sys.argv[3])), state(2, int(sys.argv[3]) + 7)]
print("ready", flush=True)
k = 0
while True:
    save_index(sys.argv[2], {"images": states[k % 2]}, bundle_id="b")
    k += 1
"""


def test_sigkill_during_save_leaves_the_old_or_the_new_index_loadable_and_intact(tmp_path: Path) -> None:
    n = 1500  # ~11 MB per save: kills land inside writes
    path = tmp_path / "idx"
    expected = [state(0, 3), state(1, n), state(2, n + 7)]
    save_index(path, {"images": expected[0]}, bundle_id="b")
    rnd = random.Random(0)
    outcomes = []
    for kill in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(ROOT), str(path), str(n)], stdout=subprocess.PIPE, cwd=ROOT
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
            time.sleep(rnd.uniform(0.05, 0.6))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        galleries, _ = load_index(path, bundle_id="b")  # verifies every sha256
        matches = [i for i, g in enumerate(expected) if _same(galleries["images"], g)]
        assert len(matches) == 1, f"kill {kill}: the index equals none of the saved states"
        outcomes.append(matches[0])
    assert any(o in (1, 2) for o in outcomes)  # the children did replace the first index


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, target: str, after: int) -> list[int]:
    """Make ``target`` (``module.attr``) raise ENOSPC from its ``after``-th call on."""
    module_name, attr = target.rsplit(".", 1)
    module = sys.modules[module_name]
    real = getattr(module, attr)
    calls = [0]

    def failing(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        if calls[0] >= after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(module, attr, failing)
    return calls


@pytest.mark.parametrize(
    "target, after",
    [
        ("mssan_infer.gallery.folder.write_npy_parts", 1),  # the first array
        ("mssan_infer.gallery.folder.write_npy_parts", 3),  # half way through a gallery
        ("mssan_infer.gallery.folder.write_npy_parts", 6),  # in the second gallery
        ("os.fsync", 4),  # flushing an array
        ("mssan_infer.gallery.folder.sha256_file", 2),  # reading back for the manifest
        ("json.dump", 3),  # writing the manifest (ids are json.dump'ed first)
        ("os.replace", 1),  # putting the new index in place (fallback path)
    ],
)
@pytest.mark.parametrize("existing", [True, False])
def test_a_failed_write_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, after: int, existing: bool
) -> None:
    path = tmp_path / "idx"
    if existing:
        save_index(path, {"images": state(0, 5), "texts": state(3, 2)}, bundle_id="b")
    before = {p.name: p.read_bytes() for p in path.iterdir()} if existing else None
    if target == "os.replace":
        monkeypatch.setattr("mssan_infer.files.exchange_dirs", lambda a, b: False)
    calls = _fail_on_call(monkeypatch, target, after)
    with pytest.raises(IndexWriteError) as info:
        save_index(path, {"images": state(1, 40), "texts": state(2, 9)}, bundle_id="b")
    monkeypatch.undo()
    assert calls[0] >= after and isinstance(info.value, OSError) and info.value.__cause__ is not None
    assert "unchanged" in str(info.value) and "No space left" in str(info.value)
    if existing:
        assert {p.name: p.read_bytes() for p in path.iterdir()} == before
        galleries, _ = load_index(path, bundle_id="b")
        assert _same(galleries["images"], state(0, 5))
    else:
        assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["idx"] if existing else [])  # no temp folder left


def test_a_save_killed_between_the_two_renames_is_rolled_back_on_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where directories cannot be swapped atomically, the previous index is put back by the next load."""
    path = tmp_path / "idx"
    save_index(path, {"images": state(0, 5)}, bundle_id="b")
    monkeypatch.setattr("mssan_infer.files.exchange_dirs", lambda a, b: False)
    _die_after_renames(monkeypatch, 1)
    with pytest.raises(_Died):
        save_index(path, {"images": state(1, 9)}, bundle_id="b")
    monkeypatch.undo()
    assert not path.exists() and len(list(tmp_path.glob(".idx.old-*"))) == 1
    galleries, _ = load_index(path, bundle_id="b")
    assert _same(galleries["images"], state(0, 5))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".idx.tmp-")) == ["idx"]


class _Died(BaseException):
    """Stands for the process dying: raised by every later call, so nothing else runs."""


def _die_after_renames(monkeypatch: pytest.MonkeyPatch, renames: int) -> None:
    """Let ``renames`` calls of ``os.replace`` through, then die (and a dead process cleans nothing up)."""
    real = os.replace
    calls = [0]

    def replace(src: Any, dst: Any) -> None:
        calls[0] += 1
        if calls[0] > renames:
            raise _Died
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr("shutil.rmtree", lambda *a, **k: None)


def _interrupt_when_syncing(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[int]:
    """Ctrl-C lands while ``folder`` is fsync'd (after a swap beside it committed); returns the count."""
    real, target, hits = os.fsync, os.stat(folder).st_ino, [0]

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_ino == target:
            hits[0] += 1
            raise KeyboardInterrupt
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return hits


@pytest.mark.parametrize("exchange", [True, False])
def test_an_interrupt_just_after_the_swap_is_no_failure_the_new_index_is_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    path = tmp_path / "idx"
    save_index(path, {"images": state(0, 5)}, bundle_id="b")
    if not exchange:
        monkeypatch.setattr("mssan_infer.files.exchange_dirs", lambda a, b: False)
    hits = _interrupt_when_syncing(monkeypatch, tmp_path)
    save_index(path, {"images": state(1, 9)}, bundle_id="b")  # returns: the replace happened
    monkeypatch.undo()
    assert hits[0] == 1
    galleries, _ = load_index(path, bundle_id="b")
    assert _same(galleries["images"], state(1, 9))
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


# ---- the one folder swap (mssan_infer.files.swap_in / recover_swap) ------------------------------
def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "marker").write_text(text)
    return path


def _text(path: Path) -> str:
    return (path / "marker").read_text()


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("existing", [True, False])
def test_swap_in_replaces_the_folder_and_leaves_nothing_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool, existing: bool
) -> None:
    from mssan_infer.files import swap_in

    if not exchange:
        monkeypatch.setattr("mssan_infer.files.exchange_dirs", lambda a, b: False)
    dst = _folder(tmp_path / "d", "old") if existing else tmp_path / "d"
    swap_in(_folder(tmp_path / ".d.tmp-1", "new"), dst)
    assert _text(dst) == "new" and [p.name for p in tmp_path.iterdir()] == ["d"]


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_in_replaces_a_folder_that_another_save_put_there_after_its_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    """Two first saves of one index at once: both see no folder, the second's rename meets the first's
    folder (ENOTEMPTY) and replaces it like any existing index instead of failing."""
    from mssan_infer.files import swap_in

    if not exchange:
        monkeypatch.setattr("mssan_infer.files.exchange_dirs", lambda a, b: False)
    dst = _folder(tmp_path / "d", "first save")
    real = os.path.lexists
    seen = [False]

    def lexists(p: Any) -> bool:  # the check ran before the other save's folder arrived
        if Path(p) == dst and not seen[0]:
            seen[0] = True
            return False
        return real(p)

    monkeypatch.setattr(os.path, "lexists", lexists)
    swap_in(_folder(tmp_path / ".d.tmp-1", "second save"), dst)
    monkeypatch.undo()
    assert seen[0] and _text(dst) == "second save" and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_swap_in_puts_the_previous_folder_back_when_the_second_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mssan_infer.files import swap_in

    monkeypatch.setattr("mssan_infer.files.exchange_dirs", lambda a, b: False)
    dst, tmp = _folder(tmp_path / "d", "old"), _folder(tmp_path / ".d.tmp-1", "new")
    real, calls = os.replace, [0]

    def replace(src: Any, dst_: Any) -> None:  # the first rename works, the second fails
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst_)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        swap_in(tmp, dst)
    monkeypatch.undo()
    assert _text(dst) == "old" and _text(tmp) == "new"  # the caller removes tmp
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.tmp-1", "d"]


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_in_takes_an_interrupt_right_after_the_commit_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    """A Ctrl-C that lands after the folder moved (before the code knew) is no failure: dst holds the new
    folder, the previous one is deleted, and nothing is raised."""
    import mssan_infer.files as files

    dst, tmp = _folder(tmp_path / "d", "old"), _folder(tmp_path / ".d.tmp-1", "new")
    if exchange:
        real = files.exchange_dirs

        def exchange_then_interrupt(a: Path, b: Path) -> bool:
            assert real(a, b)
            raise KeyboardInterrupt

        monkeypatch.setattr(files, "exchange_dirs", exchange_then_interrupt)
    else:
        monkeypatch.setattr(files, "exchange_dirs", lambda a, b: False)
        real_replace, calls = os.replace, [0]

        def replace(src: Any, dst_: Any) -> None:
            calls[0] += 1
            real_replace(src, dst_)
            if calls[0] == 2:
                raise KeyboardInterrupt

        monkeypatch.setattr(os, "replace", replace)
    files.swap_in(tmp, dst)
    monkeypatch.undo()
    assert _text(dst) == "new" and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_recover_swap_puts_back_a_complete_aside_and_deletes_finished_leftovers(tmp_path: Path) -> None:
    from mssan_infer.files import recover_swap

    dst = tmp_path / "d"
    _folder(tmp_path / ".d.old-aaa", "old")
    (tmp_path / ".d.old-bbb").mkdir()  # no marker: not a complete folder
    assert recover_swap(dst, "marker") and _text(dst) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the incomplete one went too
    _folder(tmp_path / ".d.old-ccc", "older")
    _folder(tmp_path / ".d.trash-ddd", "deleted half way")
    _folder(tmp_path / ".d.tmp-eee", "another save, still writing")
    _folder(tmp_path / ".dd.old-fff", "another folder's")
    assert not recover_swap(dst, "marker") and _text(dst) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.tmp-eee", ".dd.old-fff", "d"]
    assert not recover_swap(tmp_path / "missing", "marker") and not recover_swap(tmp_path / "x" / "y")


def test_load_of_a_missing_index_without_leftovers_is_still_an_error(tmp_path: Path) -> None:
    with pytest.raises(IndexFileError, match="not an mssan index"):
        load_index(tmp_path / "idx")


# ---- concurrency --------------------------------------------------------------------------------
QUERIES = ["a red dog on the beach", "the blue ball near a tree", "a man in the street", "woman", "a big car"]
CAPS = ["a red dog", "a blue ball", "a man sits", "a white house", "a black bird", "the green field"]


def test_concurrent_adds_removes_and_searches_never_return_torn_results(tiny_bundle: Path) -> None:
    """Every hit's id, score and stage-1 score equal a single-threaded exhaustive recomputation."""
    rng = np.random.default_rng(0)
    n = 48
    feats = rng.normal(size=(n, 6, 24)).astype(np.float32)
    mask = np.ones((n, 6), np.float32)
    mask[::4, 3:] = 0
    ref = Retriever.load(tiny_bundle)
    ref.add_images(feats, mask=mask, ids=[f"i{j}" for j in range(n)])
    ref.add_texts(CAPS * 4, ids=[f"c{j}" for j in range(len(CAPS) * 4)])
    truth_t2i = {q: {h.id: (h.score, h.stage1) for h in ref.search(text=q, k=n, rerank=n)} for q in QUERIES}
    truth_i2t = {
        j: {h.id: (h.score, h.stage1) for h in ref.search(image=feats[j][mask[j] > 0], k=24, rerank=24)}
        for j in range(4)
    }

    r = Retriever.load(tiny_bundle, search=SearchOptions(scorer_batch=7))  # several scorer calls per search
    r.add_images(feats[:8], mask=mask[:8], ids=[f"i{j}" for j in range(8)])
    r.add_texts(CAPS[:2], ids=["c0", "c1"])
    stop = threading.Event()
    errors: list[BaseException] = []
    checked = [0]

    def writer() -> None:
        try:
            for a in range(8, n, 4):
                r.add_images(feats[a : a + 4], mask=mask[a : a + 4], ids=[f"i{j}" for j in range(a, a + 4)])
                if a % 12 == 0:
                    r.remove([f"i{a}"], gallery="images")
                    r.add_images(feats[a : a + 1], mask=mask[a : a + 1], ids=[f"i{a}"])
            for c in range(2, len(CAPS) * 4):
                r.add_texts([CAPS[c % len(CAPS)]], ids=[f"c{c}"])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            stop.set()

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while not stop.is_set() or checked[0] < 40:
                if rnd.random() < 0.7:
                    q, rerank = rnd.choice(QUERIES), rnd.choice([0, 5, 20, 100])
                    hits, truth = r.search(text=q, k=5, rerank=rerank), truth_t2i[q]
                else:
                    j, rerank = rnd.randrange(4), 10
                    hits, truth = r.search(image=feats[j][mask[j] > 0], k=3, rerank=rerank), truth_i2t[j]
                assert hits and len({h.id for h in hits}) == len(hits)
                for h in hits:
                    score, stage1 = truth[h.id]
                    assert abs(h.stage1 - stage1) < 1e-4, (h, stage1)
                    if rerank == 0:  # stage 1 only: the final score is the stage-1 score
                        assert h.score == h.stage1, h
                    else:  # every returned hit was reranked: the full score
                        assert abs(h.score - score) < 1e-4, (h, score)
                checked[0] += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(s,)) for s in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert checked[0] >= 40 and r.n_images == n and r.n_texts == len(CAPS) * 4
    final = r.search(text=QUERIES[0], k=n, rerank=n)
    assert [(h.id, round(h.score, 4)) for h in final] == [
        (h.id, round(h.score, 4)) for h in ref.search(text=QUERIES[0], k=n, rerank=n)
    ]


def test_concurrent_saves_and_adds_always_leave_a_loadable_index(tiny_bundle: Path, tmp_path: Path) -> None:
    r = Retriever.load(tiny_bundle)
    rng = np.random.default_rng(1)
    errors: list[BaseException] = []

    def add() -> None:
        try:
            for j in range(20):
                r.add_images(rng.normal(size=(2, 4, 24)).astype(np.float32), ids=[f"a{j}", f"b{j}"])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def save(k: int) -> None:
        try:
            for _ in range(5):
                r.save(tmp_path / "idx")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=add)] + [threading.Thread(target=save, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    loaded = Retriever.load(tiny_bundle, index=tmp_path / "idx")
    ids = loaded.images.ids
    assert ids == r.images.ids[: len(ids)]  # a prefix of the additions, in order
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]
    json.loads((tmp_path / "idx" / "index.json").read_text())
