"""The argparse front of ``python -m mssan_infer``: flags in, typed calls out, one line per error."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Sequence, TextIO

from mssan_infer.backends import backend_options
from mssan_infer.bundle import load_bundle
from mssan_infer.cli import HelpFormatter, error_line
from mssan_infer.cli.index import PARTIAL_EXIT, run_index
from mssan_infer.cli.info import print_info, run_info
from mssan_infer.cli.remove import run_remove
from mssan_infer.cli.search import print_hits, run_search, where_filter
from mssan_infer.errors import InputError, MssanError
from mssan_infer.gallery.stage1 import STAGE1_METHODS
from mssan_infer.gallery.storage import LAYOUTS
from mssan_infer.images.files import is_features_file
from mssan_infer.options import (
    BackendOptions,
    GalleryOptions,
    OnnxRuntimeOptions,
    SearchOptions,
    Stage1Options,
    TensorRTOptions,
    TritonOptions,
)
from mssan_infer.triton.server import DEFAULT_PORTS

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mssan_infer",
        description="Two-stage image-text retrieval.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="{index,search,remove,info,serve}")

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
            choices=("fp32", "fp16", "int8"),
            help="graphs to run: fp32; fp16 (needs an `export --fp16` bundle); int8 (the int8 text encoder "
            "of an `export --int8` bundle beside the fp32 image encoder and scorer; onnxruntime only)",
        )
        sp.add_argument(
            "--fast",
            action="store_true",
            help="the fast query path: --precision int8 (the int8 text encoder), and for index --layout int8 "
            "(int8 locals read by the integer scorer); docs/galleries.md 'Layouts'",
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
        help="encode images / captions into an index folder or Qdrant galleries",
        formatter_class=HelpFormatter,
        description="Encode images and/or captions into an index folder (--out) or Qdrant galleries "
        "(--gallery).\n\n"
        "Images: a .npy of region features [N, R, Dv]; or, with a bundle exported with --pixels, image "
        "folders (--recursive: with their subfolders), image files (JPEG, PNG, WebP, BMP... whatever "
        "Pillow reads) and .txt lists of image paths (one per line, relative to the list's folder). An "
        "image file that cannot be read (missing, truncated, not an image) is reported at the end and the "
        "others are indexed.\n\n"
        "Ids: one per line from --ids / --text-ids (kept as text); image files are named by their path "
        "relative to the folder given (a file or list entry: as written); otherwise row / line numbers 0, "
        "1, 2, ... . Lines of every text file are numbered as they are: a blank line inside one is an "
        "error. An index at --out or galleries at --gallery that hold items are never replaced or extended "
        "unless you say so (--overwrite, --append), and --append refuses ids already there unless "
        "--new-ids numbers the new items after them.\n\n"
        f"Exit status: 0 done; 1 error (nothing changed); {PARTIAL_EXIT} indexed, but some image files "
        "could not be read (each is listed on stderr).",
    )
    common(ix)
    ix.add_argument(
        "--images",
        nargs="+",
        metavar="PATH",
        help="FEATS.npy (region features [N, R, Dv]), or image folders, image files and .txt lists of image "
        "paths (needs a bundle exported with --pixels)",
    )
    ix.add_argument(
        "--recursive", action="store_true", help="with --images FOLDER: also index the images of subfolders"
    )
    ix.add_argument(
        "--ids",
        help="image ids, one per line, kept as text (default: row numbers 0..N-1 of a .npy; an image "
        "file's path)",
    )
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
        help="add to the index at --out or the galleries at --gallery (ids must not repeat: see --new-ids)",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the index at --out or the galleries at --gallery, atomically (the new one is built "
        "beside it, then swapped in)",
    )
    ix.add_argument(
        "--new-ids",
        action="store_true",
        help="number items without an ids file after the largest int id in the index, not from 0",
    )
    ix.add_argument(
        "--layout",
        choices=tuple(LAYOUTS),
        default=None,
        help="gallery layout (default fp32, or the layout of the index appended to); docs/galleries.md "
        "'Layouts'",
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
    se.add_argument(
        "--image",
        help="an image file (needs a bundle exported with --pixels) or a .npy of region features (see "
        "--row); searches the caption gallery",
    )
    se.add_argument("--row", type=int, default=None, help="row of a .npy --image to use (default 0)")
    se.add_argument("-k", type=int, default=10, help="results to print")
    se.add_argument("--rerank", type=int, default=100, help="stage-2 depth (0: stage 1 only)")
    se.add_argument(
        "--stage1",
        default=None,
        choices=STAGE1_METHODS,
        help="stage-1 search of an index folder (numpy exact; faiss-ivf approximate; default numpy); "
        "Qdrant galleries take theirs in --gallery",
    )
    se.add_argument("--json", action="store_true", help="print one JSON object (ids keep their type)")

    rm = sub.add_parser(
        "remove",
        help="remove items by id from an index folder or Qdrant galleries",
        formatter_class=HelpFormatter,
        description="Remove items by id. An index folder is rewritten atomically: every id is removed, or "
        "(an unknown id, an id in both galleries) none is and the folder is unchanged. Ids are matched as "
        "text, as `search` prints them.",
    )
    common(rm)
    rm.add_argument("--index", help="index folder; or --gallery for Qdrant")
    rm.add_argument(
        "--ids",
        nargs="+",
        required=True,
        metavar="ID",
        help="ids to remove, or one .txt file of ids (one per line)",
    )
    rm.add_argument(
        "--from",
        dest="kind",
        choices=("images", "captions"),
        default=None,
        help="look for the ids only in this gallery (needed for an id that is in both)",
    )

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


def _in_qdrant(args: argparse.Namespace) -> bool:
    """Whether ``--gallery`` names Qdrant galleries (not given, or ``memory``: an index folder)."""
    return args.gallery is not None and args.gallery != "memory"


def _gallery(args: argparse.Namespace, memory: GalleryOptions) -> GalleryOptions | str:
    """``--gallery`` (Qdrant) when given, else the in-memory gallery's options."""
    return str(args.gallery) if _in_qdrant(args) else memory


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
                print_info(info, out)
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
        for flag, value in (("--threads", args.threads), ("--batch-size", getattr(args, "batch_size", 1))):
            if value is not None and value < 1:
                raise InputError(f"{flag} must be a positive int, got {value}")
        if getattr(args, "fast", False):
            if args.precision not in ("fp32", "int8") or getattr(args, "layout", None) not in (None, "int8"):
                raise InputError("--fast is --precision int8 with --layout int8: drop --fast or those flags")
            args.precision = "int8"
            if args.command == "index" and not _in_qdrant(args):
                args.layout = "int8"
        backend = _backend(args)
        if args.command == "index":
            layout = args.layout
            if _in_qdrant(args) and layout is not None:
                raise InputError(
                    "--layout is for an index folder (--out); a Qdrant gallery takes its storage options in "
                    "--gallery (e.g. ?local_dtype=uint8)"
                )
            summary = run_index(
                args.bundle,
                args.out,
                images=args.images,
                recursive=args.recursive,
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
            for _, why in summary.failed:  # the error names the file: `failed: PATH: reason`
                print(f"failed: {why}", file=err)
            if summary.skipped:
                print(
                    f"note: {len(summary.skipped)} file(s) in the folders given are not images by their "
                    f"extension and were left out, e.g. {summary.skipped[0]}",
                    file=err,
                )
            print(summary.line(), file=out)
            return PARTIAL_EXIT if summary.failed else 0
        if args.command == "remove":
            removed = run_remove(
                args.bundle,
                args.index,
                ids=args.ids,
                kind=args.kind,
                gallery=_gallery(args, GalleryOptions()),
            )
            print(removed.line(), file=out)
            return 0
        if args.stage1 is not None and _in_qdrant(args):
            raise InputError(
                "--stage1 is for an index folder (--index); Qdrant galleries take their stage-1 search in "
                "--gallery (e.g. ?exact=false&hnsw_ef=256, or ?quantization=int8)"
            )
        stage1 = Stage1Options(method=args.stage1 or "numpy")
        if args.image is not None and args.row is None and is_features_file(args.image):
            args.row = 0
        hits = run_search(
            args.bundle,
            args.index,
            text=args.text,
            image=args.image,
            row=args.row,
            k=args.k,
            rerank=args.rerank,
            gallery=_gallery(args, GalleryOptions(stage1=stage1)),
            where=where_filter(args.where),
            backend=backend,
        )
        query = (
            f"text: {args.text!r}"
            if args.text is not None
            else f"image: {args.image}" + (f" row {args.row}" if args.row is not None else "")
        )
        if args.json:
            payload = {
                "query": {"text": args.text}
                if args.text is not None
                else {"image": args.image, "row": args.row},
                "k": args.k,
                "rerank": args.rerank,
                # text, source and metadata are always there: null when the hit has none
                "hits": [
                    {
                        "id": h.id,
                        "score": h.score,
                        "stage1": h.stage1,
                        "text": h.text,
                        "source": h.source,
                        "metadata": h.metadata,
                    }
                    for h in hits
                ],
            }
            print(json.dumps(payload), file=out)
        else:
            print_hits(hits, query, out)
        return 0
    except MssanError as e:
        print(error_line(e), file=err)
        return 1
