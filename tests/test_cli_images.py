"""`python -m mssan_infer index --images DIR|FILE...|LIST.txt` and `search --image FILE` with a bundle that
has the pixel graph: which files are taken, their ids, broken files reported at the end, and the error
without the pixel graph."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mssan_infer import Retriever
from mssan_infer.cli.index import PARTIAL_EXIT
from mssan_infer.cli.main import main
from mssan_infer.errors import InputError
from mssan_infer.gallery.folder import load_index
from mssan_infer.images.files import collect_images, image_extensions


def cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _image(path: Path, seed: int, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    arr = np.full((70, 90, 3), rng.integers(0, 255, 3), np.uint8)
    arr[10:40, 20:60] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    """photos/ with 2 images, a subfolder with 2 more (one WebP), a text file and a hidden file."""
    root = tmp_path / "photos"
    _image(root / "beach.jpg", 1)
    _image(root / "dog.png", 2)
    _image(root / "trip" / "city.JPG", 3, "JPEG")
    _image(root / "trip" / "park.webp", 4)
    (root / "notes.txt").write_text("not an image")
    _image(root / ".thumb.jpg", 5)
    return root


def _ids(index: Path) -> list[object]:
    galleries, _ = load_index(index)
    return list(galleries["images"].ids)


def test_a_photo_folder_is_indexed_by_relative_path_and_searched_by_caption(
    tiny_pixel_bundle: Path, photos: Path, tmp_path: Path
) -> None:
    (tmp_path / "caps.txt").write_text("a red dog on the beach\na man in the street\n")
    out = tmp_path / "idx"
    code, text, err = cli(
        "index", "--bundle", tiny_pixel_bundle, "--images", photos, "--recursive",
        "--texts", tmp_path / "caps.txt", "--out", out, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert text.strip() == f"indexed 4 images and 2 captions into {out}"
    assert _ids(out) == ["beach.jpg", "dog.png", "trip/city.JPG", "trip/park.webp"]  # sorted; hidden left out
    assert "1 file(s)" in err and "notes.txt" in err  # the text file is named, not silently dropped
    code, text, _ = cli("search", "--bundle", tiny_pixel_bundle, "--index", out, "a dog", "-k", "4", "--json")
    hits = json.loads(text)["hits"]
    assert code == 0 and sorted(h["id"] for h in hits) == sorted(_ids(out))
    assert {h["source"] for h in hits} == {str((photos / h["id"]).absolute()) for h in hits}


def test_without_recursive_only_the_folder_itself_is_indexed_and_a_folder_of_subfolders_says_so(
    tiny_pixel_bundle: Path, photos: Path, tmp_path: Path
) -> None:
    code, text, err = cli(
        "index", "--bundle", tiny_pixel_bundle, "--images", photos, "--out", tmp_path / "i", "--no-progress"
    )
    assert code == 0, err
    assert _ids(tmp_path / "i") == ["beach.jpg", "dog.png"]
    (tmp_path / "albums" / "2019").mkdir(parents=True)
    _image(tmp_path / "albums" / "2019" / "a.png", 1)
    code, _, err = cli(
        "index", "--bundle", tiny_pixel_bundle, "--images", tmp_path / "albums", "--out", tmp_path / "j"
    )
    assert code == 1 and "no image files" in err and "--recursive" in err and err.count("\n") == 1
    assert not (tmp_path / "j").exists()


def test_an_empty_image_folder_is_refused(tiny_pixel_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = cli(
        "index", "--bundle", tiny_pixel_bundle, "--images", tmp_path / "empty", "--out", tmp_path / "i"
    )
    assert code == 1 and err.startswith("error: --images") and "no image files" in err
    assert not (tmp_path / "i").exists()


def test_broken_files_are_listed_at_the_end_and_every_other_image_is_indexed(
    tiny_pixel_bundle: Path, photos: Path, tmp_path: Path
) -> None:
    good = photos / "beach.jpg"
    (photos / "cut.jpg").write_bytes(good.read_bytes()[:120])  # truncated
    (photos / "text.png").write_text("hello")  # not an image
    (photos / "list.txt").unlink(missing_ok=True)
    listing = tmp_path / "more.txt"
    listing.write_text("photos/dog.png\nphotos/gone.jpg\n")  # a missing file, relative to the list's folder
    out = tmp_path / "idx"
    code, text, err = cli(
        "index", "--bundle", tiny_pixel_bundle, "--images", photos, listing, "--out", out,
        "--batch-size", "2", "--no-progress",
    )  # fmt: skip
    assert code == PARTIAL_EXIT, err
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 3
    assert f"failed: {photos / 'cut.jpg'}: cannot decode image" in failed[0]
    assert f"failed: {photos / 'text.png'}: not an image file" in failed[1]
    assert f"failed: {tmp_path / 'photos' / 'gone.jpg'}: image file not found" in failed[2]
    assert text.strip() == f"indexed 3 images (3 failed) and 0 captions into {out}"
    assert _ids(out) == ["beach.jpg", "dog.png", "photos/dog.png"]


def test_a_broken_file_costs_only_itself_and_the_others_are_encoded_in_full_batches(
    tiny_pixel_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mssan_infer.backends.base import Backend

    for i, name in enumerate(("a.png", "c.png", "d.png", "e.png", "f.png")):
        _image(tmp_path / "photos" / name, i)
    (tmp_path / "photos" / "b.png").write_text("not an image")
    runs: list[int] = []
    real = Backend.run

    def counting(self: Backend, graph: str, feeds: Any) -> Any:
        if graph == "image_encoder_pixels":
            runs.append(len(feeds["pixels"]))
        return real(self, graph, feeds)

    monkeypatch.setattr(Backend, "run", counting)
    out = tmp_path / "idx"
    code, text, err = cli(
        "index", "--bundle", tiny_pixel_bundle, "--images", tmp_path / "photos", "--out", out,
        "--batch-size", "2", "--no-progress",
    )  # fmt: skip
    assert code == PARTIAL_EXIT, err
    assert runs == [2, 2, 1]  # a, c | d, e | f: no batch re-encoded file by file around b
    assert [line for line in err.splitlines() if line.startswith("failed: ")] == [
        f"failed: {tmp_path / 'photos' / 'b.png'}: not an image file pillow can read (it reads JPEG, PNG, "
        "WebP, GIF, BMP, TIFF...)"
    ]
    assert _ids(out) == ["a.png", "c.png", "d.png", "e.png", "f.png"]
    r = Retriever.load(tiny_pixel_bundle)  # the same vectors as encoding the files one by one
    try:
        want = r.encode_images([tmp_path / "photos" / "d.png"])
    finally:
        r.close()
    g = load_index(out)[0]["images"]
    np.testing.assert_allclose(g.view().gather(np.array([2])).local[0], want.local[0], atol=1e-5)


def test_when_no_image_can_be_read_nothing_is_written(tiny_pixel_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_text("x")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n")
    code, _, err = cli(
        "index", "--bundle", tiny_pixel_bundle, "--images", tmp_path / "a.jpg", tmp_path / "b.png",
        "--out", tmp_path / "i", "--no-progress",
    )  # fmt: skip
    assert code == 1 and "none of the 2 image files could be read" in err and "a.jpg" in err
    assert not (tmp_path / "i").exists()


def test_files_and_list_entries_are_named_as_given_unless_ids_are_given(
    tiny_pixel_bundle: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (photos / "pick.txt").write_text(
        "\ufefftrip/city.JPG\r\nbeach.jpg\r\n"
    )  # BOM and CRLF, as Windows writes
    code, _, err = cli(
        "index", "--bundle", tiny_pixel_bundle, "--images", "photos/dog.png", "photos/pick.txt",
        "--out", "idx", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert _ids(tmp_path / "idx") == ["photos/dog.png", "trip/city.JPG", "beach.jpg"]
    (tmp_path / "ids.txt").write_text("x\ny\nz\n")
    code, _, err = cli(
        "index", "--bundle", tiny_pixel_bundle, "--images", "photos/dog.png", "photos/pick.txt",
        "--ids", "ids.txt", "--out", "idx", "--overwrite", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert _ids(tmp_path / "idx") == ["x", "y", "z"]


def test_metadata_lines_follow_the_order_of_the_images(
    tiny_pixel_bundle: Path, photos: Path, tmp_path: Path
) -> None:
    (tmp_path / "meta.jsonl").write_text('{"album": "sea"}\n{"album": "pets"}\n')
    out = tmp_path / "idx"
    code, _, err = cli(
        "index", "--bundle", tiny_pixel_bundle, "--images", photos, "--metadata", tmp_path / "meta.jsonl",
        "--out", out, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    code, text, _ = cli(
        "search",
        "--bundle",
        tiny_pixel_bundle,
        "--index",
        out,
        "a dog",
        "--where",
        '{"album": "pets"}',
        "--json",
    )
    assert code == 0 and [h["id"] for h in json.loads(text)["hits"]] == ["dog.png"]


def test_indexing_the_same_folder_again_with_append_is_refused_naming_what_to_do(
    tiny_pixel_bundle: Path, photos: Path, tmp_path: Path
) -> None:
    args = (
        "index",
        "--bundle",
        tiny_pixel_bundle,
        "--images",
        photos,
        "--out",
        tmp_path / "i",
        "--no-progress",
    )
    assert cli(*args)[0] == 0
    code, _, err = cli(*args, "--append")
    assert code == 1 and "are already in the index" in err and "index only the new files" in err
    code, _, err = cli(*args, "--append", "--new-ids")
    assert code == 1 and "--new-ids numbers items that have no ids" in err


def test_search_with_an_image_file_ranks_captions(
    tiny_pixel_bundle: Path, photos: Path, tmp_path: Path
) -> None:
    (tmp_path / "caps.txt").write_text("a red dog\na blue ball\na man in the street\n")
    out = tmp_path / "idx"
    assert cli("index", "--bundle", tiny_pixel_bundle, "--texts", tmp_path / "caps.txt", "--out", out)[0] == 0
    code, text, err = cli(
        "search", "--bundle", tiny_pixel_bundle, "--index", out, "--image", photos / "dog.png", "--json"
    )
    assert code == 0, err
    hits = json.loads(text)["hits"]
    assert sorted(h["id"] for h in hits) == [0, 1, 2] and {h["text"] for h in hits} == {
        "a red dog",
        "a blue ball",
        "a man in the street",
    }
    code, text, _ = cli(
        "search", "--bundle", tiny_pixel_bundle, "--index", out, "--image", photos / "dog.png"
    )
    assert code == 0 and text.splitlines()[0] == f"image: {photos / 'dog.png'}"
    code, _, err = cli(
        "search", "--bundle", tiny_pixel_bundle, "--index", out, "--image", photos / "dog.png", "--row", "2"
    )
    assert code == 1 and "--row picks a row of a .npy" in err
    code, _, err = cli(
        "search", "--bundle", tiny_pixel_bundle, "--index", out, "--image", photos / "nope.jpg"
    )
    assert code == 1 and "nope.jpg: image file not found" in err


def test_a_bundle_without_the_pixel_graph_says_how_to_export_one(
    tiny_bundle: Path, photos: Path, tmp_path: Path
) -> None:
    code, _, err = cli("index", "--bundle", tiny_bundle, "--images", photos, "--out", tmp_path / "i")
    assert code == 1 and err.count("\n") == 1
    assert "has no pixel graph" in err and "python -m export" in err and "--pixels" in err
    assert not (tmp_path / "i").exists()
    code, _, err = cli(
        "search", "--bundle", tiny_bundle, "--index", tmp_path / "i", "--image", photos / "dog.png"
    )
    assert code == 1 and "--image names image files" in err and "--pixels" in err


def test_collect_images_takes_pillows_formats_skips_hidden_files_and_refuses_clashing_ids(
    photos: Path, tmp_path: Path
) -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif"} <= image_extensions()
    found = collect_images([photos], recursive=True, read_list=lambda p: [])
    assert [f.id for f in found.files] == ["beach.jpg", "dog.png", "trip/city.JPG", "trip/park.webp"]
    assert found.skipped == [photos / "notes.txt"]
    _image(tmp_path / "other" / "beach.jpg", 9)
    with pytest.raises(InputError, match="two images get the id 'beach.jpg'"):
        collect_images([photos, tmp_path / "other"], read_list=lambda p: [])
    with pytest.raises(InputError, match="region features"):
        collect_images([photos, tmp_path / "f.npy"], read_list=lambda p: [])
