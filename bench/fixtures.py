"""What the benchmark measures on: a paper-size random bundle, a trained tiny checkpoint, query captions."""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "speed_bundle",
    "speed_checkpoint",
    "code_hash",
    "trained_bundle",
    "random_captions",
    "random_regions",
    "WORDS",
]

log = logging.getLogger(__name__)

# A vocabulary of plain words for the paper-size random model (what the words mean does not matter for speed).
WORDS = tuple(
    "a an the and of on in with near under behind next to at by two three some man woman child dog cat "
    "horse bird car bus train boat bike ball tree house street beach field table plate pizza bowl cup "
    "red blue green yellow black white brown small big old young tall little wooden open empty "
    "runs sits stands holds walks rides eats looks plays jumps lies grass water snow sky "
    "road room wall".split()
)


def random_captions(n: int, words: int = 12, seed: int = 0) -> list[str]:
    """``n`` captions of exactly ``words`` words drawn from :data:`WORDS`."""
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(words)) for _ in range(n)]


def random_regions(n: int, r: int, dv: int, seed: int = 0) -> np.ndarray:
    """``[n, r, dv]`` float32 non-negative features (BUTD features are post-ReLU)."""
    rng = np.random.default_rng(seed)
    return np.abs(rng.standard_normal((n, r, dv), dtype=np.float32))


def speed_bundle(work: Path, d: int, word_dim: int, dv: int) -> Path:
    """Export a randomly initialised MSSAN of the given sizes (cached in ``work``)."""
    import torch

    from export import export_bundle
    from mssan_infer.text.words import Tokenizer, build_vocab
    from training.checkpoint import save_checkpoint
    from training.config import ModelConfig
    from training.model import MSSAN

    out = work / f"bundle-d{d}-w{word_dim}-v{dv}-{code_hash()}"
    if (out / "manifest.json").is_file():
        return out
    torch.manual_seed(0)
    tok = Tokenizer(build_vocab([" ".join(WORDS)] * 4, threshold=4), max_len=64)
    cfg = ModelConfig(vocab_size=len(tok), word_dim=word_dim, embed_size=d, img_dim=dv, max_len=64)
    ckpt = save_checkpoint(speed_checkpoint(work, d, word_dim, dv), MSSAN(cfg), tok, state={"epoch": 0})
    log.info("exporting the speed bundle (D=%d, word %d, Dv=%d)", d, word_dim, dv)
    return export_bundle(ckpt, out)


def code_hash() -> str:
    """Short hash of the code the exported graphs come from (bundles are re-exported when it changes)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in ("training/model.py", "export/graphs.py", "export/onnx.py", "mssan_infer/spec.py"):
        f = root / rel
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:10]


def speed_checkpoint(work: Path, d: int, word_dim: int, dv: int) -> Path:
    """Folder of the random paper-size checkpoint behind :func:`speed_bundle`."""
    return work / f"ckpt-d{d}-w{word_dim}-v{dv}"


def trained_bundle(
    work: Path,
    images: int,
    epochs: int,
    seed: int = 0,
    checkpoint: Path | None = None,
    max_steps: int | None = None,
    model_overrides: dict[str, Any] | None = None,
) -> tuple[Path, Path, dict[str, Any]]:
    """A tiny model trained on synthetic data (or ``checkpoint``), exported; cached in ``work``.

    Returns ``(checkpoint, bundle, train_info)``.
    """
    from export import export_bundle

    info: dict[str, Any] = {}
    if checkpoint is None:
        from training.config import preset
        from training.synth import generate
        from training.train import train

        tag = "".join(f"-{k}{v}" for k, v in sorted((model_overrides or {}).items()))
        # the preset's own settings too (its default text tower changed once): a cached checkpoint of
        # another model is never reused
        tag += "-" + hashlib.sha256(repr(preset("tiny")).encode()).hexdigest()[:8]
        checkpoint = work / (
            f"tiny-{images}-{epochs}-s{seed}{tag}" + (f"-steps{max_steps}" if max_steps else "")
        )
        if not (checkpoint / "state.json").is_file():
            data = generate(work / f"synth-{images}-s{seed}", images=images, seed=seed)
            log.info("training a tiny checkpoint: %d images, %d epochs", images, epochs)
            res = train(
                data,
                checkpoint,
                preset="tiny",
                epochs=epochs,
                progress=False,
                max_steps=max_steps,
                model_overrides=model_overrides,
            )
            info = {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
        info.update(
            {
                "images": images,
                "epochs": epochs,
                "seed": seed,
                "max_steps": max_steps,
                "model_overrides": model_overrides or {},
                "preset": "tiny",
                "trained_here": True,
            }
        )
    else:
        info = {"checkpoint": str(checkpoint), "trained_here": False}
    try:
        import json

        st = json.loads((checkpoint / "state.json").read_text())
        info["checkpoint_epoch"] = st.get("epoch")
        info["best_dev_rsum"] = st.get("best_rsum")
    except (OSError, ValueError):
        pass
    bundle = work / f"bundle-{checkpoint.name}-{code_hash()}"
    if not (bundle / "manifest.json").is_file():
        export_bundle(checkpoint, bundle)
    return checkpoint, bundle, info
