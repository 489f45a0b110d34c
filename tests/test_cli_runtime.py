"""`python -m mssan_infer index|search|info` end to end on a tiny bundle."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mssan_infer.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(request: pytest.FixtureRequest, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return Path(request.getfixturevalue("tiny_bundle"))
    except pytest.FixtureLookupError:
        from export.api import export_bundle

        return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("cli") / "bundle")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli-data")
    np.save(d / "feats.npy", np.random.default_rng(0).normal(size=(30, 6, 24)).astype(np.float32))
    (d / "ids.txt").write_text("\n".join(f"photo_{i:03d}" for i in range(30)) + "\n")
    (d / "caps.txt").write_text("a red dog on the beach\na man in the street\nthe blue ball\n")
    return d


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def index(bundle: Path, files: Path) -> Path:
    out = files / "index"
    code, text, err = cli("index", "--bundle", bundle, "--images", files / "feats.npy", "--ids", files / "ids.txt",
                          "--texts", files / "caps.txt", "--out", out, "--no-progress")
    assert code == 0, err
    assert "30 images and 3 captions" in text
    return out


def test_search_by_text_prints_a_ranked_table_of_image_ids(bundle: Path, index: Path) -> None:
    code, text, _ = cli("search", "--bundle", bundle, "--index", index, "a dog on the beach", "-k", "5", "--rerank", "20")
    assert code == 0
    lines = text.strip().splitlines()
    assert lines[0] == "text: 'a dog on the beach'" and "score" in lines[1] and len(lines) == 2 + 5
    assert all(line.split()[1].startswith("photo_") for line in lines[2:])


def test_search_json_equals_the_library_result(bundle: Path, index: Path) -> None:
    from mssan_infer import Retriever

    code, text, _ = cli("search", "--bundle", bundle, "--index", index, "a red dog", "-k", "4", "--json")
    assert code == 0
    payload = json.loads(text)
    ref = Retriever.load(bundle, index=index).search(text="a red dog", k=4, rerank=100)
    assert [h["id"] for h in payload["hits"]] == [h.id for h in ref]
    assert np.allclose([h["score"] for h in payload["hits"]], [h.score for h in ref], atol=1e-6)


def test_search_by_image_row_ranks_captions(bundle: Path, index: Path, files: Path) -> None:
    code, text, _ = cli("search", "--bundle", bundle, "--index", index, "--image", files / "feats.npy", "--row", "3",
                        "-k", "3", "--json")
    assert code == 0
    hits = json.loads(text)["hits"]
    assert sorted(h["id"] for h in hits) == [0, 1, 2]


def test_index_append_adds_without_rebuilding(bundle: Path, files: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    assert cli("index", "--bundle", bundle, "--texts", files / "caps.txt", "--out", out, "--no-progress")[0] == 0
    code, text, _ = cli("index", "--bundle", bundle, "--images", files / "feats.npy", "--out", out, "--append", "--no-progress")
    assert code == 0 and "30 images and 3 captions" in text


def test_index_with_a_layout_saves_it_and_search_uses_it(bundle: Path, files: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx8"
    code, _, err = cli("index", "--bundle", bundle, "--images", files / "feats.npy", "--out", out, "--layout", "int8",
                       "--no-progress")
    assert code == 0, err
    assert json.loads((out / "index.json").read_text())["galleries"]["images"]["layout"]["name"] == "int8"
    code, text, _ = cli("search", "--bundle", bundle, "--index", out, "a red dog", "-k", "3", "--json")
    assert code == 0 and len(json.loads(text)["hits"]) == 3


def test_info_describes_bundle_and_index(bundle: Path, index: Path) -> None:
    code, text, _ = cli("info", "--bundle", bundle, "--index", index)
    assert code == 0 and "D=32" in text and "matches this bundle" in text and "30 items" in text
    code, text, _ = cli("info", "--bundle", bundle, "--index", index, "--json")
    info = json.loads(text)
    assert info["index"]["matches_bundle"] and info["index"]["galleries"]["images"]["n"] == 30


@pytest.mark.parametrize(
    "argv, match",
    [
        (["search", "--index", "{index}", "zebra"], "vocabulary"),
        (["search", "--index", "{index}", "a dog", "-k", "0"], "k must be"),
        (["search", "--index", "{index}", "--image", "{feats}", "--row", "99"], "outside"),
        (["search", "--index", "{missing}", "a dog"], "not an mssan index"),
        (["index", "--out", "{missing}"], "nothing to index"),
    ],
)
def test_errors_exit_1_with_one_line(bundle: Path, index: Path, files: Path, argv: list[str], match: str) -> None:
    subs = {"{index}": str(index), "{feats}": str(files / "feats.npy"), "{missing}": str(files / "nope")}
    args = [subs.get(a, a) for a in argv]
    code, _, err = cli(args[0], "--bundle", bundle, *args[1:])
    assert code == 1 and match in err and err.startswith("error: ") and err.count("\n") == 1


def test_module_entry_point_exits_1_on_a_missing_bundle(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "mssan_infer", "info", "--bundle", str(tmp_path / "nothing")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "does not exist" in res.stderr
