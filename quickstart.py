"""The end-to-end demo on the embedded synthetic default: ``python -m quickstart``.

synth -> train (tiny preset) -> evaluate -> export (fp32 + fp16, parity enforced)
-> index the test images with the torch-free runtime -> search both ways -> print.
Everything lands under ``--work`` (default ``demo/``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quickstart", description=__doc__)
    ap.add_argument("--work", default="demo", help="folder for data, checkpoint, bundle and index")
    ap.add_argument("--images", type=int, default=1000, help="synthetic training images")
    ap.add_argument("--epochs", type=int, default=None, help="override the tiny preset's epochs")
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
    res = train(data, ckpt, preset="tiny", epochs=args.epochs, progress=sys.stderr.isatty())
    print(f"      best dev rSum {res['best_dev_rsum']:.1f}, {res['wall_s']:.0f} s")
    print(f"[3/6] evaluating on the test split (two-stage at K={args.rerank})")
    ck = load_checkpoint(ckpt)
    test = load_split(data, "test")
    print(
        _table(
            evaluate_split(
                ck.model, test.images, test.region_mask, test.captions, ck.tokenizer, rerank=args.rerank
            )
        )
    )

    from export import export_bundle

    print(f"[4/6] exporting to ONNX (fp32 + fp16) with parity checks -> {bundle}")
    export_bundle(ckpt, bundle, fp16=True, force=True)

    from mssan_infer import Retriever

    r = Retriever.load(bundle)
    parity = r.bundle.manifest.parity
    print(f"      verified: {r.bundle.manifest.verified}")
    for prec, rep in parity.items():
        diffs = ", ".join(f"{g} {d:.1e}" for g, d in rep.get("max_abs", {}).items())
        print(f"      {prec}: passed {rep.get('passed')}; max |ONNX - PyTorch|: {diffs}")
    print(f"[5/6] indexing {test.n_images} test images and {len(test.captions)} captions -> {index}")
    img_ids = [f"img{i:04d}" for i in range(test.n_images)]
    r.add_images(test.images, ids=img_ids, mask=test.region_mask)
    r.add_texts(test.captions, ids=[f"cap{j:05d}" for j in range(len(test.captions))])
    r.save(index)
    r = Retriever.load(bundle, index=index)

    print("[6/6] searching")
    hits_at_1 = 0
    for j in range(0, len(test.captions), 5):
        hits = r.search(text=test.captions[j], k=5, rerank=args.rerank)
        hits_at_1 += hits[0].id == img_ids[j // 5]
    n_q = len(range(0, len(test.captions), 5))
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
    print(f"  runtime t2i R@1 over {n_q} queries: {100.0 * hits_at_1 / n_q:.1f}")
    print(f"done in {time.perf_counter() - t0:.0f} s; bundle: {bundle}, index: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
