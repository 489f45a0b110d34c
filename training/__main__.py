"""``python -m training synth|features|train|eval|ablate`` (DESIGN §9)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from mssan_infer.cli import HelpFormatter, error_line
from mssan_infer.errors import MssanError

from .config import BUNDLED_LAYERS, BUNDLED_PACKAGE

log = logging.getLogger("training")


def _synth(args: argparse.Namespace) -> int:
    from . import synth

    knobs = {k: getattr(args, k) for k in synth.SYNTH_KNOBS if getattr(args, k, None) is not None}
    out = synth.generate(args.out, images=args.images, seed=args.seed, **knobs)
    print(f"wrote synthetic precomp data to {out}")
    return 0


def _features(args: argparse.Namespace) -> int:
    from .images import write_features

    info = write_features(
        args.images,
        args.karpathy,
        args.out,
        backbone=args.backbone,
        weights=args.backbone_weights,
        image_size=args.image_size,
        resize=args.resize,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    print(
        f"wrote {info['backbone']} grid features {info['grid']}x{info['feature_dim']} of {info['images']} "
        f"images to {args.out}"
    )
    return 0


def _overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and train config overrides from the flags and ``--set KEY=VALUE`` items."""
    from .config import ModelConfig

    tover: dict[str, Any] = {}
    for key in ("batch_size", "lr", "seed", "device", "negatives"):
        if getattr(args, key, None) is not None:
            tover[key] = getattr(args, key)
    mover: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE (e.g. lam_gg=0), got {item!r}")
        target = (
            mover
            if key.removeprefix("model.") in ModelConfig.__dataclass_fields__ and not key.startswith("train.")
            else tover
        )
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value  # a bare string such as lse or bf16
        target[key.split(".", 1)[-1]] = parsed
    return mover, tover


def _train(args: argparse.Namespace) -> int:
    from .train import train

    mover, tover = _overrides(args)
    res = train(
        args.data,
        args.out,
        preset=args.preset,
        epochs=args.epochs,
        train_overrides=tover,
        model_overrides=mover,
        resume=args.resume,
        progress=not args.no_progress,
        text_model=args.text_model,
        text_layers=args.text_layers,
        text_encoder=args.text_encoder,
    )
    print(f"best dev rSum {res['best_dev_rsum']:.1f} in {res['wall_s']:.0f}s; checkpoint: {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_checkpoint
    from .data import load_split
    from .evaluate import evaluate_split

    ck = load_checkpoint(args.checkpoint)
    split = load_split(args.data, args.split)
    terms = tuple(t for t in args.terms.split(",") if t)
    with torch.inference_mode():
        rep = evaluate_split(
            ck.model,
            split.images,
            split.region_mask,
            split.captions,
            ck.tokenizer,
            rerank=args.rerank,
            terms=terms,
            coco=args.split == "testall",
        )
    if args.json:
        print(json.dumps(rep))
        return 0
    sections = rep.items() if args.split == "testall" else [("", rep)]
    for title, modes in sections:
        if title:
            print(f"== {title}")
        print(
            f"{'mode':<16}{'i2t R@1':>9}{'R@5':>7}{'R@10':>7}{'t2i R@1':>9}{'R@5':>7}{'R@10':>7}{'rSum':>8}"
        )
        for mode, r in modes.items():
            i, t = r["i2t"], r["t2i"]
            print(
                f"{mode:<16}{i['r1']:>9.1f}{i['r5']:>7.1f}{i['r10']:>7.1f}{t['r1']:>9.1f}{t['r5']:>7.1f}{t['r10']:>7.1f}{r['rsum']:>8.1f}"
            )
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from .ablate import ablate

    mover, tover = _overrides(args)
    res = ablate(
        args.data,
        args.out,
        preset=args.preset,
        epochs=args.epochs,
        split=args.split,
        rerank=args.rerank,
        model_overrides=mover,
        train_overrides=tover,
        progress=not args.no_progress,
        text_encoder=args.text_encoder,
    )
    print((Path(args.out) / "ablation.md").read_text(encoding="utf-8"))
    print(f"wrote {len(res['rows'])} rows to {Path(args.out) / 'ablation.json'} and ablation.md")
    return 0


def _text_encoder_flag(parser: argparse.ArgumentParser, text_model: bool = True) -> None:
    minilm = f"the bundled MiniLM of the pip package {BUNDLED_PACKAGE}, first {BUNDLED_LAYERS} layers"
    parser.add_argument(
        "--text-encoder",
        default=None,
        choices=["bigru", "transformer"],
        help="the text tower: transformer (a pretrained BERT-family encoder: "
        + (f"--text-model PATH, else {minilm}" if text_model else minilm)
        + ") or bigru (the paper's Bi-GRU over a word vocabulary, nothing pretrained). Default: the "
        "preset's (tiny: transformer, paper: bigru)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m training", description="Train and evaluate MSSAN.", formatter_class=HelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True)

    sp = sub.add_parser(
        "synth", help="write a seeded synthetic dataset in the precomp layout", formatter_class=HelpFormatter
    )
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--images", type=int, default=2000, help="training images (dev/test are smaller)")
    sp.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same files)")
    from . import synth

    for name, (default, help_) in synth.SYNTH_KNOBS.items():
        if name in ("images", "seed"):
            continue
        kind = type(default) if default is not None else str
        sp.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            default=None,
            help=f"{help_} (default {default})",
        )
    sp.set_defaults(func=_synth)

    fp = sub.add_parser(
        "features",
        help="precomp-layout grid features of an image folder + Karpathy JSON",
        formatter_class=HelpFormatter,
    )
    fp.add_argument("--images", required=True, help="folder with the dataset's image files")
    fp.add_argument("--karpathy", required=True, help="Karpathy split file (dataset_flickr8k.json ...)")
    fp.add_argument(
        "--out", required=True, help="output folder: {train,dev,test}_ims.npy, _caps.txt, features.json"
    )
    fp.add_argument(
        "--backbone", default="resnet152", help="resnet50 | resnet101 | resnet152 (default resnet152)"
    )
    fp.add_argument(
        "--backbone-weights",
        default=None,
        metavar="PATH",
        help="local torchvision-layout ImageNet weights (.pth/.pt or .safetensors); "
        "without it the backbone is randomly initialised (tests only)",
    )
    fp.add_argument(
        "--image-size", type=int, default=448, help="square crop side (default 448: 14x14 regions)"
    )
    fp.add_argument(
        "--resize", type=int, default=None, help="shorter side before the crop (default --image-size)"
    )
    fp.add_argument("--batch-size", type=int, default=16, help="images per backbone call")
    fp.add_argument("--device", default="cpu", help="cpu | cuda")
    fp.add_argument("--workers", type=int, default=0, help="image decoding processes (DataLoader workers)")
    fp.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16"],
        help="storage of the features (float16 halves the files; training reads either)",
    )
    fp.add_argument("--no-progress", action="store_true", help="no progress bars")
    fp.set_defaults(func=_features)

    tp = sub.add_parser(
        "train", help="train a model on a precomp-layout dataset", formatter_class=HelpFormatter
    )
    tp.add_argument("--data", required=True, help="folder with train_/dev_ files")
    tp.add_argument("--out", required=True, help="checkpoint folder (best on dev; last/ for --resume)")
    tp.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny", "paper"],
        help="model and training settings (tiny: CPU demo; paper: D=1024, the paper's setting)",
    )
    tp.add_argument("--epochs", type=int, help="epochs (default: the preset's)")
    tp.add_argument(
        "--batch-size",
        dest="batch_size",
        type=int,
        help="batch per process (default: the preset's; negatives come from the global batch)",
    )
    tp.add_argument("--lr", type=float, help="learning rate (default: the preset's)")
    tp.add_argument("--seed", type=int, help="random seed (default: the train config's)")
    tp.add_argument("--device", help="cpu | cuda (default: the train config's)")
    tp.add_argument(
        "--negatives",
        choices=["hardest", "all"],
        help="triplet negatives: the hardest in the batch, or all (default: the train config's)",
    )
    _text_encoder_flag(tp)
    tp.add_argument(
        "--text-model",
        default=None,
        metavar="PATH",
        help="the transformer tower's local BERT-family Hugging Face folder (config.json, "
        "model.safetensors, tokenizer.json or vocab.txt), fine-tuned at lr * text_lr_mult "
        "(--set text_lr_mult=0.1, --set freeze_text_epochs=N), with agg=lse unless --set agg=mean; "
        "nothing is downloaded. Implies --text-encoder transformer. Default: the bundled MiniLM "
        f"(pip package {BUNDLED_PACKAGE})",
    )
    tp.add_argument(
        "--text-layers",
        type=int,
        default=None,
        metavar="N",
        help="keep only the transformer tower's first N layers (a faster query encoder; default: "
        f"{BUNDLED_LAYERS} for the bundled MiniLM, all for --text-model)",
    )
    tp.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last with the recipe saved there (--epochs N extends it; "
        "a --set that differs from it is refused)",
    )
    tp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a ModelConfig or TrainConfig field, e.g. --set lam_gg=0 --set amp=bf16 "
        "(repeatable; prefix model. or train. where a name is ambiguous)",
    )
    tp.add_argument("--no-progress", action="store_true", help="no progress bars")
    tp.set_defaults(func=_train)

    ap_ = sub.add_parser(
        "ablate",
        help="retrain every subset of the levels (+ a fixed margin) and tabulate recall",
        formatter_class=HelpFormatter,
    )
    ap_.add_argument("--data", required=True, help="folder with train_/dev_ and the --split files")
    ap_.add_argument(
        "--out", required=True, help="one checkpoint folder per run, ablation.json and ablation.md"
    )
    ap_.add_argument(
        "--preset", default="tiny", choices=["tiny", "paper"], help="model and training settings"
    )
    _text_encoder_flag(ap_, text_model=False)
    ap_.add_argument("--epochs", type=int, help="epochs of every run (default: the preset's)")
    ap_.add_argument("--seed", type=int, help="random seed of every run (default: the train config's)")
    ap_.add_argument("--split", default="test", help="split the table reports (default test)")
    ap_.add_argument("--rerank", type=int, default=20, help="K of the full model's two-stage figure")
    ap_.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a ModelConfig or TrainConfig field in every run (as for train)",
    )
    ap_.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap_.set_defaults(func=_ablate)

    ep = sub.add_parser(
        "eval", help="recall of a checkpoint: stage-1, two-stage@K, exhaustive", formatter_class=HelpFormatter
    )
    ep.add_argument("--checkpoint", required=True, help="checkpoint folder written by train")
    ep.add_argument("--data", required=True, help="precomp-layout data folder")
    ep.add_argument("--split", default="test", help="train | dev | test | testall (COCO 1K folds + 5K)")
    ep.add_argument("--rerank", type=int, default=100, help="K of the two-stage mode (0: skip it)")
    ep.add_argument("--terms", default="gg,gl,ll", help="similarity terms to use (ablation), e.g. gg,ll")
    ep.add_argument("--json", action="store_true", help="print one JSON object")
    ep.set_defaults(func=_eval)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except (MssanError, OSError, ValueError) as e:
        print(error_line(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
