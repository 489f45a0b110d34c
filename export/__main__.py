"""``python -m export``: a thin command line over ``export.export_bundle``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from mssan_infer.cli import HelpFormatter, error_line
from mssan_infer.errors import MssanError, ParityError

from .api import export_bundle
from .onnx import DEFAULT_OPSET


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export an MSSAN checkpoint to a bundle: ONNX graphs (image_encoder, text_encoder, "
        "scorer), vocab.json and manifest.json, checked against PyTorch.",
        epilog="example: python -m export --checkpoint runs/tiny --out bundle/ --fp16 --triton",
        formatter_class=HelpFormatter,
    )
    req = p.add_argument_group("required arguments")
    req.add_argument(
        "--checkpoint",
        "-c",
        required=True,
        metavar="DIR",
        help="checkpoint folder (config.json, model.safetensors, vocab.json or tokenizer.json)",
    )
    req.add_argument("--out", "-o", required=True, metavar="DIR", help="bundle folder to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="also write fp16 graphs under fp16/ "
        "(matrix products fp16; softmax, norms, reductions, GRU fp32)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write int8/text_encoder.onnx (ONNX Runtime CPU fusions + dynamic int8 MatMul/Gemm "
        "weights), gated by top-10 agreement and the R@1 ratio on the synthetic test split; "
        "Retriever.load(..., precision='int8') runs it",
    )
    p.add_argument(
        "--int8-data",
        default=None,
        metavar="DIR",
        help="precomp folder whose test split the int8 gate uses (default: the synthetic test split)",
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
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an export bundle")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        tensorrt: object = False
        triton: object = False
        if args.tensorrt:
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
        if args.triton:
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
        export_bundle(
            args.checkpoint,
            args.out,
            opset=args.opset,
            fp16=args.fp16,
            atol=args.atol,
            verify=args.verify,
            tensorrt=tensorrt,
            triton=triton,
            force=args.force,
            pixels=args.pixels,
            backbone=args.backbone,
            backbone_weights=args.backbone_weights,
            image_size=args.image_size,
            resize=args.resize,
            features=args.features,
            int8=args.int8,
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
