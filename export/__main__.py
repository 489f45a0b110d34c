"""``python -m export``: a thin command line over ``export.export_bundle``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from mssan_infer.errors import MssanError, ParityError

from .api import export_bundle
from .onnx import DEFAULT_OPSET


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export an MSSAN checkpoint to a bundle: ONNX graphs (image_encoder, text_encoder, scorer), "
                    "vocab.json and manifest.json, checked against PyTorch.",
        epilog="example: python -m export --checkpoint runs/tiny --out bundle/ --fp16",
    )
    req = p.add_argument_group("required arguments")
    req.add_argument("--checkpoint", "-c", required=True, metavar="DIR",
                     help="checkpoint folder (config.json, model.safetensors, vocab.json)")
    req.add_argument("--out", "-o", required=True, metavar="DIR", help="bundle folder to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--fp16", action="store_true",
                   help="also write fp16 graphs under fp16/ (matrix products fp16; softmax, norms, reductions, GRU fp32)")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute tolerance of the fp32 parity check (default: mssan_infer.spec.TOLERANCES)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not fail on parity errors; they are recorded and the manifest says verified: false")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an export bundle")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (not built yet)")
    p.add_argument("--triton", action="store_true", help="also write a Triton model repository (not built yet)")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only (not every parity check)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        export_bundle(
            args.checkpoint, args.out, opset=args.opset, fp16=args.fp16, atol=args.atol,
            verify=args.verify, tensorrt=args.tensorrt, triton=args.triton, force=args.force,
        )
    except MssanError as e:
        if isinstance(e, ParityError):       # every failure was logged as it was found
            message = str(e).strip().splitlines()[0] + " (every failure is logged above)"
        else:
            message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {type(e).__name__}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
