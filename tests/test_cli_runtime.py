"""`python -m mssan_infer index|search|info` end to end on a tiny bundle."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mssan_infer.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle


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
    code, text, err = cli(
        "index",
        "--bundle",
        bundle,
        "--images",
        files / "feats.npy",
        "--ids",
        files / "ids.txt",
        "--texts",
        files / "caps.txt",
        "--out",
        out,
        "--no-progress",
    )
    assert code == 0, err
    assert "30 images and 3 captions" in text
    return out


def test_search_by_text_prints_a_ranked_table_of_image_ids(bundle: Path, index: Path) -> None:
    code, text, _ = cli(
        "search", "--bundle", bundle, "--index", index, "a dog on the beach", "-k", "5", "--rerank", "20"
    )
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
    code, text, _ = cli(
        "search",
        "--bundle",
        bundle,
        "--index",
        index,
        "--image",
        files / "feats.npy",
        "--row",
        "3",
        "-k",
        "3",
        "--json",
    )
    assert code == 0
    hits = json.loads(text)["hits"]
    assert sorted(h["id"] for h in hits) == [0, 1, 2]


def test_index_append_adds_without_rebuilding(bundle: Path, files: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    assert (
        cli("index", "--bundle", bundle, "--texts", files / "caps.txt", "--out", out, "--no-progress")[0] == 0
    )
    code, text, _ = cli(
        "index",
        "--bundle",
        bundle,
        "--images",
        files / "feats.npy",
        "--out",
        out,
        "--append",
        "--no-progress",
    )
    assert code == 0 and "30 images and 3 captions" in text


def test_index_with_a_layout_saves_it_and_search_uses_it(bundle: Path, files: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx8"
    code, _, err = cli(
        "index",
        "--bundle",
        bundle,
        "--images",
        files / "feats.npy",
        "--out",
        out,
        "--layout",
        "int8",
        "--no-progress",
    )
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


def test_info_reports_parity_per_precision(bundle: Path, tmp_path: Path) -> None:
    import shutil

    code, text, _ = cli("info", "--bundle", bundle, "--json")
    parity = json.loads(text)["parity"]
    manifest = json.loads((bundle / "manifest.json").read_text())["parity"]
    assert code == 0 and set(parity) == set(manifest) and "fp32" in parity
    for precision, p in parity.items():
        assert p["passed"] is True and p["failures"] == 0 and p["reference"] == "pytorch fp32"
        assert p["atol"] == manifest[precision]["tolerance"]["atol"]
        assert p["max_abs"] == max(manifest[precision]["max_abs"].values()) and 0 < p["max_abs"] <= p["atol"]
    code, text, _ = cli("info", "--bundle", bundle)
    assert "parity     fp32 passed, max abs" in text
    copy = shutil.copytree(bundle, tmp_path / "b")  # a --no-verify bundle whose fp32 check failed
    m = json.loads((copy / "manifest.json").read_text())
    m["parity"]["fp32"].update(passed=False, failures=["[fp32] scorer[x] s_ll: max abs diff 1 > atol 0.0001"])
    (copy / "manifest.json").write_text(json.dumps(m))
    code, text, _ = cli("info", "--bundle", copy, "--json")
    assert json.loads(text)["parity"]["fp32"] | {"max_abs": None} == {
        **parity["fp32"],
        "passed": False,
        "failures": 1,
        "max_abs": None,
    }
    assert "tensorrt" not in json.loads(text)


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
def test_errors_exit_1_with_one_line(
    bundle: Path, index: Path, files: Path, argv: list[str], match: str
) -> None:
    subs = {"{index}": str(index), "{feats}": str(files / "feats.npy"), "{missing}": str(files / "nope")}
    args = [subs.get(a, a) for a in argv]
    code, _, err = cli(args[0], "--bundle", bundle, *args[1:])
    assert code == 1 and match in err and err.startswith("error: ") and err.count("\n") == 1


def test_module_entry_point_exits_1_on_a_missing_bundle(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "mssan_infer", "info", "--bundle", str(tmp_path / "nothing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "does not exist" in res.stderr


# ---- data safety: an index is never replaced, extended or duplicated without being asked ---------------
def _index_ids(path: Path) -> list[object]:
    from mssan_infer.gallery.folder import load_index

    galleries, _ = load_index(path)
    return list(galleries["images"].ids) if "images" in galleries else []


def test_index_refuses_to_replace_an_existing_index_without_overwrite(
    bundle: Path, files: Path, tmp_path: Path
) -> None:
    out = tmp_path / "idx"
    assert (
        cli("index", "--bundle", bundle, "--texts", files / "caps.txt", "--out", out, "--no-progress")[0] == 0
    )
    before = (out / "index.json").read_bytes()
    code, _, err = cli(
        "index", "--bundle", bundle, "--images", files / "feats.npy", "--out", out, "--no-progress"
    )
    assert code == 1 and err.count("\n") == 1
    assert (
        "already holds an index (0 images, 3 captions)" in err and "--overwrite" in err and "--append" in err
    )
    assert (out / "index.json").read_bytes() == before
    code, text, _ = cli(
        "index",
        "--bundle",
        bundle,
        "--images",
        files / "feats.npy",
        "--out",
        out,
        "--overwrite",
        "--no-progress",
    )
    assert code == 0 and "30 images and 0 captions" in text


def test_appending_the_same_file_twice_is_refused_and_new_ids_number_after_the_index(
    bundle: Path, files: Path, tmp_path: Path
) -> None:
    out = tmp_path / "idx"
    args = ("index", "--bundle", bundle, "--images", files / "feats.npy", "--out", out, "--no-progress")
    assert cli(*args)[0] == 0
    assert _index_ids(out) == list(range(30))  # row numbers, as the help says
    code, _, err = cli(*args, "--append")
    assert code == 1 and "30 of the 30 image ids (row numbers 0..29) are already in the index" in err
    assert "--new-ids" in err and _index_ids(out) == list(range(30))  # nothing changed
    code, text, _ = cli(*args, "--append", "--new-ids")
    assert code == 0 and "60 images" in text and _index_ids(out) == list(range(60))


def test_append_refuses_ids_from_a_file_that_are_already_in_the_index(
    bundle: Path, files: Path, tmp_path: Path
) -> None:
    out = tmp_path / "idx"
    base = ("index", "--bundle", bundle, "--images", files / "feats.npy", "--out", out, "--no-progress")
    assert cli(*base, "--ids", files / "ids.txt")[0] == 0
    code, _, err = cli(*base, "--ids", files / "ids.txt", "--append")
    assert code == 1 and "already in the index" in err and "'photo_000'" in err
    # ids that read like the index's (str '7' beside int 7) are refused too: Triton and the CLI print
    # ids as text
    (tmp_path / "num.txt").write_text("\n".join(str(i) for i in range(30)))
    out2 = tmp_path / "idx2"
    assert (
        cli("index", "--bundle", bundle, "--images", files / "feats.npy", "--out", out2, "--no-progress")[0]
        == 0
    )
    code, _, err = cli(
        "index",
        "--bundle",
        bundle,
        "--images",
        files / "feats.npy",
        "--out",
        out2,
        "--append",
        "--ids",
        tmp_path / "num.txt",
        "--no-progress",
    )
    assert code == 1 and "read the same as ids (of another type)" in err


def test_append_and_overwrite_together_are_refused_by_the_parser(
    bundle: Path, files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        cli(
            "index",
            "--bundle",
            bundle,
            "--texts",
            files / "caps.txt",
            "--out",
            tmp_path / "i",
            "--append",
            "--overwrite",
        )
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_file_ids_stay_text_and_default_ids_are_row_numbers_in_search_json(
    bundle: Path, index: Path, files: Path
) -> None:
    code, text, _ = cli("search", "--bundle", bundle, "--index", index, "a red dog", "-k", "3", "--json")
    assert code == 0 and all(
        isinstance(h["id"], str) and h["id"].startswith("photo_") for h in json.loads(text)["hits"]
    )
    code, text, _ = cli(
        "search", "--bundle", bundle, "--index", index, "--image", files / "feats.npy", "-k", "3", "--json"
    )
    assert code == 0 and all(isinstance(h["id"], int) for h in json.loads(text)["hits"])


def test_url_and_protocol_are_only_for_the_triton_backend(bundle: Path, index: Path) -> None:
    from mssan_infer.triton.server import free_port

    code, _, err = cli("search", "--bundle", bundle, "--index", index, "a dog", "--url", "127.0.0.1:1")
    assert code == 1 and err == "error: --url and --protocol are for --backend triton\n"
    port = free_port()
    code, _, err = cli(
        "search",
        "--bundle",
        bundle,
        "--index",
        index,
        "a dog",
        "--backend",
        "triton",
        "--url",
        f"127.0.0.1:{port}",
        "--protocol",
        "grpc",
    )
    assert code == 1 and f"Triton server at 127.0.0.1:{port} (grpc)" in err and err.count("\n") == 1


def test_a_caption_with_unseen_words_logs_which_words_were_not_understood(
    bundle: Path, index: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mssan_infer import Retriever

    r = Retriever.load(bundle, index=index)
    with caplog.at_level("WARNING"):
        r.search(text="a zebra eating a sandwich near a dog", k=2)
    text = " ".join(rec.getMessage() for rec in caplog.records)
    assert "'zebra', 'eating', 'sandwich'" in text and "'dog'" not in text
    caplog.clear()
    with caplog.at_level("WARNING"):
        r.search(text="a red dog near the beach", k=2)
    assert not caplog.records


# ---- help: every option explains itself and shows its default -----------------------------------------
def _all_parsers() -> list[tuple[str, Any]]:
    import argparse

    from export.__main__ import build_parser as export_parser
    from mssan_infer.cli.main import _parser as runtime_parser
    from training.__main__ import build_parser as training_parser

    out = []
    for name, p in (
        ("mssan_infer", runtime_parser()),
        ("export", export_parser()),
        ("training", training_parser()),
    ):
        out.append((name, p))
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                out += [(f"{name} {sub}", sp) for sub, sp in action.choices.items()]
    return out


def test_every_option_of_the_three_clis_has_help_and_shows_its_default() -> None:
    import argparse

    missing, no_default = [], []
    for name, p in _all_parsers():
        helptext = p.format_help()
        formatter = p._get_formatter()
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or not a.option_strings:
                continue
            if not a.help:
                missing.append(f"{name} {a.option_strings[0]}")
            flag_or_unset = a.nargs == 0 or a.default is None or a.default == []
            if not flag_or_unset and "default" not in formatter._get_help_string(a):
                no_default.append(f"{name} {a.option_strings[0]}")
        assert "(default: %(default)s)" not in helptext
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose default is not shown: {no_default}"
    index_help = " ".join(dict(_all_parsers())["mssan_infer index"].format_help().split())
    assert "(default: 32)" in index_help and "row numbers 0..N-1" in index_help


# ---- ids you can trust: line i of a file is item i - 1 ---------------------------------------------------
def test_a_blank_line_inside_an_ids_or_captions_file_is_an_error_naming_the_line_file_and_flag(
    bundle: Path, files: Path, tmp_path: Path
) -> None:
    (tmp_path / "caps.txt").write_text("a red dog\n\nthe blue ball\n")
    code, _, err = cli("index", "--bundle", bundle, "--texts", tmp_path / "caps.txt", "--out", tmp_path / "i")
    assert code == 1 and err.count("\n") == 1
    assert f"--texts {tmp_path / 'caps.txt'}: line 2 is blank" in err and "shift" in err
    lines = [f"p{i}" for i in range(30)]
    lines[15] = "   "  # line 16: only spaces (30 lines for 30 images)
    (tmp_path / "ids.txt").write_text("\n".join(lines) + "\n")
    code, _, err = cli(
        "index", "--bundle", bundle, "--images", files / "feats.npy", "--ids", tmp_path / "ids.txt",
        "--out", tmp_path / "i",
    )  # fmt: skip
    assert code == 1 and f"--ids {tmp_path / 'ids.txt'}: line 16 is blank" in err
    assert not (tmp_path / "i").exists()


def test_blank_lines_at_the_end_crlf_endings_and_a_utf8_bom_keep_the_line_numbers(
    bundle: Path, tmp_path: Path
) -> None:
    from mssan_infer.cli.files import read_lines

    (tmp_path / "caps.txt").write_bytes("\ufeffa red dog\r\nthe blue ball\r\na man\r\n\r\n\n".encode("utf-8"))
    assert read_lines(tmp_path / "caps.txt", "captions") == ["a red dog", "the blue ball", "a man"]
    (tmp_path / "ids.txt").write_bytes("\ufeffdog\r\nball\r\nman".encode("utf-8"))
    out = tmp_path / "i"
    code, _, err = cli(
        "index", "--bundle", bundle, "--texts", tmp_path / "caps.txt", "--text-ids", tmp_path / "ids.txt",
        "--out", out, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    code, text, _ = cli("search", "--bundle", bundle, "--index", out, "--image", _feats(tmp_path), "--json")
    hits = {h["id"]: h["text"] for h in json.loads(text)["hits"]}
    assert hits == {"dog": "a red dog", "ball": "the blue ball", "man": "a man"}  # no "\ufeffdog", no "\r"


def _feats(tmp_path: Path) -> Path:
    np.save(tmp_path / "q.npy", np.random.default_rng(1).normal(size=(1, 6, 24)).astype(np.float32))
    return tmp_path / "q.npy"


# ---- small ones -------------------------------------------------------------------------------------------
def test_precision_int8_is_accepted_and_a_bundle_without_it_says_how_to_export_it(
    bundle: Path, index: Path
) -> None:
    code, _, err = cli("search", "--bundle", bundle, "--index", index, "a red dog", "--precision", "int8")
    assert code == 1 and err.count("\n") == 1 and "has no int8 text encoder" in err and "--int8" in err
    assert "image_encoder" not in err  # int8 only ever applies to the text encoder


@pytest.mark.parametrize(
    "argv, wanted",
    [
        (("index", "--layout", "fp16"), ["invalid choice: 'fp16'", "fp32", "int8-stage1", "int8"]),
        (("index", "--fp16-locals"), ["unrecognized arguments: --fp16-locals"]),
        (("search", "a dog", "--stage1", "faiss"), ["invalid choice: 'faiss'", "numpy", "faiss-ivf"]),
        (
            ("search", "a dog", "--stage1", "faiss-hnsw"),
            ["invalid choice: 'faiss-hnsw'", "numpy", "faiss-ivf"],
        ),
    ],
    ids=["layout-fp16", "fp16-locals", "stage1-faiss", "stage1-faiss-hnsw"],
)
def test_removed_layouts_and_stage1_methods_are_refused_by_the_parser_with_the_choices(
    bundle: Path,
    files: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    wanted: list[str],
) -> None:
    where = ("--images", files / "feats.npy", "--out", tmp_path / "i") if argv[0] == "index" else ()
    with pytest.raises(SystemExit) as e:
        cli(argv[0], "--bundle", bundle, *where, *argv[1:])
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and all(w in err for w in wanted), err
    if "(choose from " in err:  # the choices listed are exactly those left
        assert err.split("(choose from ")[1].rstrip(")").replace("'", "").split(", ") == wanted[1:]
    assert not (tmp_path / "i").exists()


def test_searching_an_index_saved_in_the_removed_fp16_layout_says_to_re_index_with_layout_int8(
    bundle: Path, files: Path, tmp_path: Path
) -> None:
    out = tmp_path / "old"
    assert (
        cli("index", "--bundle", bundle, "--images", files / "feats.npy", "--out", out, "--no-progress")[0]
        == 0
    )
    m = json.loads((out / "index.json").read_text())
    m["galleries"]["images"].update(  # what the fp16 layout wrote (the manifest is not hashed)
        dtype="float16", layout={"name": "fp16", "stage1": "float16", "local": "float16", "gram": "float16"}
    )
    (out / "index.json").write_text(json.dumps(m))
    code, _, err = cli("search", "--bundle", bundle, "--index", out, "a red dog")
    assert code == 1 and err.count("\n") == 1
    assert f"index {out} was saved with the fp16 layout, which was removed" in err
    assert "--layout int8" in err and "'fp32' (exact)" in err


def test_remove_takes_ids_out_of_an_index_folder_all_or_nothing(
    bundle: Path, files: Path, tmp_path: Path
) -> None:
    out = tmp_path / "i"
    args = ("index", "--bundle", bundle, "--images", files / "feats.npy", "--texts", files / "caps.txt")
    assert cli(*args, "--ids", files / "ids.txt", "--out", out, "--no-progress")[0] == 0
    before = (out / "index.json").read_bytes()
    code, _, err = cli("remove", "--bundle", bundle, "--index", out, "--ids", "photo_001", "photo_999")
    assert code == 1 and "1 of the 2 ids are not in the index" in err and "nothing was removed" in err
    assert (out / "index.json").read_bytes() == before
    (tmp_path / "drop.txt").write_text("photo_001\nphoto_002\n")
    code, text, err = cli("remove", "--bundle", bundle, "--index", out, "--ids", tmp_path / "drop.txt")
    assert code == 0, err
    assert (
        text.strip()
        == f"removed 2 items (2 images, 0 captions) from {out}; it now holds 28 images and 3 captions"
    )
    code, text, err = cli("remove", "--bundle", bundle, "--index", out, "--ids", "1")  # the int id 1
    assert code == 0 and "(0 images, 1 captions)" in text and "28 images and 2 captions" in text
    code, text, _ = cli(
        "search", "--bundle", bundle, "--index", out, "a man in the street", "-k", "30", "--json"
    )
    assert {"photo_001", "photo_002"}.isdisjoint(h["id"] for h in json.loads(text)["hits"])
    code, _, err = cli("remove", "--bundle", bundle, "--index", tmp_path / "none", "--ids", "1")
    assert code == 1 and "is not an mssan index" in err and not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    "make, flag, match",
    [
        (lambda d: np.save(d / "x.npy", np.zeros((0, 6, 24), np.float32)), "--images", "holds no images"),
        (lambda d: (d / "x.txt").write_text(""), "--texts", "is empty"),
        (lambda d: (d / "x.txt").write_text("\n \n\n"), "--texts", "is empty"),
    ],
    ids=["empty-npy", "empty-captions", "blank-captions"],
)
def test_empty_inputs_are_refused_and_nothing_is_written(
    bundle: Path, tmp_path: Path, make: Any, flag: str, match: str
) -> None:
    make(tmp_path)
    name = tmp_path / ("x.npy" if flag == "--images" else "x.txt")
    code, _, err = cli("index", "--bundle", bundle, flag, name, "--out", tmp_path / "i")
    assert code == 1 and match in err and str(name) in err and flag in err
    assert not (tmp_path / "i").exists()


def test_a_features_file_that_is_not_npy_names_the_file_and_what_was_expected(
    bundle: Path, index: Path, tmp_path: Path
) -> None:
    (tmp_path / "feats.npy").write_bytes(b"PK\x03\x04 a zip, not an array")
    for argv in (
        ("index", "--bundle", bundle, "--images", tmp_path / "feats.npy", "--out", tmp_path / "i"),
        ("search", "--bundle", bundle, "--index", index, "--image", tmp_path / "feats.npy"),
    ):
        code, _, err = cli(*argv)
        assert code == 1 and f"{tmp_path / 'feats.npy'} is not a .npy file" in err and "[N, R, Dv]" in err
        assert "pickle" not in err


def test_nan_in_features_names_the_file_and_the_row(bundle: Path, index: Path, tmp_path: Path) -> None:
    feats = np.random.default_rng(0).normal(size=(5, 6, 24))
    feats[3, 2, 7] = np.nan
    feats[4, 0, 0] = 1e39  # finite in float64, inf once cast to float32
    np.save(tmp_path / "f.npy", feats)
    code, _, err = cli("index", "--bundle", bundle, "--images", tmp_path / "f.npy", "--out", tmp_path / "i")
    assert (
        code == 1
        and f"--images {tmp_path / 'f.npy'}: row 3 has NaN or inf (region 2) (and 1 more rows)" in err
    )
    code, _, err = cli(
        "search", "--bundle", bundle, "--index", index, "--image", tmp_path / "f.npy", "--row", "4"
    )
    assert code == 1 and "row 4 has NaN or inf (region 0)" in err


def test_cli_errors_name_cli_flags_not_python_functions(bundle: Path, files: Path, tmp_path: Path) -> None:
    caps_only = tmp_path / "caps-only"
    assert cli("index", "--bundle", bundle, "--texts", files / "caps.txt", "--out", caps_only)[0] == 0
    errors = [
        cli("search", "--bundle", bundle, "--index", caps_only, "a red dog")[2],
        cli("search", "--bundle", bundle, "--index", tmp_path / "nothing", "a red dog")[2],
        cli("info", "--bundle", bundle, "--index", tmp_path / "nothing")[2],
    ]
    assert "holds no images to search" in errors[0] and "--append" in errors[0]
    assert "python -m mssan_infer index" in errors[1] and "--out" in errors[1]
    for err in errors:
        assert err.startswith("error: ")
        for python in ("Retriever.", "add_images(", "add_texts(", "save()", "flush()", "search_batch", "="):
            assert python not in err, err


# ---- --append keeps the index's layout -------------------------------------------------------------------
def _manifest_bytes(index: Path) -> bytes:
    return (index / "index.json").read_bytes()


def test_append_in_another_layout_is_refused_in_flag_words_and_changes_nothing(
    bundle: Path, files: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fp32"
    base = ("index", "--bundle", bundle, "--images", files / "feats.npy", "--no-progress")
    assert cli(*base, "--out", out)[0] == 0
    before = _manifest_bytes(out)
    code, _, err = cli(*base, "--out", out, "--append", "--new-ids", "--layout", "int8")
    assert code == 1 and err.count("\n") == 1
    assert "built with --layout fp32" in err and "asks for --layout int8" in err and "--overwrite" in err
    assert _manifest_bytes(out) == before  # not rewritten with int8 locals
    code, _, err = cli(*base, "--out", out, "--append", "--new-ids", "--layout", "int8-stage1")
    assert code == 1 and "asks for --layout int8-stage1" in err and _manifest_bytes(out) == before
    code, text, err = cli(*base, "--out", out, "--append", "--new-ids", "--layout", "fp32")  # the same: fine
    assert code == 0 and "it now holds 60 images" in text, err
    code, text, err = cli(*base, "--out", out, "--overwrite", "--layout", "int8")  # a rebuild may change it
    assert code == 0, err
    layout = json.loads((out / "index.json").read_text())["galleries"]["images"]["layout"]
    assert (layout["stage1"], layout["local"]) == ("int8", "int8")
    code, _, err = cli(*base, "--out", out, "--append", "--new-ids", "--layout", "fp32")
    assert code == 1 and "built with --layout int8" in err and "asks for --layout fp32" in err
    code, text, err = cli(*base, "--out", out, "--append", "--new-ids")  # keeps the saved layout
    assert code == 0, err
    layout = json.loads((out / "index.json").read_text())["galleries"]["images"]["layout"]
    assert (layout["stage1"], layout["local"]) == ("int8", "int8")


# ---- flags in messages, not Python ---------------------------------------------------------------------
def test_stage1_faiss_ivf_on_a_compressed_index_says_to_use_stage1_numpy(
    bundle: Path, files: Path, tmp_path: Path
) -> None:
    out = tmp_path / "i8"
    assert (
        cli("index", "--bundle", bundle, "--images", files / "feats.npy", "--out", out, "--layout", "int8")[0]
        == 0
    )
    code, _, err = cli("search", "--bundle", bundle, "--index", out, "a red dog", "--stage1", "faiss-ivf")
    assert code == 1 and err.count("\n") == 1
    assert "--stage1 faiss-ivf" in err and "--layout int8" in err and "--stage1 numpy" in err
    assert "method" not in err
    assert cli("search", "--bundle", bundle, "--index", out, "a red dog", "--stage1", "numpy")[0] == 0


# ---- remove needs no backend ---------------------------------------------------------------------------
def test_remove_loads_no_graph_and_hashes_no_bundle_file(
    bundle: Path, files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mssan_infer.bundle
    import mssan_infer.retriever
    from mssan_infer.gallery.folder import load_index

    out = tmp_path / "i"
    argv = ("index", "--bundle", bundle, "--images", files / "feats.npy", "--texts", files / "caps.txt")
    assert cli(*argv, "--ids", files / "ids.txt", "--out", out, "--no-progress")[0] == 0

    def no_backend(*a: Any, **k: Any) -> Any:
        raise AssertionError("remove made a backend")

    def no_hash(*a: Any, **k: Any) -> Any:
        raise AssertionError("remove hashed a bundle file")

    monkeypatch.setattr(mssan_infer.retriever, "create_backend", no_backend)
    monkeypatch.setattr(mssan_infer.bundle, "sha256_file", no_hash)
    before = _manifest_bytes(out)
    code, _, err = cli("remove", "--bundle", bundle, "--index", out, "--ids", "photo_001", "photo_999")
    assert code == 1 and "nothing was removed" in err and _manifest_bytes(out) == before
    code, text, err = cli("remove", "--bundle", bundle, "--index", out, "--ids", "photo_001", "2")
    assert code == 0, err
    assert text.strip() == (
        f"removed 2 items (1 images, 1 captions) from {out}; it now holds 29 images and 2 captions"
    )
    galleries, manifest = load_index(out)
    assert "photo_001" not in galleries["images"] and 2 not in galleries["texts"]
    assert manifest["bundle_files"] == json.loads(before)["bundle_files"]  # still says which bundle
