"""Pixel path measurements: parity, preprocessing and encoder throughput (CPU; ONNX Runtime vs PyTorch).

    python -m bench.pixel_path [--backbone resnet50] [--sizes 224 448] [--batch 8] [--iters 3] [--threads 2]

ResNet weights are random (nothing is downloaded; throughput and parity do not
depend on the values); BatchNorm statistics are randomised so the folded graph is
not trivially an identity. The model is the paper preset (D=1024, Dv=2048).
Writes ``bench/results/pixel_path.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from export.inputs import FIRST_TOKEN_ID
from export.onnx import export_graph
from export.pixels import PixelEncoderGraph
from mssan_infer.images.preprocess import Preprocessing, load_image, preprocess_batch
from mssan_infer.spec import IMAGE_ENCODER_PIXELS
from training.backbone import build_backbone
from training.config import ModelConfig
from training.images import EvalTransform
from training.model import MSSAN

OUT = Path(__file__).resolve().parent / "results" / "pixel_path.json"


def _photos(root: Path, n: int) -> list[Path]:
    """``n`` 640x480 JPEGs with texture (what a camera gives, at a small size)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(n):
        base = np.stack([xx * 0.4 + i * 10, yy * 0.5, (xx + yy) * 0.2], -1) % 256
        arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        p = root / f"photo{i}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    return paths


def _rate(fn: Any, n_items: int, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return n_items * iters / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    net = build_backbone(args.backbone)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    model = MSSAN(
        ModelConfig(vocab_size=FIRST_TOKEN_ID + 100, word_dim=300, embed_size=1024, img_dim=net.out_dim)
    ).eval()
    graph = PixelEncoderGraph(net.eval(), model).eval()
    res: dict[str, Any] = {
        "backbone": args.backbone,
        "batch": args.batch,
        "threads": args.threads,
        "iters": args.iters,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "loadavg_before": os.getloadavg(),
        "sizes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        t0 = time.perf_counter()
        example = {
            "pixels": np.random.default_rng(0)
            .standard_normal((2, 3, args.sizes[0], args.sizes[0]))
            .astype(np.float32)
        }
        path = export_graph(graph, IMAGE_ENCODER_PIXELS, example, tmpd / IMAGE_ENCODER_PIXELS.file)
        res["export_s"] = time.perf_counter() - t0
        res["onnx_mib"] = path.stat().st_size / 2**20
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        photos = _photos(tmpd, args.batch)
        for size in args.sizes:
            cfg = Preprocessing(image_size=size, resize=size)
            row: dict[str, Any] = {"grid_regions": None, "parity_max_abs": {}}
            # preprocessing: numpy runtime vs training's torch eval transform (both decode the JPEGs)
            row["preprocess_numpy_img_s"] = _rate(
                lambda: preprocess_batch(photos, cfg), len(photos), args.iters
            )
            tr = EvalTransform(cfg)
            torch.set_num_threads(1)  # as in DataLoader workers; elementwise ops on one image
            row["preprocess_torch_img_s"] = _rate(
                lambda: torch.stack([tr(load_image(p)) for p in photos]), len(photos), args.iters
            )
            torch.set_num_threads(args.threads)
            pixels = preprocess_batch(photos, cfg)
            ref_pix = torch.stack([tr(load_image(p)) for p in photos]).numpy()
            row["preprocess_max_abs_vs_torch"] = float(np.abs(pixels - ref_pix).max())
            # parity: B=1 and B=batch
            for b in (1, args.batch):
                with torch.inference_mode():
                    ref = [t.numpy() for t in graph(torch.from_numpy(pixels[:b]))]
                got = sess.run(None, {"pixels": pixels[:b]})
                for name, r, g in zip(IMAGE_ENCODER_PIXELS.output_names, ref, got):
                    row["parity_max_abs"][f"B{b}/{name}"] = float(np.abs(r - g).max())
                row["grid_regions"] = int(got[1].shape[1])
            # encoder throughput at batch B
            x = torch.from_numpy(pixels)
            with torch.inference_mode():
                row["encoder_torch_img_s"] = _rate(lambda: graph(x), len(photos), args.iters)
            row["encoder_ort_img_s"] = _rate(
                lambda: sess.run(None, {"pixels": pixels}), len(photos), args.iters
            )
            res["sizes"][str(size)] = row
            print(json.dumps({size: row}, indent=1), flush=True)
    res["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"\n{args.backbone}, batch {args.batch}, {args.threads} threads (images/s)")
    print(
        f"{'size':>6}{'regions':>9}{'prep numpy':>12}{'prep torch':>12}"
        f"{'enc ORT':>10}{'enc torch':>11}{'max |diff|':>12}"
    )
    for size, r in res["sizes"].items():
        print(
            f"{size:>6}{r['grid_regions']:>9}{r['preprocess_numpy_img_s']:>12.1f}{r['preprocess_torch_img_s']:>12.1f}"
            f"{r['encoder_ort_img_s']:>10.2f}{r['encoder_torch_img_s']:>11.2f}{max(r['parity_max_abs'].values()):>12.2e}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
