"""The end-to-end demo on the embedded synthetic default: ``python -m quickstart``.

synth -> train (tiny preset: MiniLM's first 2 layers as the text tower) -> evaluate -> export (fp32 +
fp16, and the int8 text encoder of a transformer tower as `python -m export` writes it by default; parity
and the int8 gate enforced) -> index the test images with the torch-free runtime -> search both ways ->
print. Everything lands under ``--work`` (default ``demo/``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CAPS_PER_IMAGE = 5


def _table(rep: dict) -> str:  # type: ignore[type-arg]
    lines = [
        f"  {'mode':<16}{'i2t R@1':>8}{'R@5':>7}{'R@10':>7}{'t2i R@1':>9}{'R@5':>7}{'R@10':>7}{'rSum':>8}"
    ]
    for mode, r in rep.items():
        i, t = r["i2t"], r["t2i"]
        lines.append(
            f"  {mode:<16}{i['r1']:>8.1f}{i['r5']:>7.1f}{i['r10']:>7.1f}{t['r1']:>9.1f}"
            f"{t['r5']:>7.1f}{t['r10']:>7.1f}{r['rsum']:>8.1f}"
        )
    return "\n".join(lines)


def runtime_recall(
    r: Any,
    images: np.ndarray,
    mask: np.ndarray | None,
    captions: Sequence[str],
    img_ids: Sequence[Any],
    cap_ids: Sequence[Any],
    rerank: int,
    batch: int = 100,
) -> dict[str, float]:
    """R@1 (%) both ways through the runtime ``r`` (a ``Retriever`` holding ``images`` as ``img_ids`` and
    ``captions`` as ``cap_ids``): every caption searches the images and every image the captions,
    two-stage at depth ``rerank`` -- the protocol of the table's ``twostage@K`` row, so the two agree
    up to float rounding between ONNX Runtime and PyTorch (and the table's ties counted against)."""
    image_of_caption = {c: j // CAPS_PER_IMAGE for j, c in enumerate(cap_ids)}
    row_of_image = {i: n for n, i in enumerate(img_ids)}
    t2i = 0
    for s in range(0, len(captions), batch):
        found = r.search_batch(texts=list(captions[s : s + batch]), k=1, rerank=rerank)
        t2i += sum(row_of_image.get(h[0].id) == (s + q) // CAPS_PER_IMAGE for q, h in enumerate(found))
    i2t = 0
    for s in range(0, len(images), batch):
        found = r.search_batch(
            images=np.asarray(images[s : s + batch], np.float32),
            image_mask=None if mask is None else np.asarray(mask[s : s + batch], np.float32),
            k=1,
            rerank=rerank,
        )
        i2t += sum(image_of_caption.get(h[0].id) == s + q for q, h in enumerate(found))
    return {"i2t": 100.0 * i2t / len(images), "t2i": 100.0 * t2i / len(captions)}


def recall_line(
    runtime: dict[str, float], table: dict[str, Any], rerank: int, images: int, captions: int
) -> str:
    """The demo's last recall line: the runtime's R@1 beside the table's ``twostage@{rerank}`` row."""
    row = table[f"twostage@{rerank}"]
    return (
        f"  runtime (mssan_infer, ONNX Runtime) two-stage@{rerank} R@1, all {images} images / {captions} "
        f"captions as queries:\n      i2t {runtime['i2t']:.1f}, t2i {runtime['t2i']:.1f} "
        f"(the table's twostage@{rerank} row: {row['i2t']['r1']:.1f} / {row['t2i']['r1']:.1f})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quickstart", description=__doc__)
    ap.add_argument("--work", default="demo", help="folder for data, checkpoint, bundle and index")
    ap.add_argument("--images", type=int, default=2000, help="synthetic training images")
    ap.add_argument("--epochs", type=int, default=None, help="override the tiny preset's epochs")
    ap.add_argument(
        "--text-encoder",
        default=None,
        choices=["bigru", "transformer"],
        help="the text tower (default: the tiny preset's, transformer: the bundled MiniLM's first 2 layers; "
        "bigru: the paper's Bi-GRU)",
    )
    ap.add_argument("--rerank", type=int, default=100)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("export", "mssan_infer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = Path(args.work)
    t0 = time.perf_counter()

    from training import synth
    from training.checkpoint import load_checkpoint
    from training.data import load_split
    from training.evaluate import evaluate_split
    from training.train import train

    data, ckpt, bundle, index = work / "data", work / "checkpoint", work / "bundle", work / "index"
    print(f"[1/6] synthetic data ({args.images} training images) -> {data}")
    synth.generate(data, images=args.images, seed=0)
    print(f"[2/6] training the tiny preset -> {ckpt}")
    res = train(
        data,
        ckpt,
        preset="tiny",
        epochs=args.epochs,
        progress=sys.stderr.isatty(),
        text_encoder=args.text_encoder,
    )
    print(f"      best dev rSum {res['best_dev_rsum']:.1f}, {res['wall_s']:.0f} s")
    print(f"[3/6] evaluating on the test split (two-stage at K={args.rerank})")
    ck = load_checkpoint(ckpt)
    test = load_split(data, "test")
    table = evaluate_split(
        ck.model, test.images, test.region_mask, test.captions, ck.tokenizer, rerank=args.rerank
    )
    print(_table(table))

    from export import export_bundle
    from export.int8 import default_int8

    int8 = default_int8(ckpt)  # as `python -m export` does: the int8 text encoder of a transformer tower
    print(
        f"[4/6] exporting to ONNX (fp32 + fp16{' + int8 text encoder' if int8 else ''}) with parity checks "
        f"-> {bundle}"
    )
    export_bundle(ckpt, bundle, fp16=True, int8=int8, overwrite=True)

    from mssan_infer import Retriever

    r = Retriever.load(bundle)
    parity = r.bundle.manifest.parity
    print(f"      verified: {r.bundle.manifest.verified}")
    for prec, rep in parity.items():
        diffs = ", ".join(f"{g} {d:.1e}" for g, d in rep.get("max_abs", {}).items())
        print(f"      {prec}: passed {rep.get('passed')}; max |ONNX - PyTorch|: {diffs}")
        gate = rep.get("split_check") or {}
        if gate.get("recall1_ratio"):
            ratio, agree = gate["recall1_ratio"], gate.get("top10_agreement", {})
            print(
                f"      {prec} gate on the dev split: R@1 int8/fp32 t2i {ratio['t2i']:.3f}, "
                f"i2t {ratio['i2t']:.3f}; "
                f"top-10 agreement t2i {agree.get('t2i', {}).get('mean', float('nan')):.3f}, "
                f"i2t {agree.get('i2t', {}).get('mean', float('nan')):.3f}"
            )
    print(f"[5/6] indexing {test.n_images} test images and {len(test.captions)} captions -> {index}")
    img_ids = [f"img{i:04d}" for i in range(test.n_images)]
    cap_ids = [f"cap{j:05d}" for j in range(len(test.captions))]
    r.add_images(test.images, ids=img_ids, mask=test.region_mask)
    r.add_texts(test.captions, ids=cap_ids)
    r.save(index)
    r = Retriever.load(bundle, index=index)

    print("[6/6] searching")
    for j in (0, 5, 10):
        cap = test.captions[j]
        hits = r.search(text=cap, k=3, rerank=args.rerank)
        print(f"  text -> image  {cap!r} (truth {img_ids[j // 5]})")
        for h in hits:
            print(f"      {h.id}  score {h.score:.4f}  (stage-1 {h.stage1:.4f})")
    hits = r.search(image=test.images[0], k=3, rerank=args.rerank)
    print("  image -> text  img0000")
    for h in hits:
        print(f"      {h.id}  score {h.score:.4f}  {test.captions[int(str(h.id)[3:])]!r}")
    got = runtime_recall(
        r, test.images, test.region_mask, test.captions, img_ids, cap_ids, rerank=args.rerank
    )
    print(recall_line(got, table, args.rerank, test.n_images, len(test.captions)))
    print(f"done in {time.perf_counter() - t0:.0f} s; bundle: {bundle}, index: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
