"""``python -m mssan_infer index|search|info|serve``: build an index, search it, describe a bundle/index,
serve it.

Thin argparse over typed functions (:func:`run_index`, :func:`run_search`,
:func:`run_info`) that tests call directly. Any :class:`MssanError` ends the
command with exit status 1 and a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

import numpy as np

from mssan_infer.backends import backend_options
from mssan_infer.bundle import load_bundle
from mssan_infer.cli import HelpFormatter, error_line
from mssan_infer.errors import InputError, MssanError
from mssan_infer.gallery.base import ItemId, colliding_ids
from mssan_infer.gallery.folder import read_index_manifest
from mssan_infer.gallery.storage import Layout
from mssan_infer.names import INDEX_MANIFEST
from mssan_infer.options import (
    BackendOptions,
    GalleryOptions,
    OnnxRuntimeOptions,
    SearchOptions,
    Stage1Options,
    TensorRTOptions,
    TritonOptions,
)
from mssan_infer.progress import batches
from mssan_infer.qdrant.options import QdrantEdge, QdrantServer, parse_gallery
from mssan_infer.retriever import Hit, Retriever
from mssan_infer.triton.server import DEFAULT_PORTS

__all__ = ["main", "run_index", "run_search", "run_info", "read_lines", "read_metadata", "parity_summary"]

log = logging.getLogger("mssan_infer")


def read_lines(path: str | os.PathLike[str], what: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (trailing whitespace stripped).

    Raises:
        InputError: the file cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {what} file {path}: {e}") from e


def _load_features(path: str | os.PathLike[str]) -> np.ndarray:
    """Region features ``[N, R, Dv]`` from a .npy file (memory-mapped, no pickle)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read features {path}: {e}; expected a .npy array [N, R, Dv]") from e
    if not isinstance(arr, np.ndarray) or arr.ndim != 3:
        raise InputError(f"{path} must hold one array [N, R, Dv], got shape {getattr(arr, 'shape', None)}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{path}: image features must be real numbers (float32), got dtype {arr.dtype}")
    return arr


def _gallery_ids(
    gallery: Any,
    n: int,
    ids_file: str | os.PathLike[str] | None,
    new_ids: bool,
    what: str,
    flag: str,
    where: str,
) -> list[ItemId]:
    """Ids for ``n`` new items: from ``ids_file`` (str, one per line), fresh ints (``new_ids``), or
    ``0..n-1``.

    Raises:
        InputError: a count mismatch, duplicates, or ids already in the index (with what to do).
    """
    if ids_file is not None:
        ids: list[ItemId] = list(read_lines(ids_file, f"{what} ids"))
        if len(ids) != n:
            raise InputError(f"{ids_file} has {len(ids)} ids for {n} {what}s")
        source = f"{flag} {ids_file}"
    elif new_ids:
        return list(gallery.next_ids(n))
    else:
        ids = list(range(n))
        source = "row numbers 0.." + str(n - 1)
    seen: set[ItemId] = set()
    dup = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    if dup:
        raise InputError(f"{source} has duplicate ids {dup[:5]}; every {what} needs its own id")
    same, text = colliding_ids(ids, gallery)
    if same or text:
        clash = same or text
        how = "are already in" if same else "read the same as ids (of another type) in"
        raise InputError(
            f"{len(clash)} of the {n} {what} ids ({source}) {how} {where}, e.g. {clash[:3]}; were these "
            f"{what}s indexed before? Pass --new-ids to number them after the index's largest id "
            f"({gallery.next_ids(1)[0]}, {gallery.next_ids(1)[0] + 1}, ...), or give other ids with {flag}"
        )
    return ids


def read_metadata(path: str | os.PathLike[str], n: int, what: str) -> list[dict[str, Any] | None]:
    """One JSON object (or ``null``) per line of a UTF-8 file, for ``n`` items.

    Raises:
        InputError: unreadable file, a line that is not a JSON object or null, or another count.
    """
    rows: list[dict[str, Any] | None] = []
    for i, line in enumerate(read_lines(path, what), 1):
        try:
            value = json.loads(line)
        except ValueError as e:
            raise InputError(f"{path} line {i}: not JSON ({e}); write one JSON object per line") from None
        if value is not None and not isinstance(value, dict):
            raise InputError(f"{path} line {i}: expected a JSON object or null, got {type(value).__name__}")
        rows.append(value)
    if len(rows) != n:
        raise InputError(f"{path} has {len(rows)} {what} lines for {n} items")
    return rows


def run_index(
    bundle: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    images: str | os.PathLike[str] | None = None,
    ids: str | os.PathLike[str] | None = None,
    texts: str | os.PathLike[str] | None = None,
    text_ids: str | os.PathLike[str] | None = None,
    metadata: str | os.PathLike[str] | None = None,
    text_metadata: str | os.PathLike[str] | None = None,
    append: bool = False,
    overwrite: bool = False,
    new_ids: bool = False,
    chunk: int = 1024,
    progress: bool = True,
    gallery: GalleryOptions | QdrantEdge | QdrantServer | str | None = None,
    backend: str | BackendOptions = "onnxruntime",
    search: SearchOptions | None = None,
) -> Retriever:
    """Encode image features and/or captions into an index folder ``out``, or into Qdrant galleries.

    Ids: from ``ids`` / ``text_ids`` files (one per line, kept as str); else row / line numbers
    ``0..N-1`` (ints); with ``new_ids``, ints after the largest int id in the index.

    Args:
        images: ``.npy`` ``[N, R, Dv]``.
        texts: captions, one per line.
        append: add to the index already at ``out`` (ids must not be in it yet).
        overwrite: replace an index already at ``out``.
        new_ids: number items without an ids file after the index's largest int id.
        metadata, text_metadata: JSON lines, one object per image / caption (for ``--where`` filters).
        chunk: images encoded and added per step (bounds memory for large files).
        gallery: the in-memory gallery's :class:`~mssan_infer.options.GalleryOptions` (layout...), or Qdrant
            galleries (``"qdrant-edge:PATH"``, ``"qdrant:URL"``) instead of ``out``: items are added to what
            they hold (ids must be new, as with ``append``), and flushed at the end.
        backend, search: as in :meth:`Retriever.load`.
    Raises:
        InputError: nothing to index, neither or both of ``out`` and ``gallery``, an index at ``out``
            without ``append``/``overwrite``, id count mismatch, ids already in the index, bad files.
        IndexFileError / BundleError: as in :meth:`Retriever.load` and :meth:`Retriever.save`.
    """
    if images is None and texts is None:
        raise InputError("nothing to index: give --images FEATS.npy and/or --texts CAPTIONS.txt")
    if ids is not None and images is None:
        raise InputError("--ids needs --images")
    if text_ids is not None and texts is None:
        raise InputError("--text-ids needs --texts")
    if append and overwrite:
        raise InputError("--append adds to the index at --out and --overwrite replaces it; choose one")
    if new_ids and (images is None or ids is not None) and (texts is None or text_ids is not None):
        raise InputError("--new-ids numbers items that have no ids file; every gallery given has one")
    if (metadata is not None and images is None) or (text_metadata is not None and texts is None):
        raise InputError("--metadata needs --images and --text-metadata needs --texts")
    qdrant = not isinstance(gallery, GalleryOptions) and parse_gallery(gallery) is not None
    if qdrant == (out is not None):
        raise InputError(
            "give --out FOLDER (an index folder) or --gallery SPEC (Qdrant), exactly one of them"
        )
    if out is None:
        r = Retriever.load(bundle, backend, gallery=gallery, search=search)
        _add_files(
            r, images, ids, texts, text_ids, metadata, text_metadata, new_ids, str(gallery), chunk, progress
        )
        r.flush()
        return r
    outp = Path(out)
    existing = outp.exists() and (outp / INDEX_MANIFEST).is_file()
    if outp.exists() and not existing and (not outp.is_dir() or any(outp.iterdir())):
        raise InputError(f"--out {outp} exists and is not an mssan index; choose another path")
    if existing and not append and not overwrite:
        galleries = read_index_manifest(outp)["galleries"]
        nouns = {"images": "images", "texts": "captions"}
        held = (
            ", ".join(f"{e.get('n', '?')} {nouns.get(name, name)}" for name, e in galleries.items())
            or "nothing"
        )
        raise InputError(
            f"--out {outp} already holds an index ({held}); pass --append to add to it, or --overwrite to "
            "replace it"
        )
    if append and not existing:
        log.info("%s holds no index yet: starting a new one", outp)
    r = Retriever.load(
        bundle, backend, index=outp if append and existing else None, gallery=gallery, search=search
    )
    _add_files(
        r,
        images,
        ids,
        texts,
        text_ids,
        metadata,
        text_metadata,
        new_ids,
        f"the index at {outp}",
        chunk,
        progress,
    )
    r.save(outp)
    return r


def _add_files(
    r: Retriever,
    images: Any,
    ids: Any,
    texts: Any,
    text_ids: Any,
    metadata: Any,
    text_metadata: Any,
    new_ids: bool,
    where: str,
    chunk: int,
    progress: bool,
) -> None:
    """Read the files, check every id, then encode and add (nothing is added when a check fails)."""
    feats = _load_features(images) if images is not None else None
    caps = read_lines(texts, "captions") if texts is not None else None
    image_ids = (
        _gallery_ids(r.images, feats.shape[0], ids, new_ids, "image", "--ids", where)
        if feats is not None
        else []
    )
    cap_ids = (
        _gallery_ids(r.texts, len(caps), text_ids, new_ids, "caption", "--text-ids", where)
        if caps is not None
        else []
    )
    meta = (
        read_metadata(metadata, feats.shape[0], "metadata")
        if metadata is not None and feats is not None
        else None
    )
    cap_meta = (
        read_metadata(text_metadata, len(caps), "text metadata")
        if text_metadata is not None and caps
        else None
    )
    if feats is not None:
        n = feats.shape[0]
        for a, b in batches(n, chunk, "encode images", progress):
            r.add_images(
                np.asarray(feats[a:b], dtype=np.float32),
                ids=image_ids[a:b],
                metadata=meta[a:b] if meta is not None else None,
            )
    if caps is not None:
        r.add_texts(caps, ids=cap_ids, metadata=cap_meta, progress=progress)


def run_search(
    bundle: str | os.PathLike[str],
    index: str | os.PathLike[str] | None = None,
    *,
    text: str | None = None,
    image: str | os.PathLike[str] | None = None,
    row: int = 0,
    k: int = 10,
    rerank: int = 100,
    where: Mapping[str, Any] | None = None,
    gallery: GalleryOptions | QdrantEdge | QdrantServer | str | None = None,
    backend: str | BackendOptions = "onnxruntime",
) -> list[Hit]:
    """Search an index (or Qdrant galleries) with a caption (-> images) or with row ``row`` of an
    image-feature file (-> captions), optionally filtered by metadata (``where``).

    Raises:
        InputError: neither or both queries, neither or both of ``index`` and ``gallery``, a row outside
            the file, bad k/rerank or filter.
    """
    if (text is None) == (image is None):
        raise InputError("give a caption to search images, or --image FEATS.npy [--row N] to search captions")
    qdrant = not isinstance(gallery, GalleryOptions) and parse_gallery(gallery) is not None
    if qdrant == (index is not None):
        raise InputError("give --index FOLDER or --gallery SPEC (Qdrant), exactly one of them")
    r = Retriever.load(bundle, backend, index=index, gallery=gallery)
    if text is not None:
        return r.search(text=text, k=k, rerank=rerank, where=where)
    assert image is not None
    feats = _load_features(image)
    if not 0 <= row < feats.shape[0]:
        raise InputError(f"--row {row} is outside {image}, which has {feats.shape[0]} images")
    return r.search(image=np.asarray(feats[row], dtype=np.float32), k=k, rerank=rerank, where=where)


def _where(text: str | None) -> dict[str, Any] | None:
    """``--where`` as a mapping. Raises InputError for text that is not a JSON object."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InputError(f'--where must be a JSON object, e.g. \'{{"album": "beach"}}\' ({e})') from None
    if not isinstance(value, dict):
        raise InputError(f"--where must be a JSON object, got {type(value).__name__}")
    return value


def run_info(bundle: str | os.PathLike[str], index: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A JSON-ready description of a bundle (and of an index built with it).

    Raises:
        BundleError / IndexFileError: unreadable bundle or index.
    """
    b = load_bundle(bundle)
    m = b.manifest
    info: dict[str, Any] = {
        "bundle": str(b.root),
        "bundle_id": b.bundle_id,
        "format_version": m.format_version,
        "model_config": b.model_config,
        "graphs": dict(m.graphs["fp32"]),
        "fp16": "fp16" in m.graphs,
        "int8": "int8" in m.graphs,
        "text_encoder": m.text_encoder,
        "tokenizer": m.tokenizer.get("kind", "word"),
        "vocab_size": m.model_config.get("vocab_size"),
        "verified": m.verified,
        "parity": parity_summary(m.parity),
        "created": m.raw.get("created"),
    }
    trt = m.tensorrt
    if trt is not None:
        info["tensorrt"] = {
            "tensorrt_version": trt.get("tensorrt_version"),
            "gpu": trt.get("gpu"),
            "precisions": sorted(trt.get("engines") or {}),
            "limits": trt.get("limits"),
            "parity": parity_summary(trt.get("parity")),
        }
    if index is not None:
        im = read_index_manifest(index)
        info["index"] = {
            "path": str(index),
            "format_version": im["format_version"],
            "bundle_id": im["bundle_id"],
            "matches_bundle": im["bundle_id"] == b.bundle_id,
            "galleries": {
                name: {k: v for k, v in e.items() if k != "files"} for name, e in im["galleries"].items()
            },
        }
    return info


def parity_summary(parity: Any) -> dict[str, Any] | None:
    """Per precision, the verdict of a manifest parity table (``parity`` or ``tensorrt.parity``).

    Returns:
        ``{precision: {"passed", "atol", "rtol", "max_abs" (worst over graphs), "max_abs_per_graph",
        "failures" (count), "reference", "execution"}}``, or ``None`` when the manifest has no table.
    """
    if not isinstance(parity, dict):
        return None
    out: dict[str, Any] = {}
    for precision, report in parity.items():
        if not isinstance(report, dict):
            continue
        tol: dict[str, Any] = report["tolerance"] if isinstance(report.get("tolerance"), dict) else {}
        per_graph = {g: v for g, v in (report.get("max_abs") or {}).items() if isinstance(v, (int, float))}
        out[str(precision)] = {
            "passed": report.get("passed"),
            "atol": tol.get("atol"),
            "rtol": tol.get("rtol"),
            "max_abs": max(per_graph.values()) if per_graph else None,
            "max_abs_per_graph": per_graph,
            "failures": len(report.get("failures") or []),
            "reference": report.get("reference"),
            "execution": report.get("execution"),
        }
    return out


def _parity_line(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "not recorded"
    parts = []
    for precision, p in summary.items():
        verdict = "passed" if p["passed"] else f"FAILED ({p['failures']} failure(s))"
        worst = (
            f", max abs {p['max_abs']:.2g} (atol {p['atol']:g})"
            if p["max_abs"] is not None and p["atol"]
            else ""
        )
        parts.append(f"{precision} {verdict}{worst}")
    return "; ".join(parts)


def _print_hits(hits: list[Hit], query: str, out: TextIO) -> None:
    print(query, file=out)
    if not hits:
        print("  (no results)", file=out)
        return
    width = max(len(str(h.id)) for h in hits)
    print(f"  {'rank':>4}  {'id':<{width}}  {'score':>8}  {'stage1':>8}", file=out)
    for i, h in enumerate(hits, 1):
        print(f"  {i:>4}  {str(h.id):<{width}}  {h.score:8.4f}  {h.stage1:8.4f}", file=out)


def _print_info(info: dict[str, Any], out: TextIO) -> None:
    cfg = info["model_config"]
    print(f"bundle     {info['bundle']}  (id {info['bundle_id']}, format {info['format_version']})", file=out)
    print(
        f"model      D={cfg.get('embed_size')}  word_dim={cfg.get('word_dim')}  Dv={cfg.get('img_dim')}  "
        f"vocab={cfg.get('vocab_size')}  max_len={cfg.get('max_len')}  agg={cfg.get('agg')}",
        file=out,
    )
    print(
        f"weights    lam_gg={cfg.get('lam_gg')}  lam_gl={cfg.get('lam_gl')}  lam_ll={cfg.get('lam_ll')}",
        file=out,
    )
    print(f"graphs     {', '.join(f'{k}: {v}' for k, v in info['graphs'].items())}", file=out)
    print(f"text       {info['text_encoder']} tower, {info['tokenizer']} tokenizer", file=out)
    print(
        f"fp16       {'yes' if info['fp16'] else 'no'}   int8 text encoder {'yes' if info['int8'] else 'no'}",
        file=out,
    )
    print(f"verified   {info['verified']}", file=out)
    print(f"parity     {_parity_line(info['parity'])}", file=out)
    if "tensorrt" in info:
        t = info["tensorrt"]
        print(
            f"tensorrt   {t['tensorrt_version']} on {(t['gpu'] or {}).get('name')}, "
            f"{', '.join(t['precisions'])}; "
            f"limits {t['limits']}; parity {_parity_line(t['parity'])}",
            file=out,
        )
    if "index" in info:
        ix = info["index"]
        match = (
            "matches this bundle"
            if ix["matches_bundle"]
            else f"built with ANOTHER bundle ({ix['bundle_id']})"
        )
        print(f"index      {ix['path']}  (format {ix['format_version']}, {match})", file=out)
        for name, g in ix["galleries"].items():
            print(
                f"  {name:<7}  {g['n']} items, max length {g['max_length']}, locals {g['dtype']}",
                file=out,
            )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mssan_infer",
        description="Two-stage image-text retrieval.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="{index,search,info,serve}")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--bundle", required=True, help="bundle folder written by `python -m export`")
        sp.add_argument(
            "--backend",
            default="onnxruntime",
            help="where the graphs run: onnxruntime, tensorrt, triton (on a server, see --url), or a "
            "name given to mssan_infer.register_backend",
        )
        sp.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (onnxruntime, tensorrt)")
        sp.add_argument(
            "--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's)"
        )
        sp.add_argument(
            "--precision",
            default="fp32",
            choices=("fp32", "fp16"),
            help="graphs to run (fp16 needs an `export --fp16` bundle)",
        )
        sp.add_argument(
            "--url",
            default=None,
            help="with --backend triton: the server's host:port (default 127.0.0.1:8000 for http, "
            "127.0.0.1:8001 for grpc)",
        )
        sp.add_argument("--protocol", default="http", choices=("http", "grpc"), help="with --backend triton")
        sp.add_argument(
            "--gallery",
            default=None,
            help="galleries in Qdrant instead of an index folder: 'qdrant-edge:PATH' (Qdrant Edge, "
            "in-process) or 'qdrant:URL' (a server), options after '?' (e.g. ?quantization=int8)",
        )

    ix = sub.add_parser(
        "index",
        help="encode image features / captions into an index folder",
        formatter_class=HelpFormatter,
        description="Encode image features and/or captions into an index folder.\n\nIds: one per line from "
        "--ids / --text-ids (kept as text); otherwise row / line numbers 0, 1, 2, ... . An index at "
        "--out is never replaced or extended unless you say so (--overwrite, --append), and --append "
        "refuses ids already in the index unless --new-ids numbers the new items after them.",
    )
    common(ix)
    ix.add_argument("--images", help=".npy region features [N, R, Dv]")
    ix.add_argument("--ids", help="image ids, one per line, kept as text (default: row numbers 0..N-1)")
    ix.add_argument("--texts", help="captions, one per line")
    ix.add_argument(
        "--text-ids", help="caption ids, one per line, kept as text (default: line numbers 0..M-1)"
    )
    ix.add_argument("--out", help="index folder (written atomically); or --gallery for Qdrant")
    ix.add_argument("--metadata", help="JSON lines, one object per image (filterable with search --where)")
    ix.add_argument("--text-metadata", help="JSON lines, one object per caption")
    mode = ix.add_mutually_exclusive_group()
    mode.add_argument(
        "--append",
        action="store_true",
        help="add to the index at --out (its ids must not repeat: see --new-ids)",
    )
    mode.add_argument("--overwrite", action="store_true", help="replace an index already at --out")
    ix.add_argument(
        "--new-ids",
        action="store_true",
        help="number items without an ids file after the largest int id in the index, not from 0",
    )
    ix.add_argument(
        "--fp16-locals", action="store_true", help="store locals and Grams in float16 (half the size)"
    )
    ix.add_argument(
        "--layout",
        choices=("fp32", "fp16", "int8-stage1", "int8"),
        default=None,
        help="gallery layout (default fp32, or the layout of the index appended to); README 'Gallery "
        "layouts'",
    )
    ix.add_argument("--batch-size", type=int, default=32, help="items per encoder call")
    ix.add_argument("--no-progress", action="store_true", help="no progress bars")

    se = sub.add_parser(
        "search", help="search an index with a caption or an image", formatter_class=HelpFormatter
    )
    common(se)
    se.add_argument("--index", help="index folder written by `index`; or --gallery for Qdrant")
    se.add_argument("--where", help='metadata filter as JSON, e.g. \'{"album": "beach"}\'')
    se.add_argument("text", nargs="?", help="caption to search the image gallery with")
    se.add_argument("--image", help=".npy region features; searches the caption gallery")
    se.add_argument("--row", type=int, default=0, help="row of --image to use")
    se.add_argument("-k", type=int, default=10, help="results to print")
    se.add_argument("--rerank", type=int, default=100, help="stage-2 depth (0: stage 1 only)")
    se.add_argument(
        "--stage1",
        default="numpy",
        choices=("numpy", "faiss", "faiss-ivf", "faiss-hnsw"),
        help="stage-1 search (numpy and faiss exact; faiss-ivf, faiss-hnsw approximate)",
    )
    se.add_argument("--json", action="store_true", help="print one JSON object (ids keep their type)")

    inf = sub.add_parser("info", help="describe a bundle (and an index)", formatter_class=HelpFormatter)
    inf.add_argument("--bundle", required=True, help="bundle folder written by `python -m export`")
    inf.add_argument("--index", help="also describe this index folder")
    inf.add_argument("--json", action="store_true", help="print one JSON object")

    sv = sub.add_parser(
        "serve",
        help="serve a bundle's Triton repository with a local tritonserver",
        formatter_class=HelpFormatter,
        description="Start tritonserver on a bundle's Triton repository (written by `python -m export ... "
        "--triton`) and print its URLs; Ctrl-C stops it. Uses $TRITONSERVER, /opt/tritonserver or "
        "PATH, else the CPU tritonserver of nvidia-pytriton (`pip install 'mssan[triton]'`).",
    )
    where = sv.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", help="bundle folder: serves its triton/ repository")
    where.add_argument("--repository", help="a model repository folder (instead of --bundle)")
    sv.add_argument(
        "--index",
        help="index folder for the retriever model (default: the one installed in the repository, if any)",
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"], help="HTTP/REST (KServe v2) port")
    sv.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"], help="gRPC port")
    sv.add_argument(
        "--metrics-port", type=int, default=DEFAULT_PORTS["metrics"], help="Prometheus metrics port"
    )
    sv.add_argument(
        "--startup-timeout", type=float, default=120.0, help="seconds to wait for the models to load"
    )
    sv.add_argument(
        "--log", default=None, help="write the server log here (default: a temp file, removed on exit)"
    )
    return p


def _backend(args: argparse.Namespace) -> BackendOptions:
    """The backend options of the common flags (``--url``/``--protocol`` only with ``--backend triton``)."""
    common = {"device": args.device, "threads": args.threads, "precision": args.precision}
    if args.backend == "triton":
        default = DEFAULT_PORTS["http"] if args.protocol == "http" else DEFAULT_PORTS["grpc"]
        return TritonOptions(url=args.url or f"127.0.0.1:{default}", protocol=args.protocol, **common)
    if args.url is not None or args.protocol != "http":
        raise InputError("--url and --protocol are for --backend triton")
    if args.backend == "tensorrt":
        return TensorRTOptions(**common)
    if args.backend == "onnxruntime":
        return OnnxRuntimeOptions(**common)
    _, options = backend_options(args.backend)  # a backend registered by a plugin, or an InputError
    return dataclasses.replace(options, **common)


def _gallery(args: argparse.Namespace, memory: GalleryOptions) -> GalleryOptions | str:
    """``--gallery`` (Qdrant) when given, else the in-memory gallery's options."""
    if args.gallery is not None and args.gallery != "memory":
        return str(args.gallery)
    return memory


def _repository(args: argparse.Namespace) -> Path:
    if args.repository is not None:
        return Path(args.repository)
    b = load_bundle(args.bundle, verify=False)
    rec = b.manifest.triton
    if rec is None or not (b.root / str(rec.get("repository", "triton"))).is_dir():
        raise InputError(
            f"bundle {b.root} has no Triton repository; export it with "
            f"`python -m export --checkpoint CKPT --out {b.root} --triton`"
        )
    return b.root / str(rec.get("repository", "triton"))


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 on an MssanError)."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "info":
            info = run_info(args.bundle, args.index)
            if args.json:
                print(json.dumps(info, indent=2, default=str), file=out)
            else:
                _print_info(info, out)
            return 0
        if args.command == "serve":
            from mssan_infer.triton.server import serve

            return serve(
                _repository(args),
                index=args.index,
                host=args.host,
                http_port=args.http_port,
                grpc_port=args.grpc_port,
                metrics_port=args.metrics_port,
                startup_timeout_s=args.startup_timeout,
                log_path=args.log,
                out=out,
            )
        backend = _backend(args)
        if args.command == "index":
            if args.fp16_locals and args.layout is not None:
                raise InputError("--fp16-locals is --layout with float16 locals: give one of them")
            layout = Layout("float32", "float16") if args.fp16_locals else args.layout
            if args.gallery is not None and args.gallery != "memory" and layout is not None:
                raise InputError(
                    "--layout and --fp16-locals are for an index folder (--out); a Qdrant gallery takes "
                    "its storage options in --gallery (e.g. ?local_dtype=float16)"
                )
            r = run_index(
                args.bundle,
                args.out,
                images=args.images,
                ids=args.ids,
                texts=args.texts,
                text_ids=args.text_ids,
                metadata=args.metadata,
                text_metadata=args.text_metadata,
                gallery=_gallery(args, GalleryOptions(layout=layout)),
                append=args.append,
                overwrite=args.overwrite,
                new_ids=args.new_ids,
                progress=not args.no_progress,
                backend=backend,
                search=SearchOptions(batch_size=args.batch_size),
            )
            print(
                f"indexed {r.n_images} images and {r.n_texts} captions into {args.out or args.gallery}",
                file=out,
            )
            return 0
        hits = run_search(
            args.bundle,
            args.index,
            text=args.text,
            image=args.image,
            row=args.row,
            k=args.k,
            rerank=args.rerank,
            gallery=_gallery(args, GalleryOptions(stage1=Stage1Options(method=args.stage1))),
            where=_where(args.where),
            backend=backend,
        )
        query = f"text: {args.text!r}" if args.text is not None else f"image: {args.image} row {args.row}"
        if args.json:
            payload = {
                "query": {"text": args.text}
                if args.text is not None
                else {"image": args.image, "row": args.row},
                "k": args.k,
                "rerank": args.rerank,
                "hits": [{"id": h.id, "score": h.score, "stage1": h.stage1} for h in hits],
            }
            print(json.dumps(payload), file=out)
        else:
            _print_hits(hits, query, out)
        return 0
    except MssanError as e:
        print(error_line(e), file=err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
