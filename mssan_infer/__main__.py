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
from typing import Any, Sequence, TextIO

import numpy as np

from .bundle import load_bundle
from .errors import InputError, MssanError
from .index import ItemId, read_index_manifest
from .retriever import Hit, Retriever

__all__ = ["main", "run_index", "run_search", "run_info", "read_lines"]

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


def run_index(
    bundle: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    ids: str | os.PathLike[str] | None = None,
    texts: str | os.PathLike[str] | None = None,
    text_ids: str | os.PathLike[str] | None = None,
    append: bool = False,
    chunk: int = 1024,
    progress: bool = True,
    **load_options: Any,
) -> Retriever:
    """Encode image features and/or captions into an index folder ``out``.

    Args:
        images: ``.npy`` ``[N, R, Dv]``; ids from ``ids`` (one per line, kept as str) or row numbers.
        texts: captions, one per line; ids from ``text_ids`` or line numbers.
        append: add to the index already at ``out`` instead of starting a new one.
        chunk: images encoded and added per step (bounds memory for large files).
    Raises:
        InputError: nothing to index, id count mismatch, bad files.
        IndexFileError / BundleError: as in :meth:`Retriever.load` and :meth:`Retriever.save`.
    """
    if images is None and texts is None:
        raise InputError("nothing to index: give --images FEATS.npy and/or --texts CAPTIONS.txt")
    if ids is not None and images is None:
        raise InputError("--ids needs --images")
    if text_ids is not None and texts is None:
        raise InputError("--text-ids needs --texts")
    outp = Path(out)
    index = outp if append and outp.exists() else None
    r = Retriever.load(bundle, index=index, **load_options)
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
        bar = _bar(n, "encode images", progress)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            r.add_images(np.asarray(feats[a:b], dtype=np.float32), ids=image_ids[a:b])
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
        r.add_texts(caps, ids=cap_ids, progress=progress)
    r.save(outp)
    return r


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr)


def run_search(
    bundle: str | os.PathLike[str],
    index: str | os.PathLike[str],
    *,
    text: str | None = None,
    image: str | os.PathLike[str] | None = None,
    row: int = 0,
    k: int = 10,
    rerank: int = 100,
    **load_options: Any,
) -> list[Hit]:
    """Search an index with a caption (-> images) or with row ``row`` of an image-feature file (-> captions).

    Raises:
        InputError: neither or both queries, a row outside the file, bad k/rerank.
    """
    if (text is None) == (image is None):
        raise InputError("give a caption to search images, or --image FEATS.npy [--row N] to search captions")
    r = Retriever.load(bundle, index=index, **load_options)
    if text is not None:
        return r.search(text=text, k=k, rerank=rerank)
    assert image is not None
    feats = _load_features(image)
    if not 0 <= row < feats.shape[0]:
        raise InputError(f"--row {row} is outside {image}, which has {feats.shape[0]} images")
    return r.search(image=np.asarray(feats[row], dtype=np.float32), k=k, rerank=rerank)


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
        "graphs": {name: (e["file"] if isinstance(e, dict) else e) for name, e in m["graphs"].items()},
        "fp16": bool(m.get("fp16_graphs")),
        "int8": bool(m.get("int8_graphs")),
        "text_encoder": b.model_config.get("text_encoder", "bigru"),
        "tokenizer": (m.get("tokenizer") or {}).get("kind", "word"),
        "vocab_size": b.model_config.get("vocab_size"),
        "verified": m.get("verified"),
        "parity": _parity_summary(m.get("parity")),
        "created": m.get("created"),
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


def _parity_summary(parity: Any) -> Any:
    if not isinstance(parity, dict):
        return parity
    keep = ("ok", "passed", "max_abs_diff", "atol", "precision", "max_score_diff")
    small = {k: v for k, v in parity.items() if k in keep or not isinstance(v, (dict, list))}
    return small or {"keys": sorted(parity)}


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
    print(f"text       {info['text_encoder']} tower, {info['tokenizer']} tokenizer", file=out)
    print(f"fp16       {'yes' if info['fp16'] else 'no'}   int8 text encoder {'yes' if info['int8'] else 'no'}", file=out)
    print(f"verified   {info['verified']}", file=out)
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

    ix = sub.add_parser("index", help="encode image features / captions into an index folder")
    common(ix)
    ix.add_argument("--images", help=".npy region features [N, R, Dv]")
    ix.add_argument("--ids", help="image ids, one per line (default: row numbers)")
    ix.add_argument("--texts", help="captions, one per line")
    ix.add_argument("--text-ids", help="caption ids, one per line (default: line numbers)")
    ix.add_argument("--out", required=True, help="index folder (written atomically)")
    ix.add_argument("--append", action="store_true", help="add to the index at --out")
    ix.add_argument("--fp16-locals", action="store_true", help="store locals and Grams in float16")
    ix.add_argument("--batch-size", type=int, default=32)
    ix.add_argument("--no-progress", action="store_true")

    se = sub.add_parser("search", help="search an index with a caption or an image")
    common(se)
    se.add_argument("--index", required=True)
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
                append=args.append, progress=not args.no_progress,
                local_dtype="float16" if args.fp16_locals else None, batch_size=args.batch_size, **load,
            )
            print(f"indexed {r.n_images} images and {r.n_texts} captions into {args.out}", file=out)
            return 0
        hits = run_search(
            args.bundle, args.index, text=args.text, image=args.image, row=args.row, k=args.k, rerank=args.rerank,
            stage1=args.stage1, **load,
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
