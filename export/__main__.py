"""``python -m export``: a thin command line over ``export.export_bundle``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from mssan_infer.cli import HelpFormatter, error_line
from mssan_infer.errors import MssanError, ParityError

from .api import ADD_PARTS, add_to_bundle, export_bundle
from .errors import ExportError
from .onnx import DEFAULT_OPSET

log = logging.getLogger("export")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export an MSSAN checkpoint to a bundle: ONNX graphs (image_encoder, text_encoder, "
        "scorer), vocab.json and manifest.json, checked against PyTorch.",
        epilog="examples:\n"
        "  python -m export --checkpoint runs/tiny --out bundle/ --fp16 --triton\n"
        "  python -m export --checkpoint runs/tiny --out bundle/ --fp16 --overwrite   # replace bundle/\n"
        "  python -m export --out bundle/ --add tensorrt --fp16     # + engines; keeps graphs and triton/\n"
        "--out must be a new or empty folder. An existing bundle is replaced only with --overwrite,\n"
        "or added to with --add; any other existing path is never replaced.",
        formatter_class=HelpFormatter,
    )
    req = p.add_argument_group("checkpoint and bundle (--checkpoint is required unless --add)")
    req.add_argument(
        "--checkpoint",
        "-c",
        default=None,
        metavar="DIR",
        help="checkpoint folder (config.json, model.safetensors, vocab.json or tokenizer.json); "
        "optional with --add (then checked against the bundle's)",
    )
    req.add_argument(
        "--out",
        "-o",
        required=True,
        metavar="DIR",
        help="bundle folder to write: a new or empty folder (an existing bundle: --overwrite or --add)",
    )
    out = p.add_argument_group("an existing bundle at --out")
    mode = out.add_mutually_exclusive_group()
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the bundle at --out, everything in it (triton/, tensorrt/ included); the old one "
        "stays until the new one is complete. A folder that is not a bundle is never replaced",
    )
    mode.add_argument(
        "--add",
        action="append",
        default=[],
        choices=list(ADD_PARTS),
        metavar="PART",
        help="add a deployment part (tensorrt or triton; repeatable) to the bundle at --out and keep "
        "the rest: its graphs, fp16/int8/pixel graphs, the other part, its bundle id. Takes the "
        "--trt-* / --triton-* options; --fp16 with --add tensorrt also builds fp16 engines",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="also write fp16 graphs under fp16/ "
        "(matrix products fp16; softmax, norms, reductions, GRU fp32)",
    )
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write int8/text_encoder.onnx (ONNX Runtime CPU fusions + dynamic int8 MatMul/Gemm "
        "weights), gated by top-10 agreement and the R@1 ratio against fp32 on a dev split (--int8-data); "
        "a model too weak to judge is refused (--no-verify writes it unverified). "
        "Retriever.load(..., OnnxRuntimeOptions(precision='int8')) runs it. Default: on for a "
        "transformer text tower (the default of new models), off for the Bi-GRU; --no-int8 turns it off",
    )
    p.add_argument(
        "--int8-data",
        default=None,
        metavar="DIR",
        help="precomp folder whose dev split (test if it has none) the int8 gate runs on (default: the "
        "training data the checkpoint records; regenerated when it was synthetic and is gone)",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=None,
        help="absolute tolerance of the fp32 parity check (default: mssan_infer.spec.TOLERANCES)",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not fail on parity errors; they are recorded and the manifest says verified: false",
    )
    trt = p.add_argument_group("TensorRT (docs/deployment.md)")
    trt.add_argument(
        "--tensorrt",
        action="store_true",
        help="also build TensorRT engines under tensorrt/ (needs tensorrt, cuda-python and a GPU)",
    )
    trt.add_argument(
        "--trt-profile",
        action="append",
        default=[],
        metavar="AXIS=1,OPT,MAX",
        help="override the optimisation profile of an axis (B, R, L, Ni, Nt; min is 1, max at least "
        "what the bundle sends: L >= max_len, R >= the pixel grid); repeatable",
    )
    trt.add_argument(
        "--trt-profiles",
        type=int,
        default=2,
        metavar="N",
        help="identical profiles per engine = concurrent execution contexts (default 2)",
    )
    trt.add_argument(
        "--trt-workspace-mib", type=int, default=2048, help="builder workspace limit (default 2048)"
    )
    trt.add_argument(
        "--trt-timing-cache",
        default=None,
        metavar="FILE",
        help="timing cache to read and update (default tensorrt/timing.cache in the bundle)",
    )
    trt.add_argument(
        "--trt-version-compatible",
        action="store_true",
        help="build version-compatible engines (BuilderFlag.VERSION_COMPATIBLE)",
    )
    trt.add_argument(
        "--trt-hardware-compatibility",
        default="none",
        choices=["none", "ampere_plus", "same_compute_capability"],
        help="hardware compatibility level of the engines (default none: this GPU only)",
    )
    tri = p.add_argument_group("Triton (docs/deployment.md)")
    tri.add_argument(
        "--triton", action="store_true", help="also write a Triton model repository under triton/"
    )
    tri.add_argument(
        "--triton-backend",
        default="onnxruntime",
        choices=["onnxruntime", "tensorrt", "python"],
        help="how the encoders and scorer run in Triton (default onnxruntime: NVIDIA's containers and "
        "`python -m mssan_infer serve` both run it; tensorrt needs --tensorrt and a GPU container; "
        "python: ONNX Runtime inside the Python backend)",
    )
    tri.add_argument(
        "--triton-precision",
        default="fp32",
        choices=["fp32", "fp16"],
        help="graphs/engines served (fp16 needs --fp16)",
    )
    tri.add_argument(
        "--triton-instances",
        type=int,
        default=None,
        help="instances per model (default 1; tensorrt: one per engine profile, at most --trt-profiles)",
    )
    tri.add_argument(
        "--triton-max-batch",
        type=int,
        default=None,
        help="encoders' max_batch_size (default: the B profile maximum; tensorrt: at most the engines')",
    )
    tri.add_argument(
        "--triton-index",
        default=None,
        metavar="DIR",
        help="an index (from `python -m mssan_infer index`) to copy into the retriever model; or pass "
        "`--index DIR` to `python -m mssan_infer serve` later",
    )
    tri.add_argument(
        "--triton-threads",
        type=int,
        default=0,
        metavar="N",
        help="ONNX Runtime intra-op threads per model (intra_op_thread_count; default 0: its own)",
    )
    tri.add_argument(
        "--triton-retriever-graphs",
        default="auto",
        choices=["auto", "local", "bls"],
        help="how the retriever runs the graphs: local (ONNX Runtime in its own process: fastest on "
        "CPU), bls (calls the models: GPUs), auto (default: local on a CPU-only server with "
        "onnxruntime, else bls)",
    )
    pix = p.add_argument_group("pixel graph (image_encoder_pixels.onnx: images in, no precomputed regions)")
    pix.add_argument(
        "--pixels",
        action="store_true",
        help="also export backbone + image encoder from [B,3,H,W] pixels, with its preprocessing "
        "in the manifest (use the backbone/weights/size the training features were made with)",
    )
    pix.add_argument(
        "--features",
        default=None,
        metavar="DATA",
        help="the training features' folder (its features.json): backbone, image size and resize "
        "are taken from it and the weights' sha256 is checked",
    )
    pix.add_argument(
        "--backbone",
        default=None,
        help="resnet50 | resnet101 | resnet152 (default: from --features, else resnet152)",
    )
    pix.add_argument(
        "--backbone-weights",
        default=None,
        metavar="PATH",
        help="local torchvision-layout weights (.pth/.pt read with weights_only, or .safetensors)",
    )
    pix.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="square crop side in pixels (default: from --features, else 448)",
    )
    pix.add_argument(
        "--resize", type=int, default=None, help="shorter side before the centre crop (default: --image-size)"
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="log warnings and errors only (not every parity check)"
    )
    return p


# options that change the graphs: --add keeps the bundle's graphs, so it refuses them
_GRAPH_OPTIONS = {
    "int8": "--int8",
    "int8_data": "--int8-data",
    "pixels": "--pixels",
    "features": "--features",
    "backbone": "--backbone",
    "backbone_weights": "--backbone-weights",
    "image_size": "--image-size",
    "resize": "--resize",
    "atol": "--atol",
}


def _check_add(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse what ``--add`` cannot do, naming the flags and what to run instead."""
    if args.tensorrt or args.triton:
        given = " ".join(f for f, on in (("--tensorrt", args.tensorrt), ("--triton", args.triton)) if on)
        raise ExportError(
            f"with --add, name every part to add with --add (e.g. --add tensorrt --add triton), not {given}"
        )
    default = parser.get_default
    changed = [flag for key, flag in _GRAPH_OPTIONS.items() if getattr(args, key) != default(key)]
    if args.opset != DEFAULT_OPSET:
        changed.append("--opset")
    if not args.verify:
        changed.append("--no-verify")
    if args.fp16 and "tensorrt" not in args.add:
        changed.append("--fp16")
    if changed:
        raise ExportError(
            f"--add keeps the bundle's graphs as they are, so {', '.join(changed)} cannot apply; to change "
            f"the graphs re-export with --checkpoint CKPT --out {args.out} --overwrite "
            f"{' '.join(changed)} ..."
        )


def _int8(args: argparse.Namespace) -> bool:
    """``--int8`` / ``--no-int8`` as given, else the checkpoint's default (``export.int8.default_int8``)."""
    from .int8 import default_int8

    int8 = bool(args.int8) if args.int8 is not None else default_int8(args.checkpoint)
    if args.int8 is None and int8:
        log.info("writing the int8 text encoder, the default for a transformer text tower (--no-int8: skip)")
    if args.int8_data is not None and not int8:
        said = "--no-int8" if args.int8 is False else "a Bi-GRU tower writes none by default"
        raise ExportError(
            f"--int8-data names the data of the int8 text encoder's gate, and no int8 text encoder is "
            f"written ({said}): pass --int8 as well, or drop --int8-data"
        )
    return int8


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.add:
            _check_add(args, parser)
        elif args.checkpoint is None:
            raise ExportError(
                "--checkpoint DIR is required (to add a deployment part to an existing bundle instead: "
                "--out BUNDLE --add tensorrt|triton)"
            )
        tensorrt: object = False
        triton: object = False
        if args.tensorrt or "tensorrt" in args.add:
            from .tensorrt import TensorRTSettings, parse_profile_override

            tensorrt = TensorRTSettings(
                profiles=dict(parse_profile_override(t) for t in args.trt_profile),
                precisions=("fp32", "fp16") if args.fp16 else ("fp32",),
                num_profiles=args.trt_profiles,
                workspace_mib=args.trt_workspace_mib,
                timing_cache=args.trt_timing_cache,
                version_compatible=args.trt_version_compatible,
                hardware_compatibility=args.trt_hardware_compatibility,
            )
        if args.triton or "triton" in args.add:
            from .triton import TritonSettings

            triton = TritonSettings(
                backend=args.triton_backend,
                precision=args.triton_precision,
                instances=args.triton_instances,
                max_batch_size=args.triton_max_batch,
                index=args.triton_index,
                threads=args.triton_threads,
                retriever_graphs=args.triton_retriever_graphs,
            )
        if args.add:
            add_to_bundle(args.out, tensorrt=tensorrt, triton=triton, checkpoint=args.checkpoint)
            return 0
        int8 = _int8(args)
        export_bundle(
            args.checkpoint,
            args.out,
            opset=args.opset,
            fp16=args.fp16,
            atol=args.atol,
            verify=args.verify,
            tensorrt=tensorrt,
            triton=triton,
            overwrite=args.overwrite,
            pixels=args.pixels,
            backbone=args.backbone,
            backbone_weights=args.backbone_weights,
            image_size=args.image_size,
            resize=args.resize,
            features=args.features,
            int8=int8,
            int8_data=args.int8_data,
        )
    except MssanError as e:
        message = str(e)
        if isinstance(e, ParityError):  # every failure was logged as it was found
            message = message.strip().splitlines()[0] + " (every failure is logged above)"
        print(error_line(message), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
