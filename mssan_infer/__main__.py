"""``python -m mssan_infer index|search|info``: build an index, search it, describe a bundle/index.

Thin argparse over typed functions (:func:`run_index`, :func:`run_search`,
:func:`run_info`) that tests call directly. Any :class:`MssanError` ends the
command with exit status 1 and a one-line message on stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

import numpy as np

from .bundle import load_bundle
from .errors import InputError, MssanError
from .core.contract import ItemId
from .core.qdrant import parse_gallery
from .core.store import read_index_manifest
from .progress import progress_bar
from .retriever import Hit, Retriever

__all__ = ["main", "run_index", "run_search", "run_info", "read_lines", "parity_summary"]

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
    chunk: int = 1024,
    progress: bool = True,
    gallery: Any = None,
    **load_options: Any,
) -> Retriever:
    """Encode image features and/or captions into an index folder ``out``, or into Qdrant galleries.

    Args:
        images: ``.npy`` ``[N, R, Dv]``; ids from ``ids`` (one per line, kept as str) or row numbers.
        texts: captions, one per line; ids from ``text_ids`` or line numbers.
        metadata, text_metadata: JSON lines, one object per image / caption (for ``--where`` filters).
        append: add to the index already at ``out`` instead of starting a new one.
        chunk: images encoded and added per step (bounds memory for large files).
        gallery: Qdrant galleries (``"qdrant-edge:PATH"``, ``"qdrant:URL"``) instead of ``out``: items
            are added to what they hold, and flushed at the end.
    Raises:
        InputError: nothing to index, neither or both of ``out`` and ``gallery``, id count mismatch, bad files.
        IndexFileError / BundleError: as in :meth:`Retriever.load` and :meth:`Retriever.save`.
    """
    if images is None and texts is None:
        raise InputError("nothing to index: give --images FEATS.npy and/or --texts CAPTIONS.txt")
    if ids is not None and images is None:
        raise InputError("--ids needs --images")
    if text_ids is not None and texts is None:
        raise InputError("--text-ids needs --texts")
    if (metadata is not None and images is None) or (text_metadata is not None and texts is None):
        raise InputError("--metadata needs --images and --text-metadata needs --texts")
    external = parse_gallery(gallery) is not None
    if external == (out is not None):
        raise InputError("give --out FOLDER (an index folder) or --gallery SPEC (Qdrant), exactly one of them")
    outp = Path(out) if out is not None else None
    index = outp if outp is not None and append and outp.exists() else None
    r = Retriever.load(bundle, index=index, gallery=gallery, **load_options)
    if images is not None:
        feats = _load_features(images)
        n = feats.shape[0]
        image_ids: list[ItemId] | None = None
        if ids is not None:
            image_ids = list(read_lines(ids, "ids"))
            if len(image_ids) != n:
                raise InputError(f"{ids} has {len(image_ids)} ids for {n} images in {images}")
        else:
            image_ids = list(r.images.next_ids(n))
        meta = read_metadata(metadata, n, "metadata") if metadata is not None else None
        bar = progress_bar(n, "encode images", progress)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            r.add_images(np.asarray(feats[a:b], dtype=np.float32), ids=image_ids[a:b],
                         metadata=meta[a:b] if meta is not None else None)
            if bar is not None:
                bar.update(b - a)
        if bar is not None:
            bar.close()
    if texts is not None:
        caps = read_lines(texts, "captions")
        cap_ids: list[ItemId] | None = None
        if text_ids is not None:
            cap_ids = list(read_lines(text_ids, "text ids"))
            if len(cap_ids) != len(caps):
                raise InputError(f"{text_ids} has {len(cap_ids)} ids for {len(caps)} captions in {texts}")
        cap_meta = read_metadata(text_metadata, len(caps), "text metadata") if text_metadata is not None else None
        r.add_texts(caps, ids=cap_ids, metadata=cap_meta, progress=progress)
    if outp is not None:
        r.save(outp)
    else:
        r.flush()
    return r


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
    gallery: Any = None,
    **load_options: Any,
) -> list[Hit]:
    """Search an index (or Qdrant galleries) with a caption (-> images) or with row ``row`` of an
    image-feature file (-> captions), optionally filtered by metadata (``where``).

    Raises:
        InputError: neither or both queries, neither or both of ``index`` and ``gallery``, a row outside
            the file, bad k/rerank or filter.
    """
    if (text is None) == (image is None):
        raise InputError("give a caption to search images, or --image FEATS.npy [--row N] to search captions")
    if (parse_gallery(gallery) is not None) == (index is not None):
        raise InputError("give --index FOLDER or --gallery SPEC (Qdrant), exactly one of them")
    r = Retriever.load(bundle, index=index, gallery=gallery, **load_options)
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
        raise InputError(f"--where must be a JSON object, e.g. '{{\"album\": \"beach\"}}' ({e})") from None
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
        "format_version": m["format_version"],
        "model_config": b.model_config,
        "graphs": {name: e["file"] for name, e in m["graphs"].items()},
        "fp16": bool(m.get("fp16_graphs")),
        "vocab_size": b.model_config.get("vocab_size"),
        "verified": m.get("verified"),
        "parity": parity_summary(m.get("parity")),
        "created": m.get("created"),
    }
    trt = m.get("tensorrt")
    if isinstance(trt, dict):
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
        worst = f", max abs {p['max_abs']:.2g} (atol {p['atol']:g})" if p["max_abs"] is not None and p["atol"] else ""
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
    print(f"weights    lam_gg={cfg.get('lam_gg')}  lam_gl={cfg.get('lam_gl')}  lam_ll={cfg.get('lam_ll')}", file=out)
    print(f"graphs     {', '.join(f'{k}: {v}' for k, v in info['graphs'].items())}", file=out)
    print(f"fp16       {'yes' if info['fp16'] else 'no'}", file=out)
    print(f"verified   {info['verified']}", file=out)
    print(f"parity     {_parity_line(info['parity'])}", file=out)
    if "tensorrt" in info:
        t = info["tensorrt"]
        print(f"tensorrt   {t['tensorrt_version']} on {(t['gpu'] or {}).get('name')}, {', '.join(t['precisions'])}; "
              f"limits {t['limits']}; parity {_parity_line(t['parity'])}", file=out)
    if "index" in info:
        ix = info["index"]
        match = "matches this bundle" if ix["matches_bundle"] else f"built with ANOTHER bundle ({ix['bundle_id']})"
        print(f"index      {ix['path']}  (format {ix['format_version']}, {match})", file=out)
        for name, g in ix["galleries"].items():
            print(
                f"  {name:<7}  {g['n']} items, max length {g['max_length']}, locals {g['dtype']}",
                file=out,
            )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mssan_infer", description="Two-stage image-text retrieval.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--bundle", required=True, help="bundle folder written by `python -m export`")
        sp.add_argument("--backend", default="onnxruntime")
        sp.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
        sp.add_argument("--threads", type=int, default=None, help="intra-op threads")
        sp.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
        sp.add_argument("--gallery", default=None,
                        help="galleries in Qdrant instead of an index folder: 'qdrant-edge:PATH' (Qdrant Edge, "
                             "in-process) or 'qdrant:URL' (a server), options after '?' (e.g. ?quantization=int8)")

    ix = sub.add_parser("index", help="encode image features / captions into an index folder")
    common(ix)
    ix.add_argument("--images", help=".npy region features [N, R, Dv]")
    ix.add_argument("--ids", help="image ids, one per line (default: row numbers)")
    ix.add_argument("--texts", help="captions, one per line")
    ix.add_argument("--text-ids", help="caption ids, one per line (default: line numbers)")
    ix.add_argument("--out", help="index folder (written atomically); or use --gallery")
    ix.add_argument("--metadata", help="JSON lines, one object per image (filterable with search --where)")
    ix.add_argument("--text-metadata", help="JSON lines, one object per caption")
    ix.add_argument("--append", action="store_true", help="add to the index at --out")
    ix.add_argument("--fp16-locals", action="store_true", help="store locals and Grams in float16")
    ix.add_argument("--batch-size", type=int, default=32)
    ix.add_argument("--no-progress", action="store_true")

    se = sub.add_parser("search", help="search an index with a caption or an image")
    common(se)
    se.add_argument("--index", help="index folder written by `index --out`; or use --gallery")
    se.add_argument("--where", help="metadata filter as JSON, e.g. '{\"album\": \"beach\"}'")
    se.add_argument("text", nargs="?", help="caption to search the image gallery with")
    se.add_argument("--image", help=".npy region features; searches the caption gallery")
    se.add_argument("--row", type=int, default=0, help="row of --image to use")
    se.add_argument("-k", type=int, default=10)
    se.add_argument("--rerank", type=int, default=100, help="stage-2 depth (0: stage 1 only)")
    se.add_argument("--stage1", default="numpy", choices=("numpy", "faiss", "faiss-ivf", "faiss-hnsw"))
    se.add_argument("--json", action="store_true", help="print one JSON object")

    inf = sub.add_parser("info", help="describe a bundle (and an index)")
    inf.add_argument("--bundle", required=True)
    inf.add_argument("--index")
    inf.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 on an MssanError)."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "info":
            info = run_info(args.bundle, args.index)
            if args.json:
                print(json.dumps(info, indent=2, default=str), file=out)
            else:
                _print_info(info, out)
            return 0
        load = {"backend": args.backend, "device": args.device, "threads": args.threads, "precision": args.precision}
        if args.command == "index":
            r = run_index(
                args.bundle, args.out, images=args.images, ids=args.ids, texts=args.texts, text_ids=args.text_ids,
                metadata=args.metadata, text_metadata=args.text_metadata, gallery=args.gallery,
                append=args.append, progress=not args.no_progress,
                local_dtype="float16" if args.fp16_locals else None, batch_size=args.batch_size, **load,
            )
            print(f"indexed {r.n_images} images and {r.n_texts} captions into {args.out or args.gallery}", file=out)
            return 0
        hits = run_search(
            args.bundle, args.index, text=args.text, image=args.image, row=args.row, k=args.k, rerank=args.rerank,
            stage1=args.stage1, gallery=args.gallery, where=_where(args.where), **load,
        )
        query = f"text: {args.text!r}" if args.text is not None else f"image: {args.image} row {args.row}"
        if args.json:
            payload = {
                "query": {"text": args.text} if args.text is not None else {"image": args.image, "row": args.row},
                "k": args.k,
                "rerank": args.rerank,
                "hits": [{"id": h.id, "score": h.score, "stage1": h.stage1} for h in hits],
            }
            print(json.dumps(payload), file=out)
        else:
            _print_hits(hits, query, out)
        return 0
    except MssanError as e:
        print(f"error: {' '.join(str(e).split())}", file=err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
